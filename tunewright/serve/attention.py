"""Attention for transformers' batching engine on a CPU, request by request instead of over the whole batch.

With SDPA (the engine's only choice on a CPU), transformers packs every running request into one sequence and
runs a single attention over it with a block-diagonal mask: each query token is scored against the keys of every
request in the batch, and most of those scores are then masked away. The work grows with the square of the
number of requests, so under load attention, not the linear layers, becomes most of a CPU engine's time.

`varlen_sdpa` computes the same attention one request at a time in effect: requests with a single new token
(decoding) together, each against its own keys only (gathered into a padded batch, the padding masked), and
requests with several new tokens (a prompt, or the part of it not already in the cache) each on its own, causal
with the offset of the keys already cached. The work is then linear in the number of requests. Anything this
does not cover (a sliding window, attention sinks, a position bias, softcapping, dropout, an accelerator, a
forward without the engine's paged cache) goes to transformers' own SDPA function unchanged.

`install()` puts it in front of transformers' `sdpa` entry for the process (the served models are the only
models a server runs); `TUNEWRIGHT_CPU_ATTENTION=masked` keeps transformers' masked attention instead.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tunewright.serve")

_original = None       # transformers' sdpa_attention_forward, once installed
_plans: dict = {}      # (cu_seq_lens_q, cu_seq_lens_k) -> plan; one step's layers share one plan


def _plan(cu_q: list[int], cu_k: list[int]):
    """Which requests decode one token (gathered together) and which run several (each on its own), the gather
    index and padding mask of the decoding ones, and each other's causal mask (None when nothing is cached)."""
    import torch

    decode, several = [], []
    for r in range(len(cu_q) - 1):
        q_len = cu_q[r + 1] - cu_q[r]
        if q_len == 1:
            decode.append(r)
        elif q_len > 1:
            k_len = cu_k[r + 1] - cu_k[r]
            # keys already cached come first: query i sees keys up to i + (k_len - q_len)
            mask = (torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
                    if k_len != q_len else None)
            several.append((cu_q[r], cu_q[r + 1], cu_k[r], cu_k[r + 1], mask))
    gather = None
    if decode:
        starts = torch.tensor([cu_k[r] for r in decode])
        lengths = torch.tensor([cu_k[r + 1] - cu_k[r] for r in decode])
        width = int(lengths.max())
        offsets = torch.arange(width)
        valid = offsets[None, :] < lengths[:, None]
        index = torch.where(valid, starts[:, None] + offsets[None, :], starts[:, None])
        positions = torch.tensor([cu_q[r] for r in decode])
        gather = (positions, index, valid[:, None, None, :])
    return gather, several


def _plan_for(cu_q, cu_k):
    key = (tuple(cu_q.tolist()), tuple(cu_k.tolist()))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 8:  # a step's layers share one; older steps never come back
            _plans.clear()
        plan = _plans[key] = _plan(list(key[0]), list(key[1]))
    return plan


def _supported(module, query, dropout, position_bias, kwargs) -> bool:
    return (query.device.type == "cpu" and not dropout and position_bias is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False) and getattr(module, "sliding_window", None) is None
            and not hasattr(module, "sinks") and query.shape[0] == 1)


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, position_bias=None, cache=None, **kwargs):
    """transformers' attention-function signature; query [1, heads, tokens, dim], keys and values [1, kv heads,
    tokens, dim] before the cache adds the requests' earlier tokens. Returns ([1, tokens, heads, dim], None)."""
    import torch
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    if not isinstance(cache, PagedAttentionCache) or not _supported(module, query, dropout, position_bias, kwargs):
        return _original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, position_bias=position_bias, cache=cache, **kwargs)
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    gather, several = _plan_for(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim], [kv heads, keys, dim]
    out = query.new_zeros(heads, tokens, value.shape[-1])  # padding tokens (if any) get zeros
    if gather is not None:
        positions, index, valid = gather
        batch = len(positions)
        # queries of one kv head's group side by side: [requests, kv heads, group, dim]
        qd = q[:, positions].view(kv_heads, group, batch, dim).permute(2, 0, 1, 3)
        kd = k[:, index].permute(1, 0, 2, 3)  # [requests, kv heads, longest, dim]
        vd = v[:, index].permute(1, 0, 2, 3)
        od = sdpa(qd, kd, vd, attn_mask=valid, scale=scaling)  # [requests, kv heads, group, dim]
        out[:, positions] = od.permute(1, 2, 0, 3).reshape(heads, batch, -1)
    for q0, q1, k0, k1, mask in several:
        o = sdpa(q[None, :, q0:q1], k[None, :, k0:k1], v[None, :, k0:k1], attn_mask=mask, scale=scaling,
                 is_causal=mask is None, enable_gqa=group > 1)
        out[:, q0:q1] = o[0]
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def install() -> bool:
    """Answer the engine's SDPA calls on a CPU with `varlen_sdpa` (idempotent); False when switched off."""
    global _original
    choice = os.environ.get("TUNEWRIGHT_CPU_ATTENTION", "varlen").lower()
    if choice not in ("varlen", "masked"):
        raise ValueError(f"TUNEWRIGHT_CPU_ATTENTION={choice!r}: use varlen or masked")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if choice == "masked":
        if _original is not None:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _original
            _original = None
        return False
    if _original is None:
        _original = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = varlen_sdpa
        log.info("batching engine on the CPU: attention request by request (TUNEWRIGHT_CPU_ATTENTION=masked for "
                 "transformers' masked attention over the whole batch)")
    return True
