"""Sentence embeddings from a causal LM, computed locally: the mean of the last hidden state over each text's tokens.

Stage 7 embeds training prompts and served prompts with the base model to measure drift in meaning, not only in
length or wording; nothing leaves the machine.
"""

from __future__ import annotations

from pathlib import Path


def embed(model_dir: str | Path, texts: list[str], *, batch_size: int = 16, max_len: int = 256):
    """A (len(texts), hidden) float32 array."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_len)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype="float32")
