"""RMSNorm layers for training on the CPU as one autograd function, written in the dtype their consumers use.

transformers' Llama-family norm (`LlamaRMSNorm`, and the same code under other names) computes, for an fp32
residual stream,

    y = weight * (x * rsqrt(mean(x^2) + eps))

as five elementwise passes, and autograd walks back through as many again. Under 16-bit autocast every
linear layer that reads `y` then casts it to 16 bits for itself: q, k and v cast the same input norm's output
three times, the MLP's gate and up twice, and backward casts each of their gradients back to fp32 before
summing them: on a small CPU, that is a visible part of a bf16 training step.

`RMSNorm` computes the same in two passes forward (the sum of squares by `vector_norm`, then one product
written straight in the output dtype) and four backward:

    forward:   r = rsqrt(|x|^2 / d + eps);   y = (x r) * weight          (fp32 arithmetic, stored in out_dtype)
    backward:  g' = g * weight;  x^ = x r;  dx = r (g' - x^ <g', x^> / d);  dweight = sum(g x^)

with `out_dtype` autocast's dtype where autocast is on (the values each consumer's own cast would have made:
16-bit rounding of the same fp32 product) and fp32 otherwise. What changes under autocast is that the
consumers' 16-bit gradients are summed in 16 bits before the norm's backward reads them, where eager summed
fp32 copies: a rounding of the order every 16-bit product already makes (a test bounds it, and shows fp32 runs
unchanged). It applies to fp32 inputs and weights of norms whose own forward it reproduces (checked once per
norm class on a random input when installed, so variants such as Gemma's `1 + weight` keep theirs);
ZeRO-3-partitioned weights and other dtypes take the module's own forward, decided on every call.
"""

from __future__ import annotations

import functools
from typing import Any

from tunewright.train.fused_lora import compute_dtype, count_routed, route, unroute


@functools.cache
def _function() -> Any:
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps: float, out_dtype):
            with torch.autocast(x.device.type, enabled=False):
                d = x.shape[-1]
                rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
                out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
                torch.mul(x * rstd, weight, out=out)
            ctx.save_for_backward(x, rstd, weight)
            return out

        @staticmethod
        def backward(ctx, g):
            x, rstd, weight = ctx.saved_tensors
            with torch.autocast(g.device.type, enabled=False):
                gw = torch.mul(g, weight)  # fp32: the weight is
                xhat = x * rstd
                dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze_(-1).div_(x.shape[-1])
                dx = torch.addcmul(gw, xhat, dot, value=-1).mul_(rstd) if ctx.needs_input_grad[0] else None
                dweight = None
                if ctx.needs_input_grad[1]:
                    dweight = torch.mul(g, xhat).reshape(-1, x.shape[-1]).sum(0)
            return dx, dweight, None, None

    return RMSNorm


def _eps(module: Any) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _fused_forward(module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """The norm's forward through `RMSNorm` where it applies, its own otherwise (checked per call)."""
    import torch

    weight = module.weight
    if args or kwargs or x.dtype != torch.float32 or weight.dtype != torch.float32 or hasattr(weight, "ds_id"):
        return type(module).forward(module, x, *args, **kwargs)
    return _function().apply(x, weight, _eps(module), compute_dtype(x))


def _reproduces(cls: type, module: Any) -> bool:
    """Does `RMSNorm` give this norm class's own fp32 output (and input gradient) on a random input?"""
    import copy

    import torch

    hidden = module.weight.shape[0]
    probe = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    probe.weight.data = torch.rand(hidden, generator=generator) + 0.5
    x = torch.randn(2, 3, hidden, generator=generator, requires_grad=True)
    g = torch.randn(2, 3, hidden, generator=generator)
    with torch.autocast("cpu", enabled=False), torch.enable_grad():
        own = cls.forward(probe, x)
        if own.shape != x.shape or own.dtype != torch.float32:
            return False
        (own_dx,) = torch.autograd.grad(own, x, g)
        ours = _function().apply(x, probe.weight, _eps(module), torch.float32)
        (our_dx,) = torch.autograd.grad(ours, x, g)
    return torch.allclose(own, ours, rtol=1e-5, atol=1e-6) and torch.allclose(own_dx, our_dx, rtol=1e-4, atol=1e-5)


def use_for_training(model: Any, device: Any) -> int:
    """Route a model's RMSNorm layers through `RMSNorm` for training on the CPU (elsewhere their own forward
    stays); how many layers."""
    if device.type != "cpu":
        return 0
    import torch

    checked: dict[type, bool] = {}
    n = 0
    for module in model.modules():
        cls = type(module)
        if not cls.__name__.endswith("RMSNorm") or _eps(module) is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
            continue
        if cls not in checked:
            checked[cls] = _reproduces(cls, module)
        if checked[cls]:
            route(module, _fused_forward)
            n += 1
    return n


def fused_layers(model: Any) -> int:
    """How many of the model's norms take the fused path (where it applies on each call)."""
    return count_routed(model, _fused_forward)


def stop_using(model: Any) -> None:
    """Give every norm back its own forward."""
    unroute(model, _fused_forward)
