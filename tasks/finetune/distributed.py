"""Multi-process fine-tuning under torchrun with DeepSpeed ZeRO; launched by the fine-tune task.

Run (what the task does): python -m torch.distributed.run --standalone --nproc_per_node N \\
    -m tasks.finetune.distributed SPEC.json

Each rank trains on its slice of every global batch (batch_size examples per process), so a
run with N processes sees the same examples per step as one process with N x batch_size.
Only rank 0 talks to MLflow (one stage run, not one per rank) and writes the trained weights
and `result.json`; the task computes validation loss afterwards in its own process.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def launch(spec: dict, work: Path, nproc: int, log) -> dict:
    """Run the workers as a subprocess and return rank 0's result; raise with their output on failure."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cuda" if spec["device"] == "cuda" else "cpu")
    env["OMP_NUM_THREADS"] = str(max(1, spec["threads"] // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tasks.finetune.distributed", str(spec_path)]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd[2:]))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], preexec_fn=_die_with_parent) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-60:]
            if line.startswith("[tunewright]"):
                log.info("%s", line.removeprefix("[tunewright]").strip())
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads((work / "result.json").read_text())


def _loss_module(net, focal_gamma: float, zero_stage: int):
    """The network wrapped so DeepSpeed's forward computes tunewright's loss (answer tokens, focal, weights)."""
    import torch

    from tunewright.chat import token_loss

    # ZeRO-3 gathers the head's weights on every call, so ranks with different answer lengths
    # must not make different numbers of chunked head calls
    chunk = 0 if zero_stage == 3 else None

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return token_loss(self.net, batch, focal_gamma=focal_gamma, logit_chunk=chunk)

    return LossModule()


def _die_with_parent() -> None:
    """In the launcher child: get SIGTERM if the task's process dies (even by SIGKILL), so torchrun stops
    its workers instead of leaving them training, and writing checkpoints, beside a resumed run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(spec_path: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    from tasks.finetune import checkpoints, perf
    from tunewright import methods
    from tunewright.seeding import seed_everything
    from tunewright.splits import read_split
    from tasks.finetune.stage import _Batches, training_examples
    from tunewright.chat import autocast_dtype
    from tunewright.recipe import ModelConfig, TrainConfig

    spec = json.loads(Path(spec_path).read_text())
    cuda = spec["device"] == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    train = TrainConfig.model_validate(spec["train"])
    model_cfg = ModelConfig.model_validate(spec["model"])
    seed_everything(spec["seed"])

    tokenizer = AutoTokenizer.from_pretrained(spec["base_dir"])
    net = methods.build(spec["base_dir"], spec["adapter_dir"], model_cfg, device, train.gradient_checkpointing,
                        spec["precision"])
    params = [p for p in net.parameters() if p.requires_grad]
    method = model_cfg.adapter.method
    fpt = perf.flops_per_token(sum(p.numel() for p in net.parameters()), sum(p.numel() for p in params),
                               method in ("full", "hft"), n_embedding=net.get_input_embeddings().weight.numel())
    # every rank measures its own matmul peak at once (they share the machine on a CPU); MFU is over the sum
    peak = torch.tensor(perf.peak_flops(device.type, spec["precision"], torch.get_num_threads()), dtype=torch.float64)
    dist.all_reduce(peak)
    ds_config = json.loads(Path(spec["deepspeed_config"]).read_text())
    optimizer = _optimizer(params, train, ds_config, rank)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                              num_training_steps=train.max_steps)
    ds_config.update(train_micro_batch_size_per_gpu=train.batch_size, gradient_accumulation_steps=train.grad_accum,
                     zero_allow_untested_optimizer=True, steps_per_print=10**9)
    focal_gamma = train.focal_gamma if train.loss == "focal" else 0.0
    wrapped = _loss_module(net, focal_gamma, ds_config["zero_optimization"]["stage"])
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)

    encoded = training_examples(train, read_split(spec["train_path"]), tokenizer, _Quiet() if rank else _Say(),
                                log_weights=False)
    if len(encoded) < train.batch_size * world:
        raise ValueError(f"train.batch_size {train.batch_size} x {world} processes exceeds the "
                         f"{len(encoded)} training rows")
    batches = _Batches(encoded, train.batch_size * world, spec["seed"], tokenizer.pad_token_id)
    amp = autocast_dtype(spec["precision"]) if not ds_config.get("bf16", {}).get("enabled") else None

    # resume: rank 0 picks the newest checkpoint that verifies; every rank loads its own partition of it
    root = Path(spec["checkpoint_dir"])
    choice = [None]
    if rank == 0:
        found = checkpoints.latest(root, _Say())
        choice = [str(found) if found else None]
    dist.broadcast_object_list(choice, src=0)
    state = {"tokens": 0, "seconds": 0.0}
    start = 0
    if choice[0]:
        found = Path(choice[0])
        loop = json.loads((found / "loop_state.json").read_text())
        if loop["world_size"] != world:
            raise RuntimeError(f"checkpoint {found} was written by {loop['world_size']} processes, this run has "
                               f"{world}; resume with environment.num_processes: {loop['world_size']}")
        engine.load_checkpoint(str(found), tag="deepspeed")
        checkpoints.set_rng_state(torch.load(found / f"rng-rank{rank}.pt", weights_only=False))
        state, start = {"tokens": loop["tokens"], "seconds": loop["seconds"]}, loop["step"]
        if rank == 0:
            print(f"[tunewright] resuming from checkpoint {found.name} (step {start} of {train.max_steps})", flush=True)

    client = None
    if rank == 0:
        from mlflow import MlflowClient

        client = MlflowClient(spec["tracking_uri"])
    loss_value = float("nan")
    for step in range(start + 1, train.max_steps + 1):
        t0 = time.perf_counter()
        step_loss = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        for micro in range(train.grad_accum):
            full = batches((step - 1) * train.grad_accum + micro)
            mine = {k: v[rank * train.batch_size : (rank + 1) * train.batch_size].to(device) for k, v in full.items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = engine(mine)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu() / train.grad_accum
            tokens += float(mine["attention_mask"].sum())
        dist.all_reduce(step_loss)
        dist.all_reduce(tokens)
        loss_value = float(step_loss) / world
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train loss became {loss_value} at step {step}; lower train.learning_rate")
        dt = time.perf_counter() - t0
        state["tokens"] += int(tokens)
        state["seconds"] += dt
        if rank == 0 and (step % train.log_every == 0 or step == train.max_steps):
            norm = engine.get_global_grad_norm()
            lr = engine.get_lr()[0]
            metrics = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": float(tokens) / dt,
                       "mfu": float(tokens) / dt * fpt / float(peak), "step_seconds": dt}
            if norm is not None:
                metrics["grad_norm"] = float(norm)
            client.log_batch(spec["run_id"], metrics=[_metric(k, v, step) for k, v in metrics.items()])
            print(f"[tunewright] step {step}/{train.max_steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                  f"{float(tokens) / dt:.0f} tok/s  MFU {100 * metrics['mfu']:.1f}%  "
                  f"({world} processes, ZeRO-{ds_config['zero_optimization']['stage']})", flush=True)
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.max_steps:
            path = _save_checkpoint(engine, root, step, {**state, "world_size": world}, train.keep_checkpoints,
                                    rank)
            if rank == 0:
                print(f"[tunewright] checkpoint {path.name} written", flush=True)

    out = Path(spec["output_dir"])
    model = engine.module.net
    trainable = [p for p in model.parameters() if p.requires_grad]
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
              if ds_config["zero_optimization"]["stage"] == 3 else _Null())
    with gather:
        if rank == 0:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    if rank == 0:
        Path(spec["result_path"]).write_text(json.dumps({
            "final_loss": loss_value, "steps": train.max_steps, "tokens": state["tokens"], "seconds": state["seconds"],
            "world_size": world, "resumed_from": start,
            "n_trainable": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable),
        }))
    dist.barrier()
    dist.destroy_process_group()


def _optimizer(params, train, ds_config: dict, rank: int):
    """AdamW; with ZeRO optimiser offload, DeepSpeed's CPU Adam (a C++ op built on first use) steps the
    offloaded states. Where that op cannot be built (no compiler), torch's AdamW steps them instead."""
    import torch

    if "offload_optimizer" in ds_config.get("zero_optimization", {}):
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=train.learning_rate, weight_decay=train.weight_decay, adamw_mode=True)
        except Exception as exc:  # the op builder reports missing compilers in many ways
            if rank == 0:
                print(f"[tunewright] DeepSpeed CPU Adam unavailable ({type(exc).__name__}: {exc}); offloaded "
                      "optimiser states are stepped by torch AdamW", flush=True)
            ds_config["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def _save_checkpoint(engine, root: Path, step: int, loop_state: dict, keep: int, rank: int) -> Path:
    """Every rank writes its ZeRO partition and RNG state into one temporary folder; rank 0 seals it.

    The folder gets the same manifest (SHA-256 of every file, written last) and the same rename into
    place as a one-process checkpoint, so `checkpoints.latest` finds, verifies and skips them alike.
    """
    import shutil

    import torch
    import torch.distributed as dist

    from tasks.finetune import checkpoints

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="deepspeed")
    torch.save(checkpoints.rng_state(), tmp / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        checkpoints.seal(tmp, final, step, loop_state, keep)
    dist.barrier()
    return final


class _Say:
    """Rank 0's log: lines the launching task forwards to its own log."""

    def info(self, msg, *args):
        print("[tunewright] " + (msg % args if args else msg), flush=True)

    warning = info


class _Quiet:
    def info(self, *args):
        pass

    warning = info


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


if __name__ == "__main__":
    main(sys.argv[1])
