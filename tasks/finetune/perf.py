"""Throughput accounting: FLOPs per token of a training step and the device's measured peak.

MFU here is achieved matmul FLOP/s over the peak FLOP/s this process measured on this device
at this precision (a square matmul loop), not a datasheet number; attention's own FLOPs are
left out, as in the usual 6N estimate.
"""

from __future__ import annotations

import time
from functools import lru_cache


def flops_per_token(n_params: int, n_trainable: int, full: bool, n_embedding: int = 0) -> float:
    """Forward 2N, backward 2N for activation gradients, plus 2 per trained weight (6N when all train).

    N leaves out the input embedding (a lookup, not a matmul); the output head runs on answer
    tokens only, so its share is not counted either.
    """
    n = max(n_params - n_embedding, 1)
    return 6.0 * n if full else 4.0 * n + 2.0 * min(n_trainable, n)


@lru_cache(maxsize=8)
def peak_flops(device_type: str, precision: str, threads: int, size: int = 1024, seconds: float = 0.4) -> float:
    """Measured matmul FLOP/s of this device at this precision."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device_type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    dev = torch.device(device_type)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    if device_type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        n += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2.0 * size**3 * n / (time.perf_counter() - t0)
