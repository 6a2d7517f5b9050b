"""The one exception type a user sees: what went wrong and how to fix it.

`imgclf` (the CLI) catches only `ImgclfError` and prints its message; anything
else is a bug and shows its traceback. Each subclass also derives from the
built-in exception a library user would expect (ValueError, FileNotFoundError),
so `except ValueError` around `imgclf.load(...)` keeps working.
"""

from __future__ import annotations


class ImgclfError(Exception):
    """A problem with the user's input, data or files, not with imgclf."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + (f"; {fix}" if fix else ""))
        self.message, self.fix = message, fix


class ConfigError(ImgclfError, ValueError):
    """A setting has a value imgclf cannot use (names the flag, the value, the choices)."""


class DataError(ImgclfError, ValueError):
    """The data can't be used as given."""


class RunError(ImgclfError, FileNotFoundError):
    """A run directory or model file is missing, incomplete or already taken."""


class WriteError(ImgclfError, OSError):
    """An output could not be written (disk full, file-size limit, no permission); nothing half-written is left."""


class ModelFileError(ImgclfError, ValueError):
    """A model file exists but cannot be loaded (truncated, foreign, unsafe, too new)."""


class WeightsUnavailable(ImgclfError, RuntimeError):
    """Pretrained weights are not installed here and cannot be downloaded."""


class ExportError(ImgclfError, ValueError):
    """An export that failed its own check."""


class MissingExtra(ImgclfError, ImportError):
    """An optional dependency group is not installed."""
