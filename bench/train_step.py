"""Seconds per LoRA training step on the embedded SmolLM2-135M: what two loss-path choices cost or save.

Run: .venv/bin/python bench/train_step.py [--steps 6] [--batch 8] [--precision bf16]

Three configurations, each in its own fresh process, same data, same seed, the same network
stage 4 builds (LoRA r=16 on every linear layer, bf16 autocast where the CPU has it):

- PEFT defaults: every adapter casts its input up to the fp32 adapter weights, and the loss
  projects all answer positions onto the 49k vocabulary at once;
- adapter inputs kept in the autocast dtype (`keep_adapter_inputs_in_autocast_dtype`);
- that plus the chunked vocabulary projection (`LOGIT_CHUNK_TOKENS` positions at a time,
  recomputed in backward): what the fine-tune stage runs.

The first step is a warm-up and not timed; the table shows the median of the rest and the loss
of the last step (the three must agree: the choices change memory and speed, not the numbers
beyond rounding). Results go to bench/results/train-step-<device>-<host>-b<batch>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "PEFT defaults (fp32 adapter inputs, one vocabulary projection)": {"keep_inputs": False, "chunk": 0},
    "adapter inputs in the autocast dtype": {"keep_inputs": True, "chunk": 0},
    "+ chunked vocabulary projection (stage 4)": {"keep_inputs": True, "chunk": None},
}


def worker(name: str, steps: int, batch: int, precision: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from tunewright.train.methods import keep_adapter_inputs_in_autocast_dtype, load_base, peft_config
    from tasks.model import resolve_base
    from tunewright.chat import autocast_dtype, encode_example, pad_batch
    from tunewright.platform.settings import state_dir
    from tunewright.recipe import AdapterConfig, ModelConfig
    from tunewright.train.loss import Kernels, token_loss

    class Log:
        def info(self, *a):
            pass

    cfg = CONFIGS[name]
    base_dir, _ = resolve_base(ModelConfig(), state_dir(), Log())
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [json.loads(line) for line in open(ROOT / "data/support_tickets/tickets.jsonl")][: steps * batch]
    encoded = [encode_example(tok, r["messages"], 256) for r in rows]
    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg = ModelConfig(adapter=AdapterConfig(method="lora"))
    model = load_base(str(base_dir), model_cfg, torch.device("cpu"), precision=precision)
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config(model_cfg.adapter))
    if cfg["keep_inputs"]:
        keep_adapter_inputs_in_autocast_dtype(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = autocast_dtype(precision)
    times, tokens = [], 0
    for step in range(steps):
        b = pad_batch(encoded[step * batch : (step + 1) * batch], tok.pad_token_id)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = token_loss(model, b, kernels=Kernels() if cfg["chunk"] is None else Kernels(logit_chunk=cfg["chunk"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
            tokens += int(b["attention_mask"].sum())
        loss = float(loss)
    return {"config": name, "seconds_per_step": statistics.median(times), "tokens_per_second": tokens / sum(times),
            "final_loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.precision)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--precision", args.precision]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"measured {name}: {rows[-1]['seconds_per_step']:.2f} s/step", file=sys.stderr)
    ref = rows[0]["seconds_per_step"]
    lines = [f"# LoRA training step, SmolLM2-135M-Instruct, batch {args.batch}, {args.precision}, "
             f"median of {args.steps - 1} steps after a warm-up",
             f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| configuration | s/step | vs PEFT defaults | tokens/s | last-step loss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['seconds_per_step']:.2f} | {r['seconds_per_step'] / ref:.0%} | "
                     f"{r['tokens_per_second']:.0f} | {r['final_loss']:.4f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train-step-cpu-{platform.node()}-b{args.batch}-{args.precision}"
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
