"""lorafit: parameter-efficient fine-tuning when labels are few, with honest evaluation."""

from lorafit._optional import filter_known_library_notices

__version__ = "0.1.0"

filter_known_library_notices()


def load(path, **kwargs):
    """Load an exported adapter or run directory: see `lorafit.export.load`."""
    from lorafit.export import load as _load

    return _load(path, **kwargs)
