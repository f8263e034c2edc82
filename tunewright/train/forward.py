"""Decoder paths of the answer-only loss: the work a training step can skip and still give the plain forward's
loss and gradients.

Three things are skipped where they can be: the prompt tokens every row of a batch shares run once, not once per
row (`shared_prefix_length`, `decode_after_shared_prefix`); padding runs nowhere (`decode_unpadded`, with the CPU
attention of `tunewright.train.attention`); and in the last layer, positions whose hidden state nothing reads
give only their keys and values (`last_layer_rows_only`). `tunewright.train.loss` decides which applies to a
batch, from the `Kernels` the caller passes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from tunewright.train import attention
from tunewright.train.fused_lora import routed


# A batch whose rows all begin with the same prompt tokens (the demo's system prompt is about half of
# every example) runs those tokens through the decoder once, not once per row: the shared prefix's keys
# and values, computed for one row, are expanded (a view) to every row, and the rest of each row attends
# to them as to a KV cache. Autograd sums the rows' gradients back through the expansion, so loss and
# gradients are those of the plain forward (tests/test_shared_prefix.py). Used only where the prefix's
# own positions need no logits (it ends before any row's first answer token) and it is at least
# MIN_SHARED_PREFIX tokens; not with packed rows (their positions restart), gradient checkpointing (no
# cache there), soft prompts, or under ZeRO-3 (ranks must make the same calls; `loss.Kernels.shared_prefix`).
MIN_SHARED_PREFIX = 16


def shared_prefix_length(batch: dict[str, Any]) -> int:
    """How many leading positions every row shares, with no answer label on them or right after them; 0 if
    too few to be worth a second decoder call."""
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & (labels == -100).all(0) & (mask == 1).all(0)
    run = int(torch.cumprod(same.int(), 0).sum())
    prefix = run - 1  # the last shared position's label is the next token's: it must be a prompt token too
    return prefix if prefix >= MIN_SHARED_PREFIX and prefix < ids.shape[1] - 1 else 0


def checkpointing(lm: Any) -> bool:
    """Whether `lm` recomputes its layers in backward (nothing cached or patched can be relied on there)."""
    return bool(getattr(lm, "is_gradient_checkpointing", False)) and lm.training


def decode_after_shared_prefix(decoder: Any, batch: dict[str, Any], prefix: int) -> Any:
    """Last hidden states of positions `prefix`.. of every row, the first `prefix` computed once for all rows: their
    keys and values, one row's, expanded (views) to every row as its cache."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    cache = decoder(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    positions = torch.arange(prefix, width, device=ids.device)
    out = decoder(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=cache,
                  position_ids=positions.unsqueeze(0).expand(rows, -1), cache_position=positions, use_cache=True)
    return out.last_hidden_state


# On the CPU a batch's padding costs as much as real tokens in every linear layer: after the shared prefix the
# demo's rows are about a fifth padding. With the `tunewright_cpu` attention the decoder runs the batch unpadded:
# its rows' real tokens after the prefix concatenated into one sequence (positions kept), so the linear layers,
# norms and MLPs see no padding, and only the attention puts the rows back apart (`attention.Unpadded`). Loss and
# gradients are those of the padded call (tests/test_unpadded.py). Not for packed rows (no padding), left-padded
# batches, or models with sliding-window or other per-layer attention patterns.


def unpadded_applies(lm: Any, mask: Any) -> bool:
    """Whether a batch with `mask` can be decoded unpadded by `lm` (right-padded rows, the CPU attention, every
    layer attending to the full sequence)."""
    config = lm.config
    if getattr(config, "_attn_implementation", None) not in attention.unpadded_names():
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    return mask.shape[0] > 1 and bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())


def decode_unpadded(decoder: Any, batch: dict[str, Any], selected: Any, prefix: int,
                    last_layer_rows: bool = True) -> Any:
    """Last hidden states at the selected (answer-predicting) positions, in the row-major order of `selected`, from
    one decoder call over one sequence: the shared `prefix` once, then each row's real tokens after it up to its
    last selected position (a later token reaches no loss, attention being causal: a row's closing token is only
    a label). `last_layer_rows`: the last layer's per-position parts run on the read positions alone
    (`last_layer_rows_only`)."""
    import torch
    import torch.nn.functional as F

    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    predicts = F.pad(selected, (0, 1))  # (rows, width): position j predicts token j + 1
    trim = bool(predicts.any()) and not rope_reads_length(decoder.config)
    needed = predicts.flip(1).cumsum(1).flip(1) > 0 if trim else torch.ones_like(predicts)
    real = (mask.bool() & needed)[:, prefix:]
    tokens = ids[:, prefix:][real]
    positions = torch.arange(prefix, width, device=ids.device).expand_as(ids[:, prefix:])[real]
    if prefix:  # the prefix's tokens lead the sequence, decoded once for all rows
        tokens = torch.cat([ids[0, :prefix], tokens])
        positions = torch.cat([torch.arange(prefix, device=ids.device), positions])
    layout = attention.Unpadded(real.sum(1), prefix)
    used = predicts[:, prefix:][real].nonzero().squeeze(1) + prefix  # the positions whose last hidden state is read
    with last_layer_rows_only(decoder, used) if last_layer_rows else contextlib.nullcontext():
        # an all-ones mask: the model builds no mask of its own (the layout is the mask), and does not read the
        # positions restarting at each row as packed sequences
        hidden = decoder(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                         attention_mask=torch.ones_like(tokens, dtype=torch.bool)[None],
                         **{attention.UNPADDED_KWARG: layout}).last_hidden_state[0]
    return hidden[used]


def rope_reads_length(config: Any) -> bool:
    """Whether the model's rotary embedding depends on the longest position in the call (dynamic NTK, LongRoPE):
    there the rows keep their trailing tokens, so that the call's longest position is the padded batch's."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found = [params] + [v for v in params.values() if isinstance(v, dict)] if isinstance(params, dict) else []
    return any(p.get("rope_type", p.get("type")) in ("dynamic", "longrope") for p in found)


# In the decoder's last layer a position whose hidden state is not read (a prompt token) is needed only for its key
# and value: there the query projection, the attention's output projection and the MLP run on the read positions
# alone, the others getting zeros that nothing reads (the same loss and gradients: tests/test_unpadded.py). For
# layers of the Llama form (self_attn.q_proj and o_proj, a dense gate/up/down MLP; each works position by position);
# a mixture-of-experts MLP (its routing and auxiliary loss see every token), any other form, or gradient
# checkpointing (backward recomputes the layer) keeps the full call.


def last_layer_rows_why_not(decoder: Any) -> str:
    """Why `decoder`'s last layer cannot compute its per-position parts at the read positions alone; '' if it can."""
    layers = getattr(decoder, "layers", None)
    n_layers = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    layer = layers[-1] if layers is not None and len(layers) and n_layers == len(layers) else None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if checkpointing(decoder):
        return "gradient checkpointing recomputes the layer in backward"
    if layer is None or any(getattr(attn, name, None) is None for name in ("q_proj", "o_proj")) or mlp is None:
        return "the layer is not of the Llama form"
    if any(hasattr(mlp, name) for name in ("experts", "router", "gate")):
        return "a mixture-of-experts MLP routes every token"
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return "the MLP is not a dense gate/up/down one"
    return ""


@contextlib.contextmanager
def last_layer_rows_only(decoder: Any, index: Any) -> Any:
    """While open, `decoder`'s last layer computes its per-position parts at sequence positions `index` only
    (one sequence: hidden states of shape (1, positions, width)). Yields whether it applies."""
    if last_layer_rows_why_not(decoder):
        yield False
        return
    layer = decoder.layers[-1]
    modules = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp]
    if any(routed(m, _rows_only) for m in modules):  # already open
        yield False
        return
    own = []
    try:
        for m in modules:
            own.append(m.__dict__.get("forward"))
            m.forward = functools.partial(_rows_only, m.forward, index)
        yield True
    finally:
        for m, forward in zip(modules, own):
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


def _rows_only(forward: Any, index: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or x.dim() != 3 or x.shape[0] != 1:
        return forward(x, *args, **kwargs)
    y = forward(x.index_select(1, index))
    return y.new_zeros(*x.shape[:-1], y.shape[-1]).index_copy(1, index, y)
