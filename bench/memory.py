"""Peak training memory of fp32 LoRA, bf16 LoRA and 4-bit QLoRA on the embedded SmolLM2-135M.

Run: .venv/bin/python bench/memory.py [--steps 4] [--batch 8] [--checkpointing]

Each configuration trains for a few steps in its own fresh process on the bundled ticket
data, using tunewright's own model building and loss. Memory is resident set size sampled every
2 ms during the training steps, minus the resident set after imports and before the model
loads: what the model, adapter, optimiser and activations hold while training. Freed load-time
buffers are returned to the OS (malloc_trim) before training starts, so a conversion spike at
load time is not counted; the column "load peak" shows it. On a CUDA machine it also reports
torch.cuda.max_memory_allocated. Results go to bench/results/memory-<host>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "fp32 LoRA": {"method": "lora", "bits": None, "weights": "fp32", "amp": None},
    "bf16 LoRA": {"method": "lora", "bits": None, "weights": "bf16", "amp": "bf16"},
    "4-bit QLoRA (nf4, bf16 compute)": {"method": "qlora", "bits": 4, "weights": "fp32", "amp": "bf16"},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name: str, steps: int, batch: int, checkpointing: bool, device_name: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from tasks.finetune.methods import load_base, peft_config
    from tasks.model import resolve_base
    from tunewright.chat import autocast_dtype, encode_example, pad_batch, token_loss
    from tunewright.recipe import AdapterConfig, ModelConfig, QuantizationConfig
    from tunewright.settings import state_dir

    cfg = CONFIGS[name]
    device = torch.device(device_name)

    class Log:
        def info(self, *a):
            pass

    base_dir, _ = resolve_base(ModelConfig(), state_dir(), Log())
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [json.loads(line) for line in open(ROOT / "data/support_tickets/tickets.jsonl")][: steps * batch]
    encoded = [encode_example(tok, r["messages"], 256) for r in rows]
    torch.set_num_threads(os.cpu_count() or 1)
    baseline = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model_cfg = ModelConfig(adapter=AdapterConfig(method=cfg["method"]),
                            quantization=QuantizationConfig(bits=cfg["bits"]))
    model = load_base(str(base_dir), model_cfg, device, gradient_checkpointing=checkpointing)
    if cfg["weights"] == "bf16":
        model.to(torch.bfloat16)
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config(model_cfg.adapter))
    model.train()  # gradient checkpointing and dropout act only in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = autocast_dtype(cfg["amp"] or "fp32")
    import ctypes
    import gc
    import threading

    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after_load = _rss_bytes()
    samples = [after_load]
    running = True

    def sample():
        while running:
            samples.append(_rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for step in range(steps):
        b = {k: v.to(device) for k, v in pad_batch(encoded[step * batch : (step + 1) * batch], tok.pad_token_id).items()}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = token_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / steps
    running = False
    sampler.join()
    peak = max(samples)
    out = {"config": name, "baseline_rss_mb": baseline / 2**20, "after_load_mb": (after_load - baseline) / 2**20,
           "load_peak_mb": (load_peak - baseline) / 2**20, "training_peak_mb": (peak - baseline) / 2**20,
           "seconds_per_step": seconds, "final_loss": float(loss)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every configuration")
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.checkpointing, args.device)))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--device", args.device] + (["--checkpointing"] if args.checkpointing else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"measured {name}: {rows[-1]['training_peak_mb']:.0f} MB", file=sys.stderr)
    ref = rows[0]["training_peak_mb"]
    lines = [f"# Peak training memory, SmolLM2-135M-Instruct, batch {args.batch}, {args.steps} steps, "
             f"device {args.device}, gradient checkpointing {'on' if args.checkpointing else 'off'}",
             f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| configuration | training peak (MB) | vs fp32 LoRA | resident after load (MB) | load peak (MB) | s/step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['training_peak_mb']:.0f} | {r['training_peak_mb'] / ref:.0%} | "
                     f"{r['after_load_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['seconds_per_step']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{args.device}-{platform.node()}-b{args.batch}" + ("-ckpt" if args.checkpointing else "")
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
