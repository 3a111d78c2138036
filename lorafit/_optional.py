"""Optional dependencies, imported lazily: the ONLY module that imports bitsandbytes.

bitsandbytes is needed only for `method.name=qlora` and `train.optimizer=adamw_8bit`; every
other path runs without it. Import errors become a `ModelError` that says what to install.
"""

from __future__ import annotations

import importlib
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
