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
                          cwd=Path(__file__).resolve().parents[2]) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-60:]
            if line.startswith("[tunewright]"):
                log.info("%s", line.removeprefix("[tunewright]").strip())
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads((work / "result.json").read_text())


def main(spec_path: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    from tasks.data import read_split
    from tasks.environment import seed_everything
    from tasks.finetune import methods
    from tasks.finetune.stage import _Batches
    from tunewright.chat import autocast_dtype, encode_example
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
    net = methods.build(spec["base_dir"], spec["adapter_dir"], model_cfg, device, train.gradient_checkpointing)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps,
                              num_training_steps=train.max_steps)
    ds_config = json.loads(Path(spec["deepspeed_config"]).read_text())
    ds_config.update(train_micro_batch_size_per_gpu=train.batch_size, gradient_accumulation_steps=train.grad_accum,
                     zero_allow_untested_optimizer=True, steps_per_print=10**9)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    encoded = [encode_example(tokenizer, r["messages"], train.max_seq_len) for r in read_split(spec["train_path"])]
    batches = _Batches(encoded, train.batch_size * world, spec["seed"], tokenizer.pad_token_id)
    amp = autocast_dtype(spec["precision"]) if not ds_config.get("bf16", {}).get("enabled") else None
    client = None
    if rank == 0:
        from mlflow import MlflowClient

        client = MlflowClient(spec["tracking_uri"])
    total_tokens, total_seconds, loss_value = 0, 0.0, float("nan")
    for step in range(1, train.max_steps + 1):
        t0 = time.perf_counter()
        step_loss = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        for micro in range(train.grad_accum):
            full = batches((step - 1) * train.grad_accum + micro)
            mine = {k: v[rank * train.batch_size : (rank + 1) * train.batch_size].to(device) for k, v in full.items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = engine(**mine).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double().cpu() / train.grad_accum
            tokens += float(mine["attention_mask"].sum())
        dist.all_reduce(step_loss)
        dist.all_reduce(tokens)
        loss_value = float(step_loss) / world
        dt = time.perf_counter() - t0
        total_tokens += int(tokens)
        total_seconds += dt
        if rank == 0 and (step % train.log_every == 0 or step == train.max_steps):
            norm = engine.get_global_grad_norm()
            lr = engine.get_lr()[0]
            metrics = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": float(tokens) / dt,
                       "step_seconds": dt}
            if norm is not None:
                metrics["grad_norm"] = float(norm)
            client.log_batch(spec["run_id"], metrics=[_metric(k, v, step) for k, v in metrics.items()])
            print(f"[tunewright] step {step}/{train.max_steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                  f"{float(tokens) / dt:.0f} tok/s ({world} processes, ZeRO-{ds_config['zero_optimization']['stage']})",
                  flush=True)

    out = Path(spec["output_dir"])
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
              if ds_config["zero_optimization"]["stage"] == 3 else _Null())
    with gather:
        if rank == 0:
            engine.module.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    if rank == 0:
        Path(spec["result_path"]).write_text(json.dumps({
            "final_loss": loss_value, "steps": train.max_steps, "tokens": total_tokens, "seconds": total_seconds,
            "world_size": world, "n_trainable": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable),
        }))
    dist.barrier()
    dist.destroy_process_group()


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
