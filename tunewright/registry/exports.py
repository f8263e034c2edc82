"""Deployment exports of a fine-tuned adapter: merged full weights, and 8-bit weights.

`merged`: the adapter folded into the base, saved as safetensors with the tokenizer: a plain Hugging Face
model folder any runtime loads (transformers, `tunewright serve`, vLLM, llama.cpp's converter).
`int8`: the merged model quantised to 8-bit with bitsandbytes (LLM.int8) and saved with its
`quantization_config`, so `from_pretrained` loads it 8-bit again.

Each export answers test prompts beside the adapter it came from, and the share of identical answers is
its agreement; an export below the recipe's floor fails the stage before anything is registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPORT_KINDS = ("merged", "int8")


@dataclass(frozen=True)
class Export:
    kind: str
    folder: str
    agreement: float          # share of check prompts answered exactly as the adapter answers them
    bytes: int
    mismatches: list          # (prompt, adapter's answer, export's answer) for the first few that differ


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def export_adapter(kinds: list[str], base_dir: str, adapter_dir: str, out: Path, convs: list, *,
                   max_new_tokens: int, batch_size: int, log) -> list[Export]:
    """Write the asked exports under `out/<kind>` and measure each one's agreement with the adapter on `convs`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tunewright.chat import generate

    tokenizer = AutoTokenizer.from_pretrained(
        adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    net = PeftModel.from_pretrained(base, adapter_dir).eval()
    if net.active_peft_config.is_prompt_learning:
        raise ValueError(f"deploy.exports: a {net.active_peft_config.peft_type} adapter (virtual tokens) has no "
                         "weights to fold into the base; export needs a LoRA-family or IA3 adapter")
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    expected = generate(net, tokenizer, convs, **gen)
    merged_dir = out / "merged"
    merged = net.merge_and_unload().eval()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    del net, base
    results = []

    def measure(kind: str, folder: Path, model) -> Export:
        got = generate(model, tokenizer, convs, **gen)
        same = [a == b for a, b in zip(expected, got)]
        diff = [(c[-1]["content"], a, b) for c, a, b, s in zip(convs, expected, got, same) if not s][:3]
        export = Export(kind, str(folder), sum(same) / max(len(same), 1), _size(folder), diff)
        log.info("export %s: %.1f MB at %s, answers %d/%d check prompts as the adapter does", kind,
                 export.bytes / 1e6, folder, sum(same), len(same))
        return export

    if "merged" in kinds:
        # loaded back from disk, as a runtime would
        results.append(measure("merged", merged_dir, AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32).eval()))
    del merged
    if "int8" in kinds:
        int8_dir = out / "int8"
        quantised = AutoModelForCausalLM.from_pretrained(
            merged_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map={"": "cuda" if torch.cuda.is_available() else "cpu"})
        quantised.save_pretrained(int8_dir, safe_serialization=True)
        tokenizer.save_pretrained(int8_dir)
        del quantised
        results.append(measure("int8", int8_dir, AutoModelForCausalLM.from_pretrained(
            int8_dir, device_map={"": "cuda" if torch.cuda.is_available() else "cpu"}).eval()))
    return results
