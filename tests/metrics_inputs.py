"""Random logits for the metrics tests, in every dtype the kernels read."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}


def random_logits(
    rng: np.random.Generator, rows: int, columns: int, scale: float = 3.0, ties: bool = False
) -> np.ndarray:
    if ties:  # few distinct values: ties in argmax, ranks and scores
        return rng.integers(-2, 3, size=(rows, columns)).astype(np.float32)
    return (rng.standard_normal((rows, columns)) * scale).astype(np.float32)


def as_dtype(logits: np.ndarray, dtype: str) -> torch.Tensor:
    """The logits as a torch tensor of `dtype` (what a model would hand over)."""
    return torch.from_numpy(logits).to(getattr(torch, dtype))


def kernel_buffer(tensor: torch.Tensor) -> np.ndarray:
    """The raw buffer the kernels read (bfloat16 as uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def decoded_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double()
