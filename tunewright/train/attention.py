"""Attention for training on the CPU: the arithmetic of transformers' eager attention, without its copies.

Chat rows are short after their shared prefix, and for short rows torch's fused CPU kernel for scaled
dot-product attention spends most of its time in backward; the plain product-softmax-product is cheaper there. This module registers `tunewright_cpu` with transformers'
attention and mask interfaces, for the model stage 4 trains (its forwards with and without gradients alike,
so that a reference model's log-probabilities and the policy's are the same arithmetic): where the
attention matrices are small it computes

    softmax(q k^T * scaling + mask) v

in the compute dtype (autocast's, where it is on). The product that makes the scores also scales them and adds
the mask (an additive mask laid down first); the softmax accumulates in fp32 as eager's does and writes its
probabilities straight in the compute dtype, which eager casts them to. The forward is eager's arithmetic (to
the bit where the scaling is a power of two, as with 64-wide heads); backward differs only in reading 16-bit
probabilities where eager kept fp32 ones. The query heads that share a key/value head are multiplied as one
matrix (no `repeat_kv` copies of the keys and values). Everything else (long rows, dropout, sliding windows,
soft-capping, attention sinks) goes to transformers' own sdpa path unchanged. The masks are sdpa's.
Evaluation and serving load their models with sdpa.
"""

from __future__ import annotations

from typing import Any

from tunewright.train.fused_lora import compute_dtype

NAME = "tunewright_cpu"
VARLEN_NAME = "tunewright_varlen"  # CUDA training: padding-free batches through the variable-length kernel
# attention matrices (rows x query heads x queries x keys, all layers of one forward) above this many
# elements go to sdpa: the plain path keeps its fp32 probabilities for backward (4 bytes each)
MAX_SCORE_ELEMENTS = 96 * 2**20
_REGISTERED = False


def register() -> str:
    """Register the attention function and its mask builder with transformers (once); the implementation name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, lambda *args, **kwargs: attention(*args, **kwargs))
        AttentionMaskInterface.register(NAME, sdpa_mask)
        AttentionInterface.register(VARLEN_NAME, lambda *args, **kwargs: attention_varlen(*args, **kwargs))
        AttentionMaskInterface.register(VARLEN_NAME, sdpa_mask)
        _REGISTERED = True
    return NAME


def varlen_kernel() -> Any:
    """torch's variable-length (FlashAttention) kernel, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def use_for_training(model: Any, device: Any, log: Any = None) -> bool:
    """Switch a model that would train with sdpa to `tunewright_cpu` on the CPU, or on CUDA to `tunewright_varlen`
    (where torch has the variable-length kernel); True when switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if device.type == "cpu":
        name = NAME
    elif device.type == "cuda" and varlen_kernel() is not None:
        name = VARLEN_NAME
    else:
        return False
    register()
    model.set_attn_implementation(name)
    if log is not None:
        log.info("attention: %s for training (%s)", name, "plain product-softmax-product for short rows, sdpa for "
                 "long ones" if name == NAME else "padding-free batches through the variable-length kernel")
    return True


def unpadded_names() -> tuple[str, str]:
    """The attention implementations a batch can be decoded unpadded with."""
    return NAME, VARLEN_NAME


def _plain_applies(module: Any, query: Any, key: Any, attention_mask: Any, dropout: float, kwargs: dict) -> bool:
    import torch

    if dropout or query.device.type != "cpu":
        return False
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")):
        return False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return False
    rows, heads, queries, _ = query.shape
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", 1)
    if rows * heads * queries * key.shape[2] * layers > MAX_SCORE_ELEMENTS:
        return False
    return query.shape[1] % key.shape[1] == 0


def _dense(x: Any, dtype: Any) -> Any:
    """x in `dtype` and contiguous, with at most one copy."""
    import torch

    if x.dtype == dtype:
        return x.contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format)


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature: query (rows, heads, queries, dim), key and value (rows,
    kv heads, keys, dim); returns (rows, queries, heads, dim) and no weights."""
    import torch

    rows_layout = kwargs.pop(UNPADDED_KWARG, None)
    if rows_layout is not None:
        return _attend_unpadded(module, query, key, value, rows_layout, dropout, scaling, kwargs)
    if not _plain_applies(module, query, key, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    dtype = compute_dtype(query)  # as the matmuls eager makes would be cast
    # the `group` query heads of one key/value head, stacked: one product per key/value head
    q = _dense(query, dtype).view(rows * kv_heads, group * queries, dim)
    k_t = _dense(key, dtype).view(rows * kv_heads, keys, dim).transpose(1, 2)
    v = _dense(value, dtype).view(rows * kv_heads, keys, dim)
    if attention_mask is None:
        if queries > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
            past = keys - queries
            allowed = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(past)[None, None, None]
        else:
            allowed = None
    else:
        allowed = attention_mask[:, :, None, :, :keys]  # (rows or 1, 1, 1, queries, keys)
    # scores = scaling * q k^T + mask, written by one product: the additive mask (0 where allowed, the dtype's
    # lowest value elsewhere) is laid down first and the product scaled and added onto it
    scores = q.new_empty(rows * kv_heads, group * queries, keys)
    if allowed is None:
        scores = torch.baddbmm(scores, q, k_t, beta=0, alpha=scale)
    else:
        lowest = torch.finfo(scores.dtype).min
        bias = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(~allowed, lowest)
        scores.view(rows, kv_heads, group, queries, keys).copy_(bias.expand(rows, kv_heads, group, queries, keys))
        scores = scores.baddbmm_(q, k_t, alpha=scale)
    # the softmax accumulates in fp32 whatever the dtype (as eager's fp32 softmax does); in a 16-bit compute
    # dtype it writes the probabilities in that dtype directly, which is what eager casts them to
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v)
    return out.view(rows, heads, queries, dim).transpose(1, 2).contiguous(), None


# An unpadded decoder call (`forward.decode_unpadded`): one sequence holding the shared prefix's tokens once, then
# the rows of a right-padded batch after that prefix, concatenated without their padding, so that the linear
# layers, norms and MLPs (most of a step) see no padded position and the prefix is multiplied with every other
# token in the same products. Only attention needs the rows apart: `attention` attends the prefix causally to
# itself, puts the rows' queries, keys and values back into the padded layout, attends there (each row to the
# prefix's keys and to its own earlier tokens) and returns every position in the sequence's order. The model's
# own mask is not used.
UNPADDED_KWARG = "tunewright_rows"


class Unpadded:
    """The layout of one unpadded call: a `prefix` every row attends to, then `lengths[r]` tokens of row r."""

    def __init__(self, lengths: Any, prefix: int):
        import torch

        self.rows, self.width, self.prefix = len(lengths), int(lengths.max()), prefix
        self.lengths, self._varlen = lengths, None
        pos = torch.arange(self.width, device=lengths.device)
        valid = pos < lengths[:, None]  # (rows, width)
        self.index = valid.flatten().nonzero().squeeze(1)  # each real position's place in the padded layout
        own = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # causal, real keys only
        self.mask = torch.cat([own.new_ones(self.rows, self.width, prefix), own], 2)[:, None]

    def varlen(self) -> tuple[Any, Any, Any, int, int]:
        """The call as variable-length segments: the prefix attending causally to itself, then each row's tokens
        attending to the prefix's keys and their own (the causal mask aligned to the segment's last key).
        (key index: each segment's keys as positions of the sequence, cu_seq_q, cu_seq_k, max_q, max_k)."""
        import torch

        if self._varlen is None:
            lengths = self.lengths
            device = lengths.device
            p = self.prefix
            prefix = torch.arange(p, device=device)
            starts = p + torch.cumsum(lengths, 0) - lengths
            keys = [prefix] if p else []
            for start, n in zip(starts.tolist(), lengths.tolist()):
                keys += [prefix, torch.arange(start, start + n, device=device)] if p else \
                    [torch.arange(start, start + n, device=device)]
            q_lens = ([p] if p else []) + lengths.tolist()
            k_lens = ([p] if p else []) + [p + n for n in lengths.tolist()]
            cu_q = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
            cu_k = torch.tensor([0, *k_lens], device=device).cumsum(0).to(torch.int32)
            index = torch.cat(keys) if p else None  # without a prefix every segment's keys are its own queries'
            self._varlen = (index, cu_q, cu_k, max(q_lens), max(k_lens))
        return self._varlen

    def pad(self, x: Any) -> Any:
        """(1, heads, real positions, dim) -> (rows, heads, width, dim), zeros at the padding."""
        t = x[0].transpose(0, 1)
        out = t.new_zeros(self.rows * self.width, *t.shape[1:]).index_copy(0, self.index, t)
        return out.view(self.rows, self.width, *t.shape[1:]).transpose(1, 2)

    def unpad(self, out: Any) -> Any:
        """(rows, width, heads, dim) -> (1, real positions, heads, dim)."""
        return out.reshape(self.rows * self.width, *out.shape[2:]).index_select(0, self.index).unsqueeze(0)


def _attend_unpadded(module: Any, query: Any, key: Any, value: Any, layout: Unpadded, dropout: float,
                     scaling: float | None, kwargs: dict) -> tuple[Any, None]:
    import torch

    p = layout.prefix
    dtype = compute_dtype(query)  # padded and joined in the products' dtype: under autocast half the bytes moved
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q, k, v = layout.pad(query[:, :, p:]), layout.pad(key[:, :, p:]), layout.pad(value[:, :, p:])
    if p:
        k = torch.cat([key[:, :, :p].expand(layout.rows, -1, -1, -1), k], 2)
        v = torch.cat([value[:, :, :p].expand(layout.rows, -1, -1, -1), v], 2)
    out, _ = attention(module, q, k, v, layout.mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    out = layout.unpad(out)
    if p:  # the prefix's own positions: causal among themselves
        head, _ = attention(module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, dropout=dropout,
                            scaling=scaling, is_causal=True, **kwargs)
        out = torch.cat([head, out], 1)
    return out, None


# The same unpadded call on CUDA (`tunewright_varlen`): nothing is put back into the padded layout. The sequence's
# queries go to torch's variable-length FlashAttention kernel as they are, one segment per row (and one for the
# shared prefix); a row's keys are the prefix's (gathered once per row: a prefix is short next to the rows) and its
# own, and the causal mask is aligned to each segment's last key, so that a row's first token sees the whole
# prefix. No FLOP and no byte goes to padding, and no row attends to another. Where the kernel cannot run (no
# CUDA, 32-bit compute, dropout, soft-capping, windows) the same segments are attended one by one with sdpa and an
# explicit mask: the reference the kernel is tested against (tests/test_varlen.py), and what the CPU runs.


def attention_varlen(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature. Called with an `Unpadded` layout (stage 4's unpadded decoder
    call): variable-length attention over its segments; any other call (evaluation, packed rows) goes to sdpa."""
    layout = kwargs.pop(UNPADDED_KWARG, None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return attend_segments(query, key, value, layout, dropout, scaling, kwargs)


def varlen_applies(query: Any, dropout: float, kwargs: dict) -> bool:
    """Whether the variable-length kernel can take this call: CUDA, 16-bit, nothing but a causal mask."""
    import torch

    if query.device.type != "cuda" or varlen_kernel() is None or dropout:
        return False
    if any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")):
        return False
    return compute_dtype(query) in (torch.bfloat16, torch.float16)


def attend_segments(query: Any, key: Any, value: Any, layout: Unpadded, dropout: float = 0.0,
                    scaling: float | None = None, kwargs: dict | None = None) -> tuple[Any, None]:
    """query (1, heads, positions, dim), key and value (1, kv heads, positions, dim) of one unpadded call; returns
    (1, positions, heads, dim): each of the layout's segments attending to its own keys."""
    import torch

    kwargs = kwargs or {}
    dtype = compute_dtype(query)
    q = query[0].transpose(0, 1).to(dtype)  # (positions, heads, dim): the kernel's layout
    k, v = key[0].transpose(0, 1).to(dtype), value[0].transpose(0, 1).to(dtype)
    index, cu_q, cu_k, max_q, max_k = layout.varlen()
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if varlen_applies(query, dropout, kwargs):
        out = _varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        if out is not None:
            return out.unsqueeze(0), None
    import torch.nn.functional as F

    outs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for s in range(len(bounds_q) - 1):
        qs = q[bounds_q[s]:bounds_q[s + 1]].transpose(0, 1)[None]
        ks = k[bounds_k[s]:bounds_k[s + 1]].transpose(0, 1)[None]
        vs = v[bounds_k[s]:bounds_k[s + 1]].transpose(0, 1)[None]
        n_q, n_k = qs.shape[2], ks.shape[2]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                             enable_gqa=qs.shape[1] != ks.shape[1])
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, 0).unsqueeze(0), None


def _varlen_call(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, scale: float) -> Any | None:
    """Causal `varlen_attn` in the spelling of the torch at hand: torch 2.13 takes `window_size=(-1, 0)` and
    `enable_gqa`; earlier releases take `is_causal` and want as many key/value heads as query heads."""
    import inspect

    kernel = varlen_kernel()
    params = inspect.signature(kernel).parameters
    group = q.shape[1] // k.shape[1]
    if "scale" not in params and abs(scale - q.shape[-1] ** -0.5) > 1e-9:
        return None  # a kernel without a scale argument scales by 1/sqrt(dim) only: the segments path takes it
    extra: dict = {"scale": scale} if "scale" in params else {}
    if group > 1 and "enable_gqa" in params:
        extra["enable_gqa"] = True
    elif group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    return kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, **extra)
