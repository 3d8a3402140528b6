"""One root exception for the training package; subclasses say which input to fix."""


class AnomalyError(Exception):
    """Root of every error this project raises on purpose (user-fixable, no traceback needed)."""


class DataError(AnomalyError):
    """A data file cannot be used as given: names the file, column and row where possible."""


class BundleError(AnomalyError):
    """A model bundle is missing, corrupt, or does not match what the caller expects."""


class ConfigError(AnomalyError):
    """An option or setting is out of range or inconsistent."""
