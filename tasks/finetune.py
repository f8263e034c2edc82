"""Stage 4, fine-tuning: supervised fine-tuning of the adapter, loss on assistant tokens only."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from tunewright.logs import stage_logger

from tasks.data import DataArtifact, read_split
from tasks.environment import EnvironmentArtifact, seed_everything
from tasks.model import ModelArtifact
from tunewright.chat import answer_loss, autocast_dtype, encode_example, pad_batch, token_loss
from tunewright.recipe import TrainConfig
from tunewright.tracking import RunContext, log_to_parent, stage_run


@dataclass(frozen=True)
class TrainArtifact:
    adapter_dir: str
    steps: int
    final_loss: float
    val_loss: float | None
    tokens_per_second: float
    train_seconds: float


def _batches(encoded: list[dict], batch_size: int, seed: int, pad_id: int):
    """Endless shuffled micro-batches; each epoch reshuffles with a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pad_batch([encoded[i] for i in order[start : start + batch_size]], pad_id)


def _save_checkpoint(model, optimizer, scheduler, step: int, root: Path) -> Path:
    """Adapter, optimiser and scheduler state at `step`, written to a temp folder then renamed."""
    import torch

    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@task(name="4-fine-tune")
def fine_tune(cfg: TrainConfig, data: DataArtifact, model: ModelArtifact, env: EnvironmentArtifact,
              ctx: RunContext) -> TrainArtifact:
    """Train the adapter for `max_steps` optimiser steps, logging every step to MLflow."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    log = stage_logger()
    seed_everything(env.seed)
    torch.set_num_threads(env.num_threads)
    device = torch.device("cuda" if env.device == "cuda" else "cpu")
    amp = autocast_dtype(env.precision)
    with stage_run(ctx, "4-fine-tune"):
        tokenizer = AutoTokenizer.from_pretrained(model.base_dir)
        base = AutoModelForCausalLM.from_pretrained(model.base_dir, dtype=torch.float32)
        net = PeftModel.from_pretrained(base, model.adapter_dir, is_trainable=True).to(device)
        net.train()
        train = read_split(data.train_path)
        encoded = [encode_example(tokenizer, r["messages"], cfg.max_seq_len) for r in train]
        if len(encoded) < cfg.batch_size:
            raise ValueError(f"train.batch_size {cfg.batch_size} exceeds the {len(encoded)} training examples")
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.max_steps)
        batches = _batches(encoded, cfg.batch_size, env.seed, tokenizer.pad_token_id)
        mlflow.log_params({"n_train_examples": len(encoded), "effective_batch": cfg.batch_size * cfg.grad_accum})
        log.info("fine-tuning %d steps x %d examples (%s, %s)", cfg.max_steps, cfg.batch_size * cfg.grad_accum,
                 env.device, env.precision)
        started = time.perf_counter()
        total_tokens, loss_value = 0, float("nan")
        ckpt_root = Path(ctx.work_dir, "finetune", "checkpoints")
        for step in range(1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = token_loss(net, batch)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            total_tokens += step_tokens
            loss_value = step_loss
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                lr = scheduler.get_last_lr()[0]
                mlflow.log_metrics({"train_loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm,
                                    "tokens_per_second": step_tokens / dt, "step_seconds": dt}, step=step)
                log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  %.2fs",
                         step, cfg.max_steps, step_loss, lr, grad_norm, step_tokens / dt, dt)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                _save_checkpoint(net, optimizer, scheduler, step, ckpt_root)
        elapsed = time.perf_counter() - started
        net.eval()
        val = read_split(data.val_path)
        val_loss = (answer_loss(net, tokenizer, [r["messages"] for r in val], max_len=cfg.max_seq_len,
                                batch_size=cfg.batch_size * 2, autocast_dtype=amp) if val else None)
        adapter_dir = Path(ctx.work_dir, "finetune", "adapter")
        net.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        summary = {"final_train_loss": loss_value, "train_seconds": elapsed,
                   "train_tokens_per_second": total_tokens / elapsed}
        if val_loss is not None:
            summary["val_loss"] = val_loss
        mlflow.log_metrics(summary)
        log_to_parent(ctx, summary)
        (adapter_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("fine-tuned in %.1fs: final loss %.4f, val loss %s", elapsed, loss_value,
                 f"{val_loss:.4f}" if val_loss is not None else "n/a")
        return TrainArtifact(adapter_dir=str(adapter_dir), steps=cfg.max_steps, final_loss=loss_value,
                             val_loss=val_loss, tokens_per_second=total_tokens / elapsed, train_seconds=elapsed)
