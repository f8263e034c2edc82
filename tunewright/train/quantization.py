"""bitsandbytes settings shared by training (the base is loaded this way) and serving (and must be again)."""

from __future__ import annotations


def bnb_config(bits: int | None, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bf16"):
    """A BitsAndBytesConfig for a 4- or 8-bit base, or None for full precision."""
    if not bits:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)


def place_unquantised(model, compute_dtype: str = "bf16"):
    """Put the weights bitsandbytes leaves unquantised in the 16-bit compute dtype.

    The token embeddings and output head (a fifth of SmolLM2's weights, tied) and the norms would
    otherwise sit in fp32: twice the memory, a fresh 16-bit cast of the head on every forward, and
    fp32 norm outputs that make every 4-bit layer return fp32, so the whole residual stream and
    every checkpointed activation stays fp32. RMSNorm still computes its statistics in fp32.
    Training, evaluation and serving all call this, so an adapter always runs over the same base
    numerics it was trained over. Only used under 16-bit autocast (without it, fp32 activations
    would meet 16-bit weights).
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype)
    if dtype is None:
        return model
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dtype == torch.float32 and not hasattr(param, "quant_state"):
                param.data = param.data.to(dtype)
    return model
