"""Progress: a tqdm bar (throughput, ETA) on a terminal, nothing in logs.

Per-epoch summaries are printed as plain lines by the trainer either way, so a
log file or CI output stays readable."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "it", enabled: bool = True):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

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
