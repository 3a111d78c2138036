"""lorafit: parameter-efficient fine-tuning when labels are few, with honest evaluation."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an exported adapter or run directory: see `lorafit.export.load`."""
    from lorafit.export import load as _load

    return _load(path, **kwargs)
