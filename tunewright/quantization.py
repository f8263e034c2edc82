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
