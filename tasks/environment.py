"""Stage 3, training environment setup: detect hardware, pick precision, seed, write DeepSpeed config."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger
from tunewright.train import memory_plan
from tunewright.train.cross_entropy import LOGIT_CHUNK_TOKENS

from tasks.artifacts import EnvironmentArtifact, ModelArtifact
from tunewright.recipe import EnvironmentConfig, ModelConfig, TrainConfig
from tunewright.registry.tracking import RunContext, stage_run
from tunewright.seeding import seed_everything


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


def default_threads(cpu_cores: int) -> int:
    """Torch threads when the recipe names none: OMP_NUM_THREADS where it is set to a positive number (the usual
    way to share a machine between processes), else every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else cpu_cores


def pick_precision(requested: str, hw: dict) -> str:
    if requested == "auto":
        return "bf16" if hw["bf16_supported"] else ("fp16" if hw["device"] == "cuda" else "fp32")
    if requested == "bf16" and not hw["bf16_supported"]:
        raise RuntimeError(f"environment.precision: bf16 requested but this {hw['device']} has no bf16 support")
    if requested == "fp16" and hw["device"] != "cuda":
        raise RuntimeError("environment.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return requested


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


class PreflightError(RuntimeError):
    """The recipe cannot fit on this hardware; the message says what would."""


GiB = 2**30


def estimate_memory(config: dict, n_params: int, n_trainable: int, *, bits: int | None, batch_size: int,
                    seq_len: int, precision: str, gradient_checkpointing: bool, zero_stage: int = 0,
                    offload_optimizer: bool = False, offload_params: bool = False, world_size: int = 1) -> dict:
    """Bytes per device for weights, gradients, optimiser states and activations (an upper estimate).

    Weights are held in fp32 for training unless quantised (4-bit ~0.56 bytes/param with its
    constants, 8-bit 1 byte; the embeddings and head stay 16-bit under autocast); gradients are fp32 for trainable weights, AdamW keeps two fp32
    states. Activations follow Korthikanti et al. (34 bytes per token per hidden unit per layer at
    16-bit plus attention scores), or just the layer inputs with gradient checkpointing; the
    loss projects LOGIT_CHUNK_TOKENS positions onto the vocabulary at a time (fp32 logits,
    log-softmax and gradient of one chunk). ZeRO partitions optimiser states (stage 1+),
    gradients (2+) and weights (3) across `world_size`; offload moves them to CPU memory.
    """
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 1024)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 12)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 16)
    vocab = int(config.get("vocab_size") or 32000)
    per_param = {4: 0.5625, 8: 1.0}.get(bits, 4.0)
    weights = n_params * per_param
    if bits:  # embeddings and head stay unquantised: 16-bit under autocast (place_unquantised), else fp32
        embedding = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
        unquantised = min(embedding, n_params)
        weights = (n_params - unquantised) * per_param + unquantised * (2.0 if precision in ("bf16", "fp16") else 4.0)
    grads = n_trainable * 4.0
    optim = n_trainable * 8.0
    if zero_stage >= 1:
        optim /= world_size
    if zero_stage >= 2:
        grads /= world_size
    if zero_stage >= 3:
        weights /= world_size
    if offload_optimizer and zero_stage >= 1:
        optim = 0.0
    if offload_params and zero_stage == 3:
        weights = 0.0
    tokens = batch_size * seq_len
    scale = 1.0 if precision in ("bf16", "fp16") else 2.0
    per_layer = tokens * hidden * (34 + 5 * heads * seq_len / hidden) * scale
    acts = (layers * tokens * hidden * 2 * scale + per_layer) if gradient_checkpointing else layers * per_layer
    logits = min(tokens, LOGIT_CHUNK_TOKENS) * vocab * 4.0 * 3  # one chunk: fp32 logits, log-softmax, gradient
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts + logits}
    parts["total"] = sum(parts.values())
    return parts


def available_memory(hw: dict) -> float:
    """Bytes free for training: the smallest CUDA device, or the CPU's available RAM."""
    if hw["device"] == "cuda":
        return min(hw["cuda_memory_gb"]) * GiB
    import psutil

    return float(psutil.virtual_memory().available)


def preflight(estimate_for, available: float, train: TrainConfig, env: EnvironmentConfig, bits: int | None,
              world_size: int) -> dict:
    """Refuse a recipe whose estimate exceeds 90% of memory, naming the changes that would fit."""
    base = estimate_for()
    if base["total"] <= 0.9 * available:
        return base
    options = {
        "QLoRA (model.adapter.method: qlora, a 4-bit base)": dict(bits=4) if bits != 4 else None,
        "gradient checkpointing (train.gradient_checkpointing: true)":
            dict(gradient_checkpointing=True) if not train.gradient_checkpointing else None,
        f"ZeRO-3 over {max(world_size, 2)} devices (environment.deepspeed_stage: 3)":
            dict(zero_stage=3, world_size=max(world_size, 2)) if env.deepspeed_stage < 3 else None,
        "CPU offload of optimiser and parameters (environment.offload_optimizer/offload_params: true, ZeRO-3)":
            dict(zero_stage=3, offload_optimizer=True, offload_params=True),
        "a smaller train.batch_size or train.max_seq_len": dict(batch_size=1),
    }
    fits = [f"{name}: ~{estimate_for(**change)['total'] / GiB:.1f} GiB"
            for name, change in options.items() if change and estimate_for(**change)["total"] <= 0.9 * available]
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in base.items() if k != "total")
    raise PreflightError(
        f"this recipe needs ~{base['total'] / GiB:.1f} GiB ({parts} GiB) but only {available / GiB:.1f} GiB is "
        f"available; would fit: " + ("; ".join(fits) if fits else "none of QLoRA, checkpointing, ZeRO-3 or offload alone"))


@task(name="3-setup-environment")
def setup_environment(env: EnvironmentConfig, train: TrainConfig, model_cfg: ModelConfig, model: ModelArtifact,
                      ctx: RunContext, available_bytes: float | None = None) -> EnvironmentArtifact:
    """Detect hardware, choose precision and threads, check the recipe fits, seed, write the DeepSpeed config."""
    import mlflow
    import torch

    log = stage_logger()
    with stage_run(ctx, "3-environment"):
        hw = detect_hardware()
        precision = pick_precision(env.precision, hw)
        threads = env.num_threads or default_threads(hw["cpu_cores"])
        torch.set_num_threads(threads)
        config = json.loads(Path(model.base_dir, "config.json").read_text())
        world = max(env.processes, 1)

        def estimate_for(**change):
            kw = dict(bits=model_cfg.load_bits(), batch_size=train.batch_size, seq_len=train.max_seq_len,
                      precision=precision, gradient_checkpointing=train.gradient_checkpointing,
                      zero_stage=env.deepspeed_stage, offload_optimizer=env.offload_optimizer,
                      offload_params=env.offload_params, world_size=world)
            kw.update(change)
            return estimate_memory(config.get("text_config", config), model.n_params, model.n_trainable, **kw)

        available = available_bytes if available_bytes is not None else available_memory(hw)
        why_not = plan_why_not(train, env, hw["device"])
        # on a cluster the workers' machines hold the training, not this one: the estimate is recorded, not checked;
        # a memory plan checks what it plans instead of the recipe's batch
        estimate = (estimate_for() if env.cluster or not why_not else
                    preflight(estimate_for, available, train, env, model_cfg.load_bits(), world))
        mlflow.log_metrics({f"memory_{k}_gb": v / GiB for k, v in estimate.items()})
        mlflow.log_metric("memory_available_gb", available / GiB)
        plan = None if why_not else plan_memory(train, config.get("text_config", config), estimate, available,
                                                precision, log)
        if why_not:
            log.info("memory plan: none (%s); micro-batches of train.batch_size %d rows", why_not, train.batch_size)
        seed_everything(env.seed)
        ds_path = Path(ctx.work_dir, "environment", "deepspeed.json")
        ds_path.parent.mkdir(parents=True, exist_ok=True)
        ds_path.write_text(json.dumps(deepspeed_config(env, train, precision), indent=2))
        mlflow.log_params({"device": hw["device"], "precision": precision, "num_threads": threads,
                           "cpu_cores": hw["cpu_cores"], "bf16_supported": hw["bf16_supported"],
                           "cuda_devices": ",".join(hw["cuda_devices"]) or "none", "seed": env.seed,
                           "torch_version": torch.__version__})
        mlflow.log_artifact(str(ds_path), "environment")
        log.info("hardware: %s, %d cores, bf16=%s, cuda=%s -> precision %s, %d threads, seed %d; "
                 "memory estimate %.2f of %.1f GiB available",
                 hw["device"], hw["cpu_cores"], hw["bf16_supported"], hw["cuda_devices"] or "none",
                 precision, threads, env.seed, estimate["total"] / GiB, available / GiB)
        return EnvironmentArtifact(device=hw["device"], precision=precision, cpu_cores=hw["cpu_cores"],
                                   num_threads=threads, bf16_supported=hw["bf16_supported"],
                                   cuda_devices=hw["cuda_devices"], cuda_memory_gb=hw["cuda_memory_gb"],
                                   seed=env.seed, deepspeed_config=str(ds_path),
                                   memory_estimate_gb=estimate["total"] / GiB, memory_available_gb=available / GiB,
                                   num_processes=env.processes,
                                   cluster=env.cluster.model_dump(mode="json") if env.cluster else None,
                                   memory_plan=plan.as_dict() if plan else None)


def plan_why_not(train: TrainConfig, env: EnvironmentConfig, device: str) -> str:
    """Why stage 4 keeps the recipe's micro-batches ('' where it follows a memory plan)."""
    if train.memory_plan == "off":
        return "train.memory_plan is off"
    if train.memory_plan == "auto" and device != "cuda":
        return "not on CUDA (train.memory_plan: on plans on any device)"
    if env.processes > 1 or env.cluster:
        return "it plans the steps of one process; DeepSpeed's processes keep train.batch_size"
    return ""


def plan_memory(train: TrainConfig, config: dict, estimate: dict, available: float, precision: str,
                log) -> memory_plan.MemoryPlan:
    """Stage 4's memory plan, logged: the activations get what weights, gradients, optimiser states and one chunk
    of logits leave of the device."""
    import mlflow

    logits = LOGIT_CHUNK_TOKENS * int(config.get("vocab_size") or 32000) * 4.0 * 3
    fixed = estimate["weights"] + estimate["gradients"] + estimate["optimizer"] + logits
    try:
        plan = memory_plan.plan(config, fixed, available, precision=precision, max_seq_len=train.max_seq_len,
                                step_rows=train.batch_size * train.grad_accum)
    except memory_plan.PlanError as exc:
        raise PreflightError(f"train.memory_plan: {exc}") from None
    mlflow.log_params({"memory_plan_micro_batch_tokens": plan.micro_batch_tokens,
                       "memory_plan_checkpointed_layers": plan.checkpointed_layers})
    log.info("memory plan: micro-batches of up to %d tokens, %d of %d layers checkpointed (%s); each step keeps "
             "its %d rows", plan.micro_batch_tokens, plan.checkpointed_layers, plan.layers, plan.why,
             train.batch_size * train.grad_accum)
    return plan
