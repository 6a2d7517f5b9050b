"""Images per second of feature extraction and of fine-tuning, for 1 and 2
processes (torchrun, DDP), through `imgclf train` as a user runs it.

  .venv/bin/python bench/bench_dist.py [--data hymenoptera] [--procs 1,2] [--device cpu|cuda] [--epochs 2]

features   --strategy linear with a cold cache: (train x 2 variants + val)
           images / the seconds of the features line
finetune   --strategy finetune: the last fine-tuning epoch's training
           images per second of all processes together (history.csv)

On CPU the processes share the machine's cores (torchrun gives each
OMP_NUM_THREADS=1; one process uses them all), so this measures what
sharding costs or gains on one machine; on several GPUs or machines each
process brings its own device.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DATASETS, ROOT, machine, table


def run(procs: int, args: list[str]) -> str:
    if procs == 1:
        cmd = [sys.executable, "-m", "imgclf", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "imgclf", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATASETS / "hymenoptera"))
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    rows = []
    for n in map(int, a.procs.split(",")):
        common = [a.data, "--device", a.device, "--batch-size", str(a.batch_size), "--no-evaluate"]
        out = run(n, [*common, "--out", str(tmp / f"lin{n}"), "--cache-dir", str(tmp / f"c{n}"), "--strategy",
                      "linear", "--epochs", "1"])
        m = re.search(r"features: (\d+) train x (\d+) .*?, (\d+) val in ([\d.]+)s", out)
        ntr, nv, nva, secs = int(m[1]), int(m[2]), int(m[3]), float(m[4])
        run(n, [*common, "--out", str(tmp / f"ft{n}"), "--cache-dir", str(tmp / f"c{n}"), "--strategy", "finetune",
                "--head-epochs", "1", "--epochs", str(a.epochs)])
        hist = [r for r in csv.DictReader(open(tmp / f"ft{n}" / "history.csv")) if r["stage"] == "finetune"]
        rows.append({"processes": n, "device": a.device, "features img/s": round((ntr * nv + nva) / secs, 1),
                     "finetune img/s": float(hist[-1]["train_images_per_s"]),
                     "finetune epoch s": float(hist[-1]["seconds"]), "batch per process": a.batch_size})
        print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndata: {a.data}\nmachine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
