"""Error types that map to the CLI's exit codes (see CONTRACT.md)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad usage, config or input data. The CLI prints ``str(error)`` as one line and exits 2."""


class ConfigError(UsageError):
    """A config value is wrong. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class DataError(UsageError):
    """The data does not fit the config: a missing file or column, bad labels, NaNs."""


class RunFailed(RuntimeError):
    """A runtime failure that every rank detected together and stopped on cleanly (non-finite
    values under ``on_nonfinite=abort``, a required checkpoint that could not be written). The CLI
    prints ``str(error)`` as one line and exits 1."""
