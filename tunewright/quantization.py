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
    """Put the weights bitsandbytes leaves unquantised where the original QLoRA recipe puts them.

    The token embeddings and output head (a quarter of a small model's weights, and tied in
    SmolLM2) go to the 16-bit compute dtype: kept in fp32 they would cost twice the memory, and
    autocast would cast the head to 16 bits again on every forward. Norms stay in fp32 for a
    stable residual stream. Training, evaluation and serving all call this, so an adapter always
    runs over the same base numerics it was trained over.
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype)
    if dtype is None:
        return model
    for module in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dtype == torch.float32 and not hasattr(weight, "quant_state"):
            module.to(dtype)
    return model
