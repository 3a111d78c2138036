"""User-facing errors: the CLI prints these as one line, without a traceback."""


class LorafitError(Exception):
    """A user mistake (bad config, data, path) with a one-line message naming the fix."""


class ConfigError(LorafitError, ValueError):
    """Invalid configuration key or value."""


class DataError(LorafitError, ValueError):
    """Invalid or missing data: the message names the file, row and column."""


class ModelError(LorafitError, ValueError):
    """A model or adapter cannot be loaded (missing files, wrong base, unsafe format)."""


class TrainingError(LorafitError, RuntimeError):
    """Training cannot continue (non-finite loss, misconfigured launch)."""


class SetupError(LorafitError, ImportError):
    """The installation is incomplete (the C++ evaluation core is not built)."""
