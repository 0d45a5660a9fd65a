"""Errors a user can fix. The ``mat`` CLI prints them as one message (no traceback) and exits non-zero.

Each message names the file, key or value at fault and says what to do.
"""


class MatError(Exception):
    """Base class of the user-facing errors."""


class ConfigError(MatError, ValueError):
    """A configuration value is wrong or names something that does not exist."""


class DataError(MatError, ValueError):
    """A data set file, folder, entry or image is missing or malformed."""
