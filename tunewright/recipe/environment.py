"""Stage 3's section: seeds, precision, threads, and the processes, ZeRO stage and cluster of a distributed run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunewright.recipe.section import Section


class ClusterConfig(Section):
    address: str = Field("auto", description="The Ray cluster stage 4 trains on: `auto` (the one this machine belongs "
                         "to, or RAY_ADDRESS), `HOST:6379` (its head), or `ray://HOST:10001` (Ray Client).")
    workers: int = Field(2, ge=1, description="Training workers (DeepSpeed ranks), one Ray Train worker each.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves (and its torch threads).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker reserves; above 0 the workers train on CUDA "
                                   "(NCCL) and the run holds that many slots of the `gpu` concurrency limit.")
    storage: Path | None = Field(None, description="A folder every node mounts at the same path: the run's inputs "
                                 "(split, base by digest, DeepSpeed config), checkpoints and outputs go there. Default: "
                                 "the run's own folder, which is enough on one machine or a shared state folder.")
    max_failures: int = Field(3, ge=0, description="Restarts of the workers from the last checkpoint after a worker "
                              "or node is lost (or a collective hangs past `timeout_minutes`) before the task fails.")
    timeout_minutes: float = Field(10, gt=0, description="How long a collective (an all-reduce, a barrier) may wait "
                                   "for a peer before the group is treated as failed and restarted.")


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
    cluster: ClusterConfig | None = Field(None, description="Train on a Ray cluster (Ray Train workers running the same "
                                          "loop under DeepSpeed ZeRO) instead of on this machine; stages 1-3 and 5-7 "
                                          "stay where the flow runs. `checkpoint_every` sets how much a lost node costs.")

    @property
    def processes(self) -> int:
        """The training processes: the cluster's workers, else `num_processes`."""
        return self.cluster.workers if self.cluster else self.num_processes

    @model_validator(mode="after")
    def _one_way_to_spread(self) -> "EnvironmentConfig":
        if self.cluster is not None and self.num_processes > 1:
            raise ValueError("num_processes and cluster both given: on a cluster, cluster.workers is the number of "
                             "training processes (leave num_processes at 1)")
        return self
