"""Stage 3, training environment setup: detect hardware, pick precision, seed, write DeepSpeed config."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tunewright.recipe import EnvironmentConfig, TrainConfig
from tunewright.tracking import RunContext, stage_run


@dataclass(frozen=True)
class EnvironmentArtifact:
    device: str
    precision: str
    cpu_cores: int
    num_threads: int
    bf16_supported: bool
    cuda_devices: tuple[str, ...]
    cuda_memory_gb: tuple[float, ...]
    seed: int
    deepspeed_config: str


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    import torch

    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(bool(c()) for c in checks if c is not None)


def detect_hardware() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ()
    memory = tuple(round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                   for i in range(len(devices)))
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_bf16_supported()
    return {"device": "cuda" if cuda else "cpu", "cpu_cores": os.cpu_count() or 1, "bf16_supported": bool(bf16),
            "cuda_devices": devices, "cuda_memory_gb": memory}


def pick_precision(requested: str, hw: dict) -> str:
    if requested == "auto":
        return "bf16" if hw["bf16_supported"] else ("fp16" if hw["device"] == "cuda" else "fp32")
    if requested == "bf16" and not hw["bf16_supported"]:
        raise RuntimeError(f"environment.precision: bf16 requested but this {hw['device']} has no bf16 support")
    if requested == "fp16" and hw["device"] != "cuda":
        raise RuntimeError("environment.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return requested


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def deepspeed_config(env: EnvironmentConfig, train: TrainConfig, precision: str) -> dict:
    """The DeepSpeed config a run with this recipe uses (ZeRO stage, offload, precision)."""
    zero: dict = {"stage": env.deepspeed_stage}
    if env.deepspeed_stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    if env.offload_optimizer and env.deepspeed_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if env.offload_params and env.deepspeed_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if env.deepspeed_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_param_persistence_threshold": 1e4, "stage3_prefetch_bucket_size": 5e7})
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": train.log_every,
        "wall_clock_breakdown": False,
    }


@task(name="3-setup-environment")
def setup_environment(env: EnvironmentConfig, train: TrainConfig, ctx: RunContext) -> EnvironmentArtifact:
    """Detect hardware, choose precision and threads, seed, and write the DeepSpeed config."""
    import mlflow
    import torch

    log = stage_logger()
    with stage_run(ctx, "3-environment"):
        hw = detect_hardware()
        precision = pick_precision(env.precision, hw)
        threads = env.num_threads or hw["cpu_cores"]
        torch.set_num_threads(threads)
        seed_everything(env.seed)
        ds_path = Path(ctx.work_dir, "environment", "deepspeed.json")
        ds_path.parent.mkdir(parents=True, exist_ok=True)
        ds_path.write_text(json.dumps(deepspeed_config(env, train, precision), indent=2))
        mlflow.log_params({"device": hw["device"], "precision": precision, "num_threads": threads,
                           "cpu_cores": hw["cpu_cores"], "bf16_supported": hw["bf16_supported"],
                           "cuda_devices": ",".join(hw["cuda_devices"]) or "none", "seed": env.seed,
                           "torch_version": torch.__version__})
        mlflow.log_artifact(str(ds_path), "environment")
        log.info("hardware: %s, %d cores, bf16=%s, cuda=%s -> precision %s, %d threads, seed %d",
                 hw["device"], hw["cpu_cores"], hw["bf16_supported"], hw["cuda_devices"] or "none",
                 precision, threads, env.seed)
        return EnvironmentArtifact(device=hw["device"], precision=precision, cpu_cores=hw["cpu_cores"],
                                   num_threads=threads, bf16_supported=hw["bf16_supported"],
                                   cuda_devices=hw["cuda_devices"], cuda_memory_gb=hw["cuda_memory_gb"],
                                   seed=env.seed, deepspeed_config=str(ds_path))
