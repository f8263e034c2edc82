"""Stage 4's training step at GPU scale against the step `transformers.Trainer` computes, side by side in one run.

Run: python bench/gpu_scale.py [--arms all] [--steps 6] [--tiny]

Random-weight Llama-3.1-8B and Llama-3.2-1B shapes built from a config (throughput needs no trained weights),
synthetic chat rows with lengths drawn uniformly from 256 to 2048 tokens and the loss on the last 30% of each row,
LoRA r16 on every linear layer, bf16 autocast, AdamW. Each arm runs in a fresh process on the same rows:

- `tw-*`: stage 4's step. `tunewright.train.attention.use_for_training` (padding-free rows through torch's
  variable-length kernel on CUDA), Liger's RMSNorm/RoPE/SwiGLU where installed, the frozen base kept in bf16,
  `token_loss` with the kernels stage 4 passes (answer positions only through the vocabulary projection), and
  stage 3's memory plan (micro-batches by a token budget, only the layers it must checkpointed, the step's loss
  over all its answer tokens);
- `hf-*`: the Trainer's step: PEFT model, the batch padded to its longest row, the model's own loss; `hf-liger-*`
  the same with Liger's kernels for Llama (its fused linear cross-entropy included).

Reported per arm: non-padding tokens/s over the steps after the first two (warm-up), MFU against the bf16 matmul
peak measured in the same run (4N FLOPs per token for LoRA, 6N for full fine-tuning; attention left out), peak
memory (torch.cuda.max_memory_allocated), and the losses of the first steps, with each tunewright arm's loss
difference from its HF arm. Results go to bench/results/gpu-scale-<device>.{json,md} with the machine.
`--tiny` runs the same arms at toy shapes on whatever device there is (a check of the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
# arm: (trainer, shape, method, batch rows per step, gradient checkpointing for the HF step, liger)
ARMS = {
    "tw-8b-lora-b8": ("tw", "8b", "lora", 8, True, False),
    "hf-8b-lora-b8-ckpt": ("hf", "8b", "lora", 8, True, False),
    "hf-liger-8b-lora-b8-ckpt": ("hf", "8b", "lora", 8, True, True),
    "tw-8b-lora-b4": ("tw", "8b", "lora", 4, False, False),
    "hf-8b-lora-b4": ("hf", "8b", "lora", 4, False, False),
    "tw-8b-qlora-b8": ("tw", "8b", "qlora", 8, True, False),
    "hf-8b-qlora-b8-ckpt": ("hf", "8b", "qlora", 8, True, False),
    "tw-1b-lora-b8": ("tw", "1b", "lora", 8, False, False),
    "hf-1b-lora-b8": ("hf", "1b", "lora", 8, False, False),
    "hf-liger-1b-lora-b8": ("hf", "1b", "lora", 8, False, True),
    "tw-1b-full-b8": ("tw", "1b", "full", 8, False, False),
    "hf-1b-full-b8": ("hf", "1b", "full", 8, False, False),
}


def rows(n: int, shape: str, seed: int, lengths: tuple[int, int]) -> list[dict]:
    """Synthetic chat rows: random tokens, lengths uniform in `lengths`, labels on the last 30%."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = SHAPES[shape]["vocab_size"]
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        answer = int(length * 0.7)
        out.append({"input_ids": ids, "labels": [-100] * answer + ids[answer:], "attention_mask": [1] * length})
    return out


def matmul_peak(device) -> float:
    """bf16 matmul FLOP/s measured here (8192^2 on a GPU)."""
    import torch

    size = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < (2.0 if device.type == "cuda" else 0.5):
        a @ b
        n += 1
    sync(device)
    return 2.0 * size**3 * n / (time.perf_counter() - t0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, method: str, liger: bool, device, base_dir: Path | None, trainer: str = "hf"):
    """The random-weight model (seed 0) with LoRA r16 on every linear layer (or all weights trainable); a
    tunewright QLoRA arm loads its 4-bit base with stage 4's `load_base`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    torch.manual_seed(0)
    if method == "qlora" and trainer == "tw":
        from tunewright.recipe import ModelConfig
        from tunewright.train.methods import load_base

        cfg = ModelConfig(base=str(base_dir), adapter={"method": "qlora", "r": 16, "alpha": 32})
        model = load_base(str(base_dir), cfg, device, gradient_checkpointing=True, precision="bf16")
    elif method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    else:
        config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if method != "full" else
                                                     torch.float32)
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def hf_step(net, batch_rows: list[dict], pad_id: int, device):
    """The Trainer's compute_loss on one padded batch: the model's own loss."""
    import torch

    from tunewright.chat import pad_batch

    batch = {k: v.to(device) for k, v in pad_batch(batch_rows, pad_id).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return float(loss)


def run_arm(name: str, steps: int, tiny: bool, base_dir: str | None, longest: bool = False) -> dict:
    """One arm in this process: its tokens/s, MFU, peak memory and first losses."""
    import torch

    sys.path.insert(0, str(ROOT))
    trainer, shape, method, batch, ckpt, liger = ARMS[name]
    shape = "tiny" if tiny else shape
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = (32, 256) if tiny else (256, 2048)
    data = rows(batch * steps, shape, seed=1, lengths=lengths)
    net = build(shape, method, liger, device, Path(base_dir) if base_dir else None, trainer)
    if longest:
        return {"arm": name, "longest_tokens": longest_sequence(net, device, shape)}
    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    n_params = _dense_params(shape)  # from the config: a 4-bit layer's packed tensor holds half its weights
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    describe = {}
    if trainer == "tw":
        step, describe = _tunewright_step(net, lm, method, data, batch, device)
    else:
        if ckpt:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.enable_input_require_grads()
        net.train()

        def step(i):
            return hf_step(net, data[i * batch:(i + 1) * batch], 0, device)
    losses, times, tokens = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step(i))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(r["input_ids"]) for r in data[i * batch:(i + 1) * batch]))
    warm = min(2, steps - 1)
    tps = sum(tokens[warm:]) / sum(times[warm:])
    per_token = (6.0 if method == "full" else 4.0) * n_params
    return {"arm": name, "trainer": trainer, "shape": shape, "method": method, "batch": batch,
            "gradient_checkpointing": ckpt if trainer == "hf" else describe.get("checkpointed_layers"),
            "liger": liger or describe.get("liger", False), "tokens_per_second": tps,
            "flops_per_token": per_token, "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30
                                                             if device.type == "cuda" else None),
            "losses": losses, "step_seconds": times, **describe}


def longest_sequence(net, device, shape: str, cap_gb: float = 80.0) -> int:
    """The longest single row (doubling from 4096 tokens) one step of stage 4's loss trains on with every layer
    checkpointed, the process held to `cap_gb` of device memory; 0 if none."""
    import torch

    from tunewright.train import attention, memory_plan
    from tunewright.train.loss import token_loss

    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    attention.use_for_training(lm, device)
    memory_plan.checkpoint_layers(net, lm.config.num_hidden_layers)
    net.train()
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 /
                                                       torch.cuda.get_device_properties(0).total_memory))
    best, length = 0, 4096 if shape != "tiny" else 64
    while length <= SHAPES[shape]["max_position_embeddings"] * 16:
        row = rows(1, shape, seed=2, lengths=(length, length))[0]
        batch = {k: torch.tensor([v], device=device) for k, v in row.items()}
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                token_loss(net, batch).backward()
            sync(device)
        except torch.OutOfMemoryError:
            break
        finally:
            net.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best, length = length, length * 2
    return best


def _dense_params(shape: str) -> int:
    """Parameters of a Llama shape's linear layers (what 4N counts), computed from the config."""
    s = SHAPES[shape]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    head = 0 if s.get("tie_word_embeddings") else s["vocab_size"] * h
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + head


def _tunewright_step(net, lm, method: str, data: list[dict], batch: int, device):
    """Stage 4's step on this model: the load-time switches stage 4 makes, the memory plan, and the loss."""
    import torch

    from tunewright.chat import pad_batch
    from tunewright.train.cross_entropy import LOGIT_CHUNK_TOKENS
    from tunewright.train import attention, liger, memory_plan
    from tunewright.train.loss import Kernels, token_loss
    from tunewright.train.methods import frozen_linear_weights_in_autocast_dtype, keep_adapter_inputs_in_autocast_dtype

    attention.use_for_training(lm, device)
    liger_why = liger.use_for_training(lm, device)
    if method != "full":
        keep_adapter_inputs_in_autocast_dtype(net)
        if method == "lora":
            frozen_linear_weights_in_autocast_dtype(net, "bf16")
    config = lm.config.to_dict()
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    max_len = max(len(r["input_ids"]) for r in data)
    # what does not grow with the batch, as stage 3 counts it: the weights as loaded, fp32 gradients and AdamW's two
    # states for the trained ones, one chunk of fp32 logits (with its log-softmax and gradient)
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    fixed = weights + n_trainable * 12.0 + LOGIT_CHUNK_TOKENS * config["vocab_size"] * 12.0
    available = (torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 24 * 2**30)
    plan = memory_plan.plan(config, fixed, available, precision="bf16", max_seq_len=max_len, step_rows=batch)
    memory_plan.checkpoint_layers(net, plan.checkpointed_layers)
    net.train()
    kernels = Kernels()

    def step(i):
        rows_ = data[i * batch:(i + 1) * batch]
        total = sum(memory_plan.answer_weight(r) for r in rows_)
        value = 0.0
        for group in memory_plan.split_by_tokens([len(r["input_ids"]) for r in rows_], plan.micro_batch_tokens):
            micro = {k: v.to(device) for k, v in pad_batch([rows_[g] for g in group], 0).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = token_loss(net, micro, "sum", kernels=kernels) / total
            loss.backward()
            value += float(loss.detach())
        return value

    return step, {"attention": lm.config._attn_implementation, "liger": not liger_why,
                  "checkpointed_layers": plan.checkpointed_layers, "micro_batch_tokens": plan.micro_batch_tokens}


def save_random_base(shape: str, out: Path) -> None:
    """The random-weight base as a safetensors folder (QLoRA arms quantise it while loading)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def machine() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory
                   / 2**30)
    for module in ("transformers", "peft", "liger_kernel", "bitsandbytes"):
        try:
            out[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            out[module] = None
    return out


def skip_reason(name: str, tiny: bool) -> str:
    """Why an arm cannot run on this machine ('' if it can)."""
    import importlib.util

    import torch

    _, _, method, _, _, liger = ARMS[name]
    if liger and (not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None):
        return "Liger needs CUDA and liger-kernel"
    if method == "qlora" and (not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None):
        return "QLoRA needs CUDA and bitsandbytes"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tiny", action="store_true", help="toy shapes on any device (a check of the script)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--longest", action="store_true", help="also find the longest row 8B QLoRA trains on in 80 GB")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:  # a child: one arm, its figures as JSON on the last line
        print(json.dumps(run_arm(args.arm, args.steps, args.tiny, args.base, args.longest)))
        return
    import torch

    names = list(ARMS) if args.arms == "all" else args.arms.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device)
    print(f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s on {device}", flush=True)
    results, bases = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            why = skip_reason(name, args.tiny)
            if why:
                results.append({"arm": name, "skipped": why})
                print(f"{name}: skipped ({why})", flush=True)
                continue
            shape = "tiny" if args.tiny else ARMS[name][1]
            if ARMS[name][2] == "qlora" and shape not in bases:
                bases[shape] = Path(tmp, shape)
                save_random_base(shape, bases[shape])
            cmd = [sys.executable, __file__, "--arm", name, "--steps", str(args.steps)] + \
                (["--tiny"] if args.tiny else []) + (["--base", str(bases[shape])] if shape in bases else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                results.append({"arm": name, "failed": proc.stderr[-2000:]})
                print(f"{name}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["mfu"] = result["tokens_per_second"] * result["flops_per_token"] / peak
            result["wall_seconds"] = time.perf_counter() - t0
            results.append(result)
            print(f"{name}: {result['tokens_per_second']:.0f} tok/s, MFU {100 * result['mfu']:.1f}%, peak "
                  f"{result['peak_memory_gb'] or 0:.1f} GB, losses {[round(v, 4) for v in result['losses'][:3]]}",
                  flush=True)
        if args.longest:
            results.append(probe_longest(args, bases, tmp))
    compare(results)
    write(results, peak, device, Path(args.out), args.tiny)


def probe_longest(args, bases: dict, tmp: str) -> dict:
    """The longest single row 8B QLoRA (tunewright's arm) trains on within 80 GB, in a process of its own."""
    name = "tw-8b-qlora-b8"
    why = skip_reason(name, args.tiny)
    if why:
        return {"arm": "longest-qlora-row", "skipped": why}
    shape = "tiny" if args.tiny else "8b"
    if shape not in bases:
        bases[shape] = Path(tmp, shape)
        save_random_base(shape, bases[shape])
    cmd = [sys.executable, __file__, "--arm", name, "--longest", "--base", str(bases[shape])] + \
        (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return {"arm": "longest-qlora-row", "failed": proc.stderr[-2000:]}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"longest row 8B QLoRA trains on within 80 GB: {found['longest_tokens']} tokens", flush=True)
    return {"arm": "longest-qlora-row", "longest_tokens": found["longest_tokens"]}


def compare(results: list[dict]) -> None:
    """Each tunewright arm against the HF arm of the same model and method: speed-up and first-step loss gap."""
    done = {r["arm"]: r for r in results if "tokens_per_second" in r}
    for name, r in done.items():
        if r["trainer"] != "tw":
            continue
        rest = name[len("tw-"):]
        hf = next((h for n, h in done.items() if n.startswith("hf-" + rest) and not h["liger"]), None)
        if hf is None:
            continue
        r["vs_hf"] = r["tokens_per_second"] / hf["tokens_per_second"]
        r["loss_gap_first_steps"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:3], hf["losses"][:3]))


def write(results: list[dict], peak: float, device, out: Path, tiny: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-scale-{'tiny-' if tiny else ''}{device.type}"
    info = {"machine": machine(), "matmul_peak_tflops": peak / 1e12, "results": results}
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2))
    lines = [f"# Stage 4's step at scale against the Trainer's ({info['machine'].get('gpu', device.type)})", "",
             f"`python bench/gpu_scale.py{' --tiny' if tiny else ''}`; bf16 matmul peak measured in the same run: "
             f"{peak / 1e12:.1f} TFLOP/s.", "",
             "| arm | tokens/s | MFU | peak GB | vs HF | first-steps loss gap | plan |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "longest_tokens" in r:
            lines.append(f"| {r['arm']} | longest row trained within 80 GB: {r['longest_tokens']} tokens | | | | | |")
            continue
        if "tokens_per_second" not in r:
            lines.append(f"| {r['arm']} | {r.get('skipped') or 'failed'} | | | | | |")
            continue
        plan = (f"{r.get('micro_batch_tokens')} tok/micro, {r.get('checkpointed_layers')} ckpt layers"
                if r["trainer"] == "tw" else "")
        lines.append(f"| {r['arm']} | {r['tokens_per_second']:,.0f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_memory_gb'] or 0:.1f} | " + (f"{r['vs_hf']:.2f}x | {100 * r['loss_gap_first_steps']:.2f}%"
                                                             if "vs_hf" in r else " | ") + f" | {plan} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
