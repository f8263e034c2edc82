"""Stage 3's section: seeds, precision, threads, and the processes and ZeRO stage of a distributed run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunewright.recipe.section import Section


class EnvironmentConfig(Section):
    seed: int = Field(42, description="Seed for Python, NumPy and torch; same seed, same run.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto` picks bf16 where the hardware has it, else fp32."
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: OMP_NUM_THREADS when set, else all cores).")
    num_processes: int = Field(1, ge=1, description="Training processes; above 1, stage 4 launches them with torchrun and DeepSpeed ZeRO.")
    deepspeed_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage of the DeepSpeed config written for the run.")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimiser states in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory.")
