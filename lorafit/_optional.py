"""Optional dependencies, imported lazily: the ONLY module that imports bitsandbytes.

bitsandbytes is needed only for `method.name=qlora` and `train.optimizer=adamw_8bit`; every
other path runs without it. Import errors become a `ModelError` that says what to install.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

from lorafit.errors import ModelError


def bitsandbytes() -> ModuleType:
    """The `bitsandbytes` module, or a ModelError naming the pip command when it is missing."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise ModelError(
            f"bitsandbytes is needed for 4-bit QLoRA and 8-bit AdamW but cannot be imported ({e}); "
            "run `pip install bitsandbytes`, or use method.name=lora and train.optimizer=adamw"
        ) from None


def linear4bit_class() -> type:
    """`bitsandbytes.nn.Linear4bit` (the layer that QLoRA's base weights live in)."""
    return bitsandbytes().nn.Linear4bit


def adamw_8bit_class() -> type:
    """`bitsandbytes.optim.AdamW8bit` for `train.optimizer=adamw_8bit`."""
    return bitsandbytes().optim.AdamW8bit


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def filter_known_library_notices() -> None:
    """Drop two library notices that every run printed and that ask nothing of the user.

    - bitsandbytes (imported by peft) logs on CPUs with avx512_bf16 that its fused 4-bit CPU
      kernel needs the `kernels` package. lorafit switches that path off on every 4-bit layer
      (`methods.disable_cpu_weight_repacking`), so the kernel would never run.
    - peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model
      (a FutureWarning about peft's code, not the user's).
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("gemm_4bit_forward from kernels-community")
    )
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
