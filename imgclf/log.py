"""Logging and progress bars.

The library reports what it does through `logging` (loggers under "imgclf")
and stays silent until the application installs a handler: a program calling
`imgclf.train()` decides where the lines go with the standard logging API.
The CLI (and `make demo`) call `setup_cli()`: informational lines on stdout,
warnings and skipped files on stderr, and tqdm progress bars on a terminal.
"""

from __future__ import annotations

import logging
import sys

ROOT = "imgclf"
logging.getLogger(ROOT).addHandler(logging.NullHandler())  # silent by default (no lastResort on stderr)
_bars = False  # progress bars are the CLI's choice, like the handler


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (pass __name__)."""
    return logging.getLogger(name)


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_cli(level: int = logging.INFO, bars: bool = True) -> None:
    """Plain lines for a terminal or a log file: INFO to stdout, WARNING and
    above to stderr; progress bars when stderr is a terminal. Idempotent."""
    global _bars
    log = logging.getLogger(ROOT)
    for h in [h for h in log.handlers if getattr(h, "_imgclf_cli", False)]:
        log.removeHandler(h)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        h._imgclf_cli = True
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False  # the CLI owns the output; a root handler would print each line twice
    _bars = bars


class Progress:
    """A tqdm bar (throughput, ETA) when the CLI turned bars on and stderr is a
    terminal; nothing otherwise, so logs and CI output stay readable."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", enabled: bool = True):
        self.bar = None
        if enabled and _bars and sys.stderr.isatty():
            from tqdm import tqdm  # deferred: only a terminal run draws bars

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
