"""Issue 12, goals 1 and 2: the default `imgclf train` on photos, cold cache,
several seeds, against the former default measured in the same run; and
whether its validation figure holds on images no choice has seen.

    .venv/bin/python bench/bench_fast.py                  # goal 1: about 6 minutes
    .venv/bin/python bench/bench_fast.py --generalise     # goal 2: about 4 minutes more

Goal 1: wall seconds of the whole command as a user types it (`python -m
imgclf train DATA`: start-up, checks, feature extraction, head, calibration,
evaluation, exit), each run with an empty feature cache.

Goal 2: dogs_vs_cats_2k_fullres, split 1600/200/200 by each seed: the
cross-validated estimate (train folds), val and test accuracy, and the gap
test - val against one binomial standard error of their difference.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table  # noqa: E402

# What `imgclf train DATA` did before issue 12: Lite0 at 224 px, mirrored
# features, an AdamW head early-stopped on val.
FORMER = ["--model", "efficientnet_lite0", "--crop-pct", "1", "--flip-features", "--head-fit", "epochs"]


def run(data: Path, out: Path, cache: Path, *extra: str) -> dict:
    """One `imgclf train`, timed from outside; peak memory from /usr/bin/time."""
    cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--cache-dir", str(cache), *extra]
    timer = ["/usr/bin/time", "-f", "PEAK_KB %M"] if shutil.which("time") or Path("/usr/bin/time").exists() else []
    t0 = time.time()
    p = subprocess.run(timer + cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    peak = re.search(r"PEAK_KB (\d+)", p.stderr)
    feats = re.search(r"features: .* in ([\d.]+)s", p.stdout)
    summary = json.loads((out / "summary.json").read_text())
    held = "test" if (out / "eval_test.json").exists() else "val"
    return {"wall s": round(wall, 1), "features s": float(feats.group(1)) if feats else None,
            "val acc": round(summary["best"]["acc"], 4), "cv acc": summary["best"].get("cv_acc"),
            f"{held} acc": round(json.loads((out / f"eval_{held}.json").read_text())["accuracy"], 4),
            "peak GiB": round(int(peak.group(1)) / 2**20, 2) if peak else None}


def goal1(data: Path, seeds: list[int], former_seeds: list[int], tmp: Path) -> None:
    rows = []
    for name, extra, ss in (("default", [], seeds), ("former default", FORMER, former_seeds)):
        for s in ss:
            cache = tmp / f"cache-{name}-{s}"  # empty: a cold run
            r = run(data, tmp / f"{name}-{s}", cache, "--seed", str(s), *extra)
            rows.append({"method": name, "seed": s, **r})
            print(rows[-1], flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    print(table(rows, ["method", "seed", "wall s", "features s", "val acc", "peak GiB"]))
    for name in ("default", "former default"):
        w = [r["wall s"] for r in rows if r["method"] == name]
        a = [r["val acc"] for r in rows if r["method"] == name]
        if w:
            print(f"{name}: wall {mean(w):.1f} s (sd {sd(w):.1f}, max {max(w):.1f}), val acc {mean(a):.4f} "
                  f"(sd {sd(a):.4f}) over {len(w)} seed(s)")


def goal2(seeds: list[int], tmp: Path) -> None:
    data = DATASETS / "dogs_vs_cats_2k_fullres"
    rows = []
    for name, extra in (("default (CV head)", []), ("former default (val-stopped head)", FORMER)):
        cache = tmp / f"cache-g2-{len(extra)}"  # shared by the seeds: the same images
        for s in seeds:
            r = run(data, tmp / f"g2-{len(extra)}-{s}", cache, "--seed", str(s), *extra)
            n_val, n_test = 200, 200
            se = math.sqrt(r["val acc"] * (1 - r["val acc"]) / n_val + r["test acc"] * (1 - r["test acc"]) / n_test)
            rows.append({"method": name, "seed": s, "cv acc": r["cv acc"] and round(r["cv acc"], 4),
                         "val acc": r["val acc"], "test acc": r["test acc"],
                         "test - val": round(r["test acc"] - r["val acc"], 4), "SE of the gap": round(se, 4)})
            print(rows[-1], flush=True)
    print(table(rows, ["method", "seed", "cv acc", "val acc", "test acc", "test - val", "SE of the gap"]))
    for name in {r["method"] for r in rows}:
        g = [r["test - val"] for r in rows if r["method"] == name]
        print(f"{name}: mean gap test - val {mean(g):+.4f} over {len(g)} seeds")


def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):
    return math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATASETS / "cats_and_dogs_filtered")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--former-seeds", type=int, default=1, help="runs of the former default (the baseline)")
    ap.add_argument("--generalise", action="store_true", help="goal 2 instead of goal 1")
    a = ap.parse_args()
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fast-") as tmp:
        if a.generalise:
            goal2(list(range(a.seeds)), Path(tmp))
        else:
            goal1(a.data, list(range(a.seeds)), list(range(a.former_seeds)), Path(tmp))


if __name__ == "__main__":
    main()
