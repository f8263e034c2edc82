"""LoRA linear layers for training (CPU and CUDA) as one autograd function: base product, adapter and sum fused.

PEFT's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under autocast it casts the
input to 16 bits once for the base and again for `lora_A`, multiplies the full-width adapter output by the
scale, and adds it to the base output, and backward walks the same chain the other way: on a small CPU those
passes over every layer's full-width output are a visible part of a training step. `LoraLinear` does the same arithmetic with the scale applied to the rank-r product and the sum done by the
second matrix product itself (`addmm`):

    a = (x A^T) * scaling            (rows x r)
    y = x W^T + b + a B^T            (one addmm into the base product)

and backward computes the input gradient as one `addmm` too. The gradients are PEFT's (a test compares
loss and gradients with PEFT's forward). It applies to plain LoRA on a plain `nn.Linear` base with one
active adapter; DoRA and other variants, quantised bases, ZeRO-3-partitioned weights, merged or disabled
adapters and mixed-adapter batches take PEFT's own forward, decided on every call.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _function() -> Any:
    import torch

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scaling: float, dtype):
            with torch.autocast(x.device.type, enabled=False):
                shape = x.shape
                x2 = x.reshape(-1, shape[-1]).to(dtype)
                xd2 = x2 if xd is None else xd.reshape(-1, shape[-1]).to(dtype)
                w, a_w, b_w = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
                a = torch.mm(xd2, a_w.t()).mul_(scaling)
                y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
                y.addmm_(a, b_w.t())
            ctx.save_for_backward(x2, None if xd is None else xd2, w, a_w, b_w, a)
            ctx.meta = (shape, x.dtype, None if xd is None else xd.dtype, scaling,
                        lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
            return y.reshape(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, gy):
            x2, xd2, w, a_w, b_w, a = ctx.saved_tensors
            shape, x_dtype, xd_dtype, scaling, a_dtype, b_dtype, bias_dtype = ctx.meta
            need = ctx.needs_input_grad
            with torch.autocast(gy.device.type, enabled=False):
                g = gy.reshape(-1, gy.shape[-1]).to(w.dtype)
                grad_b = torch.mm(g.t(), a).to(b_dtype) if need[5] else None
                ga = torch.mm(g, b_w).mul_(scaling)
                grad_a = torch.mm(ga.t(), x2 if xd2 is None else xd2).to(a_dtype) if need[4] else None
                grad_x = grad_xd = None
                if need[0]:
                    grad_x = torch.mm(g, w)
                    if xd2 is None:
                        grad_x.addmm_(ga, a_w)
                    grad_x = grad_x.to(x_dtype).reshape(shape)
                if xd2 is not None and need[1]:
                    grad_xd = torch.mm(ga, a_w).to(xd_dtype).reshape(shape)
                grad_w = torch.mm(g.t(), x2).to(w.dtype) if need[2] else None
                grad_bias = g.sum(0).to(bias_dtype) if need[3] else None
            return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, None, None

    return LoraLinear


def compute_dtype(x: Any) -> Any:
    """The dtype products on `x` run in: autocast's where it is on for x's device, else x's own."""
    import torch

    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _fused_forward(module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """`lora.Linear.forward` with the fused path where it applies, PEFT's own otherwise (checked per call)."""
    import torch

    adapters = module.active_adapters
    if (args or kwargs or module.disable_adapters or module.merged or len(adapters) != 1
            or adapters[0] not in module.lora_A or adapters[0] in module.lora_variant):
        return type(module).forward(module, x, *args, **kwargs)
    name = adapters[0]
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    if any(hasattr(p, "ds_id") for p in (base.weight, lora_a.weight, lora_b.weight)):
        return type(module).forward(module, x, *args, **kwargs)
    dtype = compute_dtype(x)
    if base.weight.dtype not in (dtype, torch.float32):
        return type(module).forward(module, x, *args, **kwargs)
    dropout = module.lora_dropout[name]
    xd = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return _function().apply(x, xd, base.weight, base.bias, lora_a.weight, lora_b.weight,
                             float(module.scaling[name]), dtype)


def use_for_training(net: Any, device: Any) -> int:
    """Route a PEFT model's LoRA layers on plain `nn.Linear` bases through `LoraLinear` for training on the CPU or
    CUDA (on other devices PEFT's forward stays); how many layers. On CUDA the same products run on cuBLAS: the
    full-width scale-and-add passes PEFT makes in forward and backward are what it saves there
    (tests/test_fused_lora_cuda.py checks it against PEFT)."""
    import torch

    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    if device.type not in ("cpu", "cuda"):
        return 0
    n = 0
    for module in net.modules():
        if type(module) is PeftLoraLinear and type(module.base_layer) is torch.nn.Linear:
            route(module, _fused_forward)
            n += 1
    return n


def route(module: Any, forward: Any) -> None:
    """Answer `module`'s calls with `forward(module, ...)` (an instance attribute: its class is untouched)."""
    module.forward = functools.partial(forward, module)


def routed(module: Any, forward: Any) -> bool:
    own = module.__dict__.get("forward")
    return isinstance(own, functools.partial) and own.func is forward


def count_routed(net: Any, forward: Any) -> int:
    return sum(routed(m, forward) for m in net.modules())


def unroute(net: Any, forward: Any) -> None:
    """Give every module `route` sent to `forward` back its class's own forward."""
    for module in net.modules():
        if routed(module, forward):
            del module.forward


def fused_layers(net: Any) -> int:
    """How many of the network's layers take the fused path (where it applies on each call)."""
    return count_routed(net, _fused_forward)


def stop_using(net: Any) -> None:
    """Give every layer back PEFT's own forward."""
    unroute(net, _fused_forward)
