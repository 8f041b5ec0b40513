"""Error types that map to the CLI's exit codes (see CONTRACT.md)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable


def did_you_mean(name: object, choices: Iterable[str], show: Callable[[str], str] = repr, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name`` (difflib's ratio at least
    ``cutoff``), shown by ``show``; ``""`` when nothing is close. Every registry and key check
    words its near miss this way."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {show(close[0])}?)" if close else ""


def error_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line: whitespace collapsed, the message cut at
    ``limit`` characters (a library's multi-line message must not break the one-line error)."""
    text = " ".join(str(error).split())[:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
