"""The answer tokens' cross-entropy against the vocabulary, without the full logits in memory.

A vocabulary of 49k makes the logits the largest activation of a small model, and most positions of a chat row
are prompt tokens whose logits nothing reads. `chunked_cross_entropy` projects only the positions it is given, a
chunk at a time, and for a plain Linear head never keeps a chunk's logits past its own forward or backward.
"""

from __future__ import annotations

import functools
from typing import Any


LOGIT_CHUNK_TOKENS = 128


def chunked_cross_entropy(head: Any, hidden: Any, targets: Any, chunk: int) -> Any:
    """Per-token cross-entropy of `head(hidden)`, never holding more than one chunk of logits.

    A vocabulary of 49k makes the logits (and their fp32 copy and gradient) the largest activation of a
    small model. Each chunk of `chunk` positions is projected, scored and dropped. A plain Linear head
    goes through `_projected_cross_entropy()`, which keeps only each position's log-sum-exp and in backward
    recomputes the chunk's logits once, turning them into their gradient in place (softmax minus the
    one-hot target); other heads, and a head sharded by ZeRO-3 (called as a module, which gathers its
    weights), go through cross-entropy on `head(h)` with activation checkpointing per chunk. `chunk` 0:
    all positions at once (ZeRO-3: one head call per micro-batch on every rank).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    weight = getattr(head, "weight", None)
    if type(head) is torch.nn.Linear and not hasattr(weight, "ds_id") and hidden.shape[0]:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        low = frozen_head_in_autocast_dtype(head)
        return _projected_cross_entropy().apply(hidden, weight if low is None else low, head.bias, targets,
                                                chunk or hidden.shape[0], dtype)

    def score(h: Any, y: Any) -> Any:
        return F.cross_entropy(head(h).float(), y, reduction="none")

    if not chunk or hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return score(hidden, targets)
    return torch.cat([checkpoint(score, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


@functools.cache
def _projected_cross_entropy() -> Any:
    """The autograd Function, built on first use (this module imports without torch)."""
    import torch

    class ProjectedCrossEntropy(torch.autograd.Function):
        """losses[i] = logsumexp(z_i) - z_i[y_i] with z = hidden @ weight.T + bias in `dtype`, scored in fp32,
        `chunk` rows at a time: the cross-entropy of the head's logits, with what autocast would compute
        (16-bit matmul, fp32 softmax). Backward recomputes each chunk's logits and makes them their own
        gradient in place, exp(z - lse) - onehot(y), so no logits, log-probabilities or zero-filled gradient
        buffers outlive a chunk; the head's weight and bias get gradients when they need them. Where only the
        hidden states need one, forward makes it per unit of loss instead (`_forward_chunks`)."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, chunk, dtype):
            # only the hidden states need a gradient (a frozen head, as with every adapter method): each
            # position's is its loss's gradient times (softmax - onehot) @ weight, a row of `d` values that
            # forward makes while it holds the chunk's logits, so backward projects nothing
            early = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
            losses, lse, per_loss = _forward_chunks(hidden, weight, bias, targets, chunk, dtype, early)
            ctx.save_for_backward(*((per_loss,) if early else (hidden, weight, bias, targets, lse)))
            ctx.chunk, ctx.dtype, ctx.early, ctx.hidden_dtype = chunk, dtype, early, hidden.dtype
            return losses

        @staticmethod
        def backward(ctx, grad):
            if ctx.early:
                (per_loss,) = ctx.saved_tensors
                return (per_loss * grad[:, None]).to(ctx.hidden_dtype), None, None, None, None, None
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            grad_h, grad_w, grad_b = _backward_chunks(hidden, weight, bias, targets, lse, grad, ctx.chunk, ctx.dtype,
                                                      *ctx.needs_input_grad[:3])
            return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                    None if grad_b is None else grad_b.to(bias.dtype), None, None, None)

    return ProjectedCrossEntropy


def _forward_chunks(hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int, dtype: Any, early: bool):
    """Each position's loss and log-sum-exp, a chunk of logits at a time; with `early`, also each position's
    gradient per unit of loss, (softmax - onehot) @ weight."""
    import torch

    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        losses = torch.empty_like(lse)
        per_loss = torch.empty_like(h) if early else None
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            z = _logits(h[i : i + chunk], w, b)
            n = z.shape[0]
            target = z.gather(1, targets[i : i + n, None]).squeeze(1)
            top = z.amax(-1)
            total = z.sub_(top[:, None]).exp_().sum(-1)
            lse[i : i + n] = total.log().add_(top)
            losses[i : i + n] = lse[i : i + n] - target
            if early:
                z.div_(total[:, None])  # softmax
                z[rows[:n], targets[i : i + n]] -= 1
                g = _buffer(z.shape, dtype, z.device, "low").copy_(z) if dtype != z.dtype else z
                torch.mm(g, w, out=per_loss[i : i + n])
    return losses, lse, per_loss


def _backward_chunks(hidden: Any, weight: Any, bias: Any, targets: Any, lse: Any, grad: Any, chunk: int, dtype: Any,
                     need_h: bool, need_w: bool, need_b: bool):
    """The gradients of hidden states, head weight and bias that are needed, each chunk's logits recomputed and
    turned into their own gradient in place."""
    import torch

    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=w.device) if need_b else None
        rows = torch.arange(min(chunk, h.shape[0]), device=h.device)
        for i in range(0, h.shape[0], chunk):
            z = _logits(h[i : i + chunk], w, b)
            n = z.shape[0]
            z.sub_(lse[i : i + n, None]).exp_()  # softmax
            z[rows[:n], targets[i : i + n]] -= 1
            z.mul_(grad[i : i + n, None])
            if need_b:
                grad_b += z.sum(0)
            g = _buffer(z.shape, dtype, z.device, "low").copy_(z) if dtype != z.dtype else z
            if need_h:
                grad_h[i : i + n] = g @ w
            if need_w:
                grad_w += g.t().float() @ h[i : i + n].float()
    return grad_h, grad_w, grad_b


def _logits(h: Any, w: Any, b: Any) -> Any:
    """fp32 logits of one chunk, in a buffer reused from chunk to chunk (a fresh tensor of a chunk's logits costs more
    in page faults than the arithmetic on it)."""
    import torch

    low = _buffer((h.shape[0], w.shape[0]), h.dtype, h.device, "low")
    torch.mm(h, w.t(), out=low) if b is None else torch.addmm(b, h, w.t(), out=low)
    return low if h.dtype == torch.float32 else _buffer(low.shape, torch.float32, h.device, "fp32").copy_(low)


_BUFFERS: dict[tuple, Any] = {}


def _buffer(shape: tuple, dtype: Any, device: Any, role: str) -> Any:
    """A scratch tensor of `shape`, the same storage on every call for one role (the projected cross-entropy's
    chunks); views of the full chunk's buffer serve a shorter last chunk."""
    import torch

    key = (role, dtype, str(device), shape[1:])
    have = _BUFFERS.get(key)
    if have is None or have.shape[0] < shape[0]:
        have = _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return have[: shape[0]]


_HEAD_CASTS: dict[int, tuple] = {}


def frozen_head_in_autocast_dtype(head: Any) -> Any:
    """Under 16-bit autocast, a frozen fp32 head's weight in the autocast dtype, cast once and kept until the
    weight changes; None where the head's weight is trainable, not fp32, sharded or autocast is off.

    SmolLM2's head is its (fp32, frozen) embedding matrix: autocast would copy its 28M values afresh on every
    chunk of every step. The matmul reads the same 16-bit values either way."""
    import torch

    w = getattr(head, "weight", None)
    device = w.device.type if w is not None else "cpu"
    if w is None or w.requires_grad or w.dtype != torch.float32 or hasattr(w, "ds_id") or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    key = (w.data_ptr(), w._version, dtype)
    cached = _HEAD_CASTS.get(id(w))
    if cached is None or cached[0] != key:
        _HEAD_CASTS.clear()  # one head at a time: a second model's would only double the memory
        cached = _HEAD_CASTS[id(w)] = (key, w.detach().to(dtype))
    return cached[1]
