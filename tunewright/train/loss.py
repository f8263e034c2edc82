"""The answer-only loss every objective trains on: cross-entropy of the answer tokens, per token or per row.

Prompt positions never reach the vocabulary projection (`cross_entropy.chunked_cross_entropy`), and the decoder
call skips what it can (`forward`): which of those paths a call may take is a `Kernels` value the caller passes,
built once by stage 4's loop from the recipe and the launcher (ZeRO-3 ranks turn some off), never a switch held by
the process. Each path still stands aside by itself where a batch or model does not allow it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tunewright.chat import encode_example, pad_batch
from tunewright.train.cross_entropy import LOGIT_CHUNK_TOKENS, chunked_cross_entropy
from tunewright.train.forward import (checkpointing, decode_after_shared_prefix, decode_unpadded, shared_prefix_length,
                                      unpadded_applies)


@dataclass(frozen=True)
class Kernels:
    """Which of the step's speed-ups a loss call may use.

    `shared_prefix`: run the prompt tokens every row shares through the decoder once. `unpadded`: decode the
    batch's real tokens as one sequence (the CPU attention). `last_layer_rows`: in that unpadded call, the last
    layer's per-position parts only at positions that reach the loss. `logit_chunk`: positions projected onto
    the vocabulary at a time; 0 projects them all in one call, which ZeRO-3 needs (every head call there gathers
    the head's weights across ranks, so all ranks must make the same number of calls).
    """

    shared_prefix: bool = True
    unpadded: bool = True
    last_layer_rows: bool = True
    logit_chunk: int = LOGIT_CHUNK_TOKENS

    def in_one_head_call(self) -> Kernels:
        """The same paths with every position projected in one head call (scoring without gradients)."""
        return replace(self, logit_chunk=0)


def token_loss(model: Any, batch: dict[str, Any], reduction: str = "mean", focal_gamma: float = 0.0,
               kernels: Kernels = Kernels()) -> Any:
    """Cross-entropy over answer tokens, optionally focal and weighted per token.

    Models whose head is not a plain projection (soft-capped or scaled logits) and prompt-learning adapters go
    through the full forward. `focal_gamma` > 0 down-weights tokens the model already predicts well,
    (1 - p)^gamma; a `token_weight` tensor in the batch (class weights) scales each token's loss.
    """
    import torch

    losses, selected = token_losses(model, batch, kernels)
    if focal_gamma:
        losses = (1 - torch.exp(-losses)).pow(focal_gamma) * losses
    weights = batch["token_weight"][:, 1:][selected] if "token_weight" in batch else torch.ones_like(losses)
    total = (losses * weights).sum()
    return total if reduction == "sum" else total / weights.sum().clamp_min(1e-12)


def token_losses(model: Any, batch: dict[str, Any], kernels: Kernels = Kernels()) -> tuple[Any, Any]:
    """Cross-entropy of every answer token (labels != -100), flat, and the (rows, width - 1) mask that selected them."""
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_cfg = getattr(model, "active_peft_config", None)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings()
    special_head = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    labels = batch["labels"][:, 1:]
    selected = labels != -100
    packed = "position_ids" in batch
    inputs = {"input_ids": batch["input_ids"], "use_cache": False,
              "attention_mask": None if packed else batch["attention_mask"]}
    if packed:
        inputs["position_ids"] = batch["position_ids"]
    if getattr(peft_cfg, "is_prompt_learning", False) or decoder is None or head is None or special_head:
        if packed:
            raise ValueError("train.packing needs a LoRA-family, IA3, full or hft method (soft prompts cannot be packed)")
        logits = model(**inputs).logits
        logits = logits[:, -batch["input_ids"].shape[1]:][:, :-1][selected]  # drop soft-prompt positions
        return F.cross_entropy(logits.float(), labels[selected], reduction="none"), selected
    share = kernels.shared_prefix and not packed and not checkpointing(lm)
    prefix = shared_prefix_length(batch) if share else 0
    if not packed and kernels.unpadded and unpadded_applies(lm, batch["attention_mask"]):
        hidden = decode_unpadded(decoder, batch, selected, prefix, kernels.last_layer_rows)
    elif prefix:
        hidden = decode_after_shared_prefix(decoder, batch, prefix)[:, :-1][selected[:, prefix:]]
    else:
        hidden = decoder(**inputs).last_hidden_state[:, :-1][selected]
    return chunked_cross_entropy(head, hidden, labels[selected], kernels.logit_chunk), selected


def sequence_logps(model: Any, batch: dict[str, Any], kernels: Kernels = Kernels()) -> tuple[Any, Any]:
    """Summed log-probability of each row's answer tokens, and how many answer tokens each row has."""
    import torch

    losses, selected = token_losses(model, batch, kernels)
    rows = torch.arange(selected.shape[0], device=selected.device).unsqueeze(1).expand_as(selected)[selected]
    logps = torch.zeros(selected.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)
    return logps, selected.sum(dim=1)


def answer_loss(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
                max_len: int, batch_size: int, autocast_dtype: Any = None,
                tools: list[list[dict] | None] | None = None) -> float:
    """Mean cross-entropy per answer token (teacher forcing), the loss training minimises (`tools`: each
    conversation's declared tools, or None)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    tools = tools or [None] * len(conversations)
    encoded = [encode_example(tokenizer, c, max_len, t) for c, t in zip(conversations, tools)]
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id).items()}
        with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            total += float(token_loss(model, batch, reduction="sum"))
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)
