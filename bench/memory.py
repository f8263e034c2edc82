"""Peak training memory of fp32 LoRA, bf16 LoRA and 4-bit QLoRA on the embedded SmolLM2-135M.

Run: .venv/bin/python bench/memory.py [--steps 3] [--batch 1] [--checkpointing]

Each configuration trains for a few steps in its own fresh process on the bundled ticket
data, using tunewright's own model loading (the same `load_base` the fine-tune stage calls)
and loss. Two measurements per configuration:

- tensor peak: the most bytes held at once by tensors: weights (4-bit data and quantisation
  constants included), adapter, gradients, optimiser state, activations and every temporary an
  operator allocates, counted at each storage's allocation and release (a TorchDispatchMode).
  This is the CPU counterpart of torch.cuda.max_memory_allocated, which is also reported on a
  CUDA device.
- RSS peak: resident set size sampled every 2 ms during the training steps, minus the resident
  set after imports and before the model loads. It adds what the C allocator keeps around and
  is noisy from run to run; freed load-time buffers are returned to the OS (malloc_trim) before
  training starts, so a conversion spike at load time is not counted (column "load peak").

Results go to bench/results/memory-<device>-<host>-b<batch>[-ckpt].json and .md.
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


def tensor_meter():
    """A dispatch mode that counts live tensor storage bytes and their peak (built lazily: imports torch)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class TensorMeter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self._seen = WeakIdKeyDictionary()

        def _release(self, nbytes: int) -> None:
            self.live -= nbytes

        def track(self, tensor) -> None:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                return
            storage = tensor.untyped_storage()
            if storage in self._seen:  # views and re-used storages count once
                return
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, nbytes)

        def track_model(self, model) -> None:
            for t in list(model.parameters()) + list(model.buffers()):
                self.track(t)
            for module in model.modules():  # bitsandbytes keeps 4-bit scales beside the weight
                state = getattr(getattr(module, "weight", None), "quant_state", None)
                if state is not None:
                    for t in (state.absmax, state.code, getattr(state, "offset", None)):
                        self.track(t)
                    if getattr(state, "state2", None) is not None:
                        self.track(state.state2.absmax)
                        self.track(state.state2.code)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                self.track(t)
            return out

    return TensorMeter()


def worker(name: str, steps: int, batch: int, checkpointing: bool, device_name: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import ctypes
    import gc
    import threading

    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from tunewright.train.methods import keep_adapter_inputs_in_autocast_dtype, load_base, peft_config
    from tasks.model import resolve_base
    from tunewright.chat import autocast_dtype, encode_example, pad_batch
    from tunewright.platform.settings import state_dir
    from tunewright.recipe import AdapterConfig, ModelConfig, QuantizationConfig
    from tunewright.train.loss import token_loss

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
    import bitsandbytes  # noqa: F401  (library code is loaded before the baseline in every configuration)

    baseline = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model_cfg = ModelConfig(adapter=AdapterConfig(method=cfg["method"]),
                            quantization=QuantizationConfig(bits=cfg["bits"]))
    model = load_base(str(base_dir), model_cfg, device, gradient_checkpointing=checkpointing,
                      precision=cfg["amp"] or "fp32")
    if cfg["weights"] == "bf16":
        model.to(torch.bfloat16)
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config(model_cfg.adapter))
    if amp_name := cfg["amp"]:  # as the fine-tune stage builds it under 16-bit autocast
        assert amp_name in ("bf16", "fp16")
        keep_adapter_inputs_in_autocast_dtype(model)
    model.train()  # gradient checkpointing and dropout act only in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = autocast_dtype(cfg["amp"] or "fp32")
    meter = tensor_meter()
    meter.track_model(model)
    weights = meter.live

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
    with meter:
        for step in range(steps):
            b = {k: v.to(device) for k, v in pad_batch(encoded[step * batch : (step + 1) * batch], tok.pad_token_id).items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = token_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(loss)
    seconds = (time.perf_counter() - t0) / steps
    running = False
    sampler.join()
    mb = 2**20
    out = {"config": name, "tensor_peak_mb": meter.peak / mb, "weights_mb": weights / mb,
           "baseline_rss_mb": baseline / mb, "after_load_mb": (after_load - baseline) / mb,
           "load_peak_mb": (load_peak - baseline) / mb, "rss_peak_mb": (max(samples) - baseline) / mb,
           "seconds_per_step": seconds, "final_loss": loss}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / mb
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
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
        print(f"measured {name}: tensor peak {rows[-1]['tensor_peak_mb']:.0f} MB, "
              f"RSS peak {rows[-1]['rss_peak_mb']:.0f} MB", file=sys.stderr)
    ref_t, ref_r = rows[0]["tensor_peak_mb"], rows[0]["rss_peak_mb"]
    lines = [f"# Peak training memory, SmolLM2-135M-Instruct, batch {args.batch}, {args.steps} steps, "
             f"device {args.device}, gradient checkpointing {'on' if args.checkpointing else 'off'}",
             f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| configuration | tensor peak (MB) | vs fp32 LoRA | weights (MB) | RSS peak (MB) | vs fp32 LoRA "
             "| load peak RSS (MB) | s/step | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['tensor_peak_mb']:.0f} | {r['tensor_peak_mb'] / ref_t:.0%} | "
                     f"{r['weights_mb']:.0f} | {r['rss_peak_mb']:.0f} | {r['rss_peak_mb'] / ref_r:.0%} | "
                     f"{r['load_peak_mb']:.0f} | {r['seconds_per_step']:.2f} | {r['final_loss']:.3f} |")
    if args.device == "cuda":
        lines.append("")
        lines += [f"- {r['config']}: torch.cuda.max_memory_allocated {r['cuda_max_allocated_mb']:.0f} MB" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{args.device}-{platform.node()}-b{args.batch}" + ("-ckpt" if args.checkpointing else "")
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
