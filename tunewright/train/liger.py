"""Liger's fused Triton kernels for stage 4 on CUDA: RMSNorm, rotary embeddings and the SwiGLU MLP of the decoder
layers, each one kernel instead of a chain of element-wise ones (the optional `gpu` extra installs liger-kernel).

The loss keeps its own path (answer positions only, chunked, fused with the projection:
`tunewright.train.cross_entropy`), so Liger's cross-entropy kernels are left out. On the CPU, for model types Liger
has no kernels for, or without liger-kernel installed, the model's own layers run and the reason is said once in
stage 4's log (`tasks.finetune.kernels`). tests/test_liger_cuda.py checks loss and gradients against the model's
own layers where there is a GPU.
"""

from __future__ import annotations

from typing import Any

KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def why_not(model: Any, device: Any) -> str:
    """Why Liger's kernels cannot serve `model` on `device`; '' where they can."""
    if device.type != "cuda":
        return "Liger's kernels are Triton kernels for CUDA"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed (pip install 'tunewright[gpu]')"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return ""


def use_for_training(model: Any, device: Any) -> str:
    """Patch `model`'s (a transformers causal LM, before any adapter) norms, rotary embeddings and MLPs with Liger's
    kernels where `why_not` allows; '' when patched, else the reason they were not."""
    reason = why_not(model, device)
    if reason:
        return reason
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **KERNELS)
    model.tunewright_liger = True
    return ""


def applied(net: Any) -> bool:
    """Whether stage 4's model runs Liger's kernels."""
    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    return bool(getattr(lm, "tunewright_liger", False))
