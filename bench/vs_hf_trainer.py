"""tunewright's trainer against a Hugging Face `Trainer` + PEFT script on the same recipe, side by side.

Run: .venv/bin/python bench/vs_hf_trainer.py [--recipe recipes/demo.yaml] [--steps 20] [--precision auto]
     [--device auto] [--liger]

Both trainers get the same tokenised examples in the same batches (stage 1 of the recipe splits the
data; answer-only labels from `tunewright.chat.encode_example`), the same LoRA config and initial
adapter weights (same seed), AdamW with the recipe's learning rate, weight decay and gradient
clipping, its schedule and warm-up, the same batch size, steps and precision. Each runs in a fresh
process:

- tunewright: the step stage 4 runs for supervised fine-tuning (`tunewright.chat.pad_batch` and
  `tunewright.train.loss.token_loss`: the prompt tokens every row of the batch shares run through the model once, the
  loss on answer tokens only, the vocabulary projection on those positions alone, fused with the
  cross-entropy, in chunks; on the CPU the batch decoded unpadded, the `tunewright_cpu` attention and
  the fused LoRA layers; adapter inputs and the frozen base and head kept in the autocast dtype);
  `--no-shared-prefix` adds it without the shared prefix, to show what that part gives;
- HF Trainer: `transformers.Trainer` on a `datasets.Dataset`, `DataCollatorForSeq2Seq` padding per
  batch, the model's own loss, as the transformers and PEFT documentation show. The one change from
  such a script is a sequential sampler, so that both see the same batches in the same order.

Printed, and written to bench/results/vs-hf-trainer-<device>[-<cpu kind>]-<precision>.{md,json} with the machine
(cpu kind: amx, avx512bf16, or avx2, which is also what kernels capped with ATEN_CPU_CAPABILITY=avx2 report):
effective (non-padding) tokens/s over the steps after the first (a warm-up), wall time of all
steps, peak memory, the final loss on the validation split (the same function for both: mean
cross-entropy of the answer tokens), MFU against the matmul peak this run measured on the device,
and the ratio to the Trainer. `--liger` (CUDA, with liger-kernel installed) adds both trainers with
Liger's Triton kernels for Llama (RMSNorm, RoPE, SwiGLU; the Trainer also its fused linear
cross-entropy).

`--prepare DIR` writes the tokenised examples and the converted base to DIR and stops, and
`--prepared DIR` runs from such a folder: a machine without the project's services (a GPU box) can
run the bench from what another machine prepared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("tunewright", "hf-trainer")


# ---------------------------------------------------------------- preparation (parent process)

def prepare(recipe_path: str, out: Path, steps: int) -> dict:
    """Stage 1 of the recipe, the base as a safetensors folder, and every batch tokenised, written to `out`."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tasks.data.prepare import prepare as stage1
    from tasks.finetune.loop import Batches
    from tasks.model import resolve_base
    from tunewright.chat import encode_example
    from tunewright.preference import sft_conversations
    from tunewright.recipe import load_recipe
    from tunewright.splits import read_split

    class Log:
        def info(self, msg, *a):
            print("prepare:", msg % a if a else msg, file=sys.stderr)

        warning = info

    recipe = load_recipe(recipe_path)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "state"
    summary = stage1(recipe.data, state, log=Log(), use_cache=False)
    base_dir, digest = resolve_base(recipe.model, state, Log())
    tok = AutoTokenizer.from_pretrained(base_dir)
    t = recipe.train
    train = [encode_example(tok, m, t.max_seq_len) for m in sft_conversations(read_split(summary["paths"]["train"]))]
    val = [encode_example(tok, m, t.max_seq_len) for m in sft_conversations(read_split(summary["paths"]["val"]))]
    draw = Batches(train, t.batch_size, recipe.environment.seed, tok.pad_token_id)  # the batches stage 4 draws
    batches = [draw.rows(i) for i in range(steps)]
    a = recipe.model.adapter
    spec = {
        "recipe": recipe.name, "base_digest": digest, "pad_id": tok.pad_token_id, "seed": recipe.environment.seed,
        "train": train, "val": val, "batches": batches,
        "lora": {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": a.target_modules},
        "optim": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
                  "scheduler": t.lr_scheduler, "warmup_steps": t.warmup_steps, "batch_size": t.batch_size,
                  "max_seq_len": t.max_seq_len},
    }
    (out / "examples.json").write_text(json.dumps(spec))
    link = out / "base"
    if not link.exists():
        link.symlink_to(Path(base_dir).resolve())
    return spec


# ---------------------------------------------------------------- workers (one fresh process each)

def _device_and_amp(device: str, precision: str):
    import torch

    dev = torch.device(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return dev, amp


def _peak_memory_mb(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def eval_loss(model, val: list[dict], pad_id: int, dev, amp, batch_size: int = 16) -> float:
    """Mean cross-entropy of the validation answers' tokens from the model's full logits (both trainers alike)."""
    import torch
    import torch.nn.functional as F

    from tunewright.chat import pad_batch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(val), batch_size):
            b = {k: v.to(dev) for k, v in pad_batch(val[i:i + batch_size], pad_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def _lora_model(spec: dict, base: str, dev, liger: bool, ours: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # the Trainer path gets Liger's fused linear cross-entropy too; ours projects answer positions itself
        apply_liger_kernel_to_llama(fused_linear_cross_entropy=not ours, cross_entropy=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(dev)
    lora = spec["lora"]
    torch.manual_seed(spec["seed"])  # the same initial adapter weights in both processes
    if ours:
        from tunewright.recipe import AdapterConfig
        from tunewright.train.methods import peft_config

        config = peft_config(AdapterConfig(method="lora", r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                           target_modules=lora["target_modules"]))
    else:
        config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_tunewright(spec: dict, base: str, device: str, precision: str, liger: bool, shared_prefix: bool = True) -> dict:
    import torch
    from transformers import get_scheduler

    from tunewright.chat import pad_batch
    from tunewright.train import attention, fused_lora, fused_rmsnorm, methods
    from tunewright.train.loss import Kernels, token_loss

    dev, amp = _device_and_amp(device, precision)
    net = _lora_model(spec, base, dev, liger, ours=True)
    attention.use_for_training(net.get_base_model(), dev)  # what `methods.load_base` does for stage 4
    fused_rmsnorm.use_for_training(net.get_base_model(), dev)
    if amp is not None:  # what `methods.build` does for stage 4
        methods.keep_adapter_inputs_in_autocast_dtype(net)
        methods.frozen_linear_weights_in_autocast_dtype(net, precision)
    fused_lora.use_for_training(net, dev)
    net.train()
    o = spec["optim"]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = methods.optimizer(params, o["lr"], o["weight_decay"])
    sched = get_scheduler(o["scheduler"], opt, num_warmup_steps=o["warmup_steps"],
                          num_training_steps=len(spec["batches"]))
    losses, marks = [], []
    _sync(dev)
    t_start = time.perf_counter()
    for idx in spec["batches"]:
        batch = {k: v.to(dev, non_blocking=True) for k, v in pad_batch([spec["train"][i] for i in idx],
                                                                        spec["pad_id"]).items()}
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = token_loss(net, batch, kernels=Kernels(shared_prefix=shared_prefix))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, as stage 4's per-step logging does
        marks.append(time.perf_counter())
    return _result(spec, net, dev, amp, t_start, marks, losses)


def run_hf_trainer(spec: dict, base: str, device: str, precision: str, liger: bool) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    dev, amp = _device_and_amp(device, precision)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"  # as training scripts pad (and as tunewright's batches are)
    model = _lora_model(spec, base, dev, liger, ours=False)
    rows = [spec["train"][i] for idx in spec["batches"] for i in idx]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                                  "labels": r["labels"]} for r in rows])
    o = spec["optim"]
    marks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync(dev)
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):  # the batches in the order given, as the tunewright worker sees them
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=o["batch_size"], max_steps=len(spec["batches"]),
            learning_rate=o["lr"], lr_scheduler_type=o["scheduler"], warmup_steps=o["warmup_steps"],
            weight_decay=o["weight_decay"], max_grad_norm=o["max_grad_norm"], optim="adamw_torch",
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=dev.type == "cpu",
            logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], data_seed=spec["seed"],
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
            use_liger_kernel=liger,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[Clock()])
        _sync(dev)
        t_start = time.perf_counter()
        trainer.train()
    return _result(spec, trainer.model, dev, amp, t_start, marks, losses)


def _result(spec: dict, model, dev, amp, t_start: float, marks: list[float], losses: list[float]) -> dict:
    tokens = [sum(len(spec["train"][i]["input_ids"]) for i in idx) for idx in spec["batches"]]
    padded = [len(idx) * max(len(spec["train"][i]["input_ids"]) for i in idx) for idx in spec["batches"]]
    steps = [b - a for a, b in zip([t_start] + marks[:-1], marks)]
    timed = sum(steps[1:])
    n_total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_embedding = model.get_input_embeddings().weight.numel()
    peak = _peak_memory_mb(dev)
    return {
        "steps": len(steps), "wall_seconds": marks[-1] - t_start, "timed_seconds": timed,
        "median_step_seconds": statistics.median(steps[1:]), "first_step_seconds": steps[0],
        "step_seconds": steps,
        "effective_tokens_per_second": sum(tokens[1:]) / timed,
        "padding_share": 1 - sum(tokens) / sum(padded),
        "peak_memory_mb": peak, "final_train_loss": losses[-1] if losses else None,
        "val_loss": eval_loss(model, spec["val"], spec["pad_id"], dev, amp),
        "n_params": n_total, "n_trainable": n_trainable, "n_embedding": n_embedding,
    }


def worker(which: str, folder: str, device: str, precision: str, threads: int, variant: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    spec = json.loads(Path(folder, "examples.json").read_text())
    base = str(Path(folder, "base").resolve())
    if which == "tunewright":
        return run_tunewright(spec, base, device, precision, variant == "liger", variant != "no-shared-prefix")
    return run_hf_trainer(spec, base, device, precision, variant == "liger")


# ---------------------------------------------------------------- the comparison (parent process)

def _perf_module():
    """tasks/finetune/perf.py on its own (the package would import the whole stage and its services)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tunewright_perf", ROOT / "tasks" / "finetune" / "perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        kind = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2, no bf16"
    except OSError:
        kind = "?"
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":  # a CPU without bf16, emulated by capping the kernels
        kind = f"kernels capped to AVX2 by ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA, on a {kind} CPU"
    return f"{name} ({kind}), {os.cpu_count()} cores, torch {torch.__version__}"


def cpu_kind() -> str:
    """A short name of the CPU kind for result file names: amx, avx512bf16 or avx2."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        return "avx2"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    return "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else "avx2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--liger", action="store_true", help="also run both trainers with Liger kernels (CUDA)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="also run tunewright with the plain forward (every token of every row)")
    p.add_argument("--prepare", metavar="DIR", help="write the tokenised examples and base to DIR and stop")
    p.add_argument("--prepared", metavar="DIR", help="run from a folder --prepare wrote")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of every configuration (order reversed each round); the fastest round is reported")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    for k, v in {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}.items():
        os.environ.setdefault(k, v)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision
    if precision == "auto":
        flags = open("/proc/cpuinfo").read() if device == "cpu" else ""
        precision = "bf16" if device == "cuda" or "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"
    threads = os.cpu_count() or 1
    if args.worker:
        which, variant = args.worker.split(":")
        print(json.dumps(worker(which, args.folder, device, precision, threads, variant)))
        return
    tmp = None
    if args.prepared:
        folder = Path(args.prepared)
    else:
        folder = Path(args.prepare) if args.prepare else Path(tmp := tempfile.mkdtemp(prefix="vs-hf-"))
        prepare(args.recipe, folder, args.steps)
        if args.prepare:
            print(f"prepared {folder}")
            return
    spec = json.loads((folder / "examples.json").read_text())
    perf = _perf_module()
    flops_per_token, peak_flops = perf.flops_per_token, perf.peak_flops

    peak = peak_flops(device, precision, threads, size=4096 if device == "cuda" else 1024,
                      seconds=2.0 if device == "cuda" else 0.4)
    runs = [(w, "plain") for w in TRAINERS] + ([(w, "liger") for w in TRAINERS] if args.liger else [])
    if args.no_shared_prefix:
        runs.insert(1, ("tunewright", "no-shared-prefix"))
    rows = []
    for which, variant in runs:
        rows.append({"trainer": which, "variant": variant, "repeats": []})
    # rounds of every configuration, the order reversed each round, so that a slow spell of a shared machine
    # falls on both trainers; each configuration is reported by its fastest round
    for round_ in range(args.repeats):
        for row in (rows if round_ % 2 == 0 else rows[::-1]):
            which, variant = row["trainer"], row["variant"]
            cmd = [sys.executable, __file__, "--worker", f"{which}:{variant}", "--folder", str(folder),
                   "--device", device, "--precision", precision]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                sys.exit(f"{which} ({variant}) failed:\n{res.stderr[-4000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            fpt = flops_per_token(r["n_params"], r["n_trainable"], False, n_embedding=r["n_embedding"])
            r.update(process_seconds=time.perf_counter() - t0, mfu=r["effective_tokens_per_second"] * fpt / peak)
            row["repeats"].append(r)
            print(f"round {round_ + 1}/{args.repeats} {which} ({variant}): {r['effective_tokens_per_second']:.0f} "
                  f"tokens/s, val loss {r['val_loss']:.4f}", file=sys.stderr)
    for row in rows:
        best = max(row["repeats"], key=lambda r: r["effective_tokens_per_second"])
        row.update({k: v for k, v in best.items()},
                   rounds_tokens_per_second=[r["effective_tokens_per_second"] for r in row["repeats"]])
    ref = {v: next(r for r in rows if r["trainer"] == "hf-trainer" and r["variant"] == (v if v == "liger" else "plain"))
           for _, v in runs}
    desc = machine(device)
    lines = [f"# tunewright vs HF Trainer + PEFT: {spec['recipe']}, LoRA r{spec['lora']['r']}, "
             f"batch {spec['optim']['batch_size']}, {len(spec['batches'])} steps, {precision}",
             f"# machine: {desc}; matmul peak measured in this run {peak / 1e12:.2f} TFLOP/s", "",
             "| trainer | kernels | effective tokens/s | vs HF Trainer | each round | wall (s) | median step (s) | "
             "peak memory (MB) | final train loss | val loss | val loss vs HF Trainer | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = ref[r["variant"]]
        lines.append(
            f"| {r['trainer']} | {r['variant']} | {r['effective_tokens_per_second']:,.0f} | "
            f"{r['effective_tokens_per_second'] / h['effective_tokens_per_second']:.2f}x | "
            f"{' / '.join(f'{v:,.0f}' for v in r['rounds_tokens_per_second'])} | {r['wall_seconds']:.1f} | "
            f"{r['median_step_seconds']:.3f} | {r['peak_memory_mb']:,.0f} | {r['final_train_loss']:.4f} | "
            f"{r['val_loss']:.4f} | {100 * (r['val_loss'] / h['val_loss'] - 1):+.2f}% | {100 * r['mfu']:.1f}% |")
    lines += ["", f"Tokens/s counts non-padding tokens of steps 2..{len(spec['batches'])} (step 1 is a warm-up), "
              f"best of {args.repeats} rounds (each round: every configuration in a fresh process, the order reversed "
              f"from round to round); "
              f"padding was {100 * rows[0]['padding_share']:.1f}% of the padded batches. Val loss: mean "
              f"cross-entropy of the answer tokens of {len(spec['val'])} validation examples. MFU counts the "
              f"model FLOPs of every effective token (forward and backward through every linear layer, as the "
              f"Trainer runs them) against the measured peak: work tunewright skips (the shared prefix after its "
              f"first row, padding) is counted as done, so its figure can pass 100%."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vs-hf-trainer-{'gpu' if device == 'cuda' else 'cpu-' + cpu_kind()}-{precision}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": desc, "peak_flops": peak, "precision": precision,
                                                  "steps": len(spec["batches"]), "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
