"""Shared bits of the benchmarks: where the data is, what machine this is, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("IMGCLF_DATASETS", ROOT.parent / "shared" / "datasets"))


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def timeit(fn, x, repeats: int) -> float:
    """Median seconds per call of fn(x), after one warm-up call."""
    fn(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speed_columns(fn, data, batches: tuple[int, ...], repeats: tuple[int, ...], ms_digits: int = 1) -> dict:
    """An engine's table columns: "batch B img/s" and "batch B ms/img" for each
    batch size B, timed by `timeit` on the first B items of `data`."""
    row = {}
    for b, r in zip(batches, repeats):
        t = timeit(fn, data[:b], r)
        row[f"batch {b} img/s"] = f"{b / t:.1f}"
        row[f"batch {b} ms/img"] = f"{t * 1000 / b:.{ms_digits}f}"
    return row


def one_thread(fn):
    """fn(batch) timed with torch at one intra-op thread, the count restored after."""
    import torch  # deferred: the benchmarks that time only onnxruntime do not need it

    def run(b):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(b)
        finally:
            torch.set_num_threads(threads)
    return run


def speedup(rows: list[dict], col: str) -> list[str]:
    """Each row's `col` (a number in text) against the first row's (the baseline), as "1.23x"."""
    base = float(rows[0][col])
    return [f"{float(r[col]) / base:.2f}x" for r in rows]


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    out = ["| " + " | ".join(c.ljust(w[c]) for c in cols) + " |", "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|"]
    out += ["| " + " | ".join(str(r.get(c, "")).ljust(w[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# VmHWM: this process's own peak resident memory. (getrusage's ru_maxrss would
# carry over the benchmark parent's peak: Linux keeps it across fork + exec.)
_WRAP = ("import sys; from imgclf.cli import main; rc = main(sys.argv[1:]); "
         "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
         "print('PEAK_RSS_KB', hwm); sys.exit(rc)")


def timed_cli(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run the imgclf CLI in a fresh process, as a user would (start-up
    included); returns (wall s, peak RSS GiB of the main process, stdout)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _WRAP, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"imgclf {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    peak = int(p.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 2**20
    return wall, peak, p.stdout
