"""Picks the kernel backend and turns user inputs into the buffers the kernels read."""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "FORCE_REFERENCE",
    "as_labels",
    "as_logits",
    "check_label_range",
    "kernels",
    "raise_if_nan",
]

FORCE_REFERENCE = os.environ.get("LORAFIT_FORCE_REFERENCE", "") == "1"

if FORCE_REFERENCE:  # debugging only: the numpy/torch ground truth, slow
    from lorafit.metrics import _reference as kernels
else:
    try:
        from lorafit import _C as kernels
    except ImportError as error:
        from lorafit.errors import SetupError

        raise SetupError(
            "lorafit._C, the C++ evaluation core, is not built. Build it from the repository "
            "root with `pip install -e .` (needs a C++17 compiler); "
            "LORAFIT_FORCE_REFERENCE=1 selects the slow reference path for debugging."
        ) from error

# Element type codes shared with csrc/simd.h (DType).
FLOAT32, FLOAT16, BFLOAT16, FLOAT64 = 0, 1, 2, 3
_NUMPY_CODES = {
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.float16): FLOAT16,
    np.dtype(np.float64): FLOAT64,
}


def _is_torch_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def as_logits(logits, name: str = "logits") -> tuple[np.ndarray, int]:
    """A C-contiguous numpy view (copied only if needed) and its dtype code.

    Accepts numpy arrays (float32/float16/float64, or ml_dtypes bfloat16) and CPU torch
    tensors (float32/float16/bfloat16/float64). bfloat16 travels as its raw uint16 bits.
    """
    if _is_torch_tensor(logits):
        import torch

        tensor = logits.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {tensor.device}")
        tensor = tensor.contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16), BFLOAT16
        codes = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.float64: FLOAT64}
        if tensor.dtype not in codes:
            raise ValueError(
                f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}"
            )
        return tensor.numpy(), codes[tensor.dtype]
    array = np.asarray(logits)
    if array.dtype.name == "bfloat16":  # ml_dtypes
        return np.ascontiguousarray(array).view(np.uint16), BFLOAT16
    if array.dtype not in _NUMPY_CODES:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {array.dtype} "
            "(pass bfloat16 as a torch tensor)"
        )
    return np.ascontiguousarray(array), _NUMPY_CODES[array.dtype]


def as_labels(labels, name: str = "labels") -> np.ndarray:
    """Integer labels as a contiguous int64 numpy array."""
    if _is_torch_tensor(labels):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.size == 0:  # an empty list is float64 to numpy: an empty batch all the same
        array = array.astype(np.int64)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer array of class ids, got dtype {array.dtype}; "
            "convert it, e.g. labels.astype(int) or labels.long()"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def check_label_range(
    labels: np.ndarray, num_classes: int, ignore_index: int | None = None, name: str = "labels"
) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or {ignore_index}")
        raise ValueError(
            f"{name}[{index}] = {int(labels[index])} is out of range: expected {allowed}"
        )


def raise_if_nan(first_nan_row: int, name: str = "logits") -> None:
    if first_nan_row >= 0:
        raise ValueError(f"{name} contain NaN (first in row {first_nan_row})")
