"""Paraphrase augmentation: a causal language model the recipe names rewrites user turns.

Only used when `data.balance.augment_method` is `paraphrase` and `paraphrase_model` names a
model (a local folder in Hugging Face layout, a .gguf file, or the embedded base); nothing is
downloaded. A rewrite is kept only when it is new text and still carries every word of the user
turn that the answer depends on (ids, numbers, names the answer repeats); the rest are counted
as rejected with their reason, so the report says how well the model paraphrased.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from tunewright.recipe import EMBEDDED_BASE

INSTRUCTION = ("Rewrite the customer's message below in different words. Keep every name, number, id and "
               "fact exactly as written. Reply with the rewritten message only.")
_WORD = re.compile(r"\w+")


def load(name: str, state: Path):
    """(model, tokenizer) of the named paraphrase model, on the CPU, in evaluation mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunewright.tokenizer import converted_gguf, embedded_gguf

    if name == EMBEDDED_BASE or name.endswith(".gguf"):
        gguf = embedded_gguf() if name == EMBEDDED_BASE else Path(name).expanduser()
        converted = converted_gguf(gguf, state)  # stage 2's converted copy loads far faster
        if converted is not None:
            name = str(converted)
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            return model.eval(), tok
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.balance.paraphrase_model: {name} is not a local model folder or .gguf file "
                                f"(nothing is downloaded at run time)")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tok


def keeps(original: str, rewrite: str, protected: set[str]) -> str | None:
    """Why a rewrite is rejected, or None when it is kept."""
    text = rewrite.strip()
    if not text:
        return "empty"
    if " ".join(text.lower().split()) == " ".join(original.lower().split()):
        return "unchanged"
    needed = {w for w in _WORD.findall(original.lower()) if w in protected}
    missing = needed - set(_WORD.findall(text.lower()))
    if missing:
        return "lost " + ", ".join(sorted(missing)[:3])
    if len(text) > 3 * len(original) + 40:
        return "too long"
    return None


class Paraphraser:
    """Rewrites user turns with the named model, greedy or sampled under the recipe's seed."""

    def __init__(self, name: str, state: Path, seed: int, max_new_tokens: int = 128, temperature: float = 0.7):
        self.model, self.tok = load(name, state)
        self.seed, self.max_new_tokens, self.temperature = seed, max_new_tokens, temperature
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def rewrite(self, text: str, attempt: int) -> str:
        import torch

        msgs = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        else:
            ids = self.tok(f"{INSTRUCTION}\n\n{text}\n\nRewritten:", return_tensors="pt")
        torch.manual_seed(self.seed * 1_000_003 + attempt)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                      temperature=self.temperature or None, top_p=0.95 if self.temperature else None,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def augmented(ex: dict, para: Paraphraser, protected: set[str], attempt: int, rng: random.Random) -> tuple[dict | None, str | None]:
    """(a copy of the example with its user turns rewritten, None) or (None, why it was rejected)."""
    messages = []
    for m in ex["messages"]:
        if m["role"] != "user":
            messages.append(dict(m))
            continue
        new = para.rewrite(m["content"], attempt * 7919 + rng.randrange(1 << 16))
        why = keeps(m["content"], new, protected)
        if why is not None:
            return None, why
        messages.append({**m, "content": new})
    return {**ex, "messages": messages}, None
