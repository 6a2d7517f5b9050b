"""Peak memory and wall time of `imgclf check` and default `imgclf train` on
generated datasets of small images, to show that memory does not grow in
proportion to the images.

  .venv/bin/python bench/bench_memory.py --sizes 10000,100000 [--what check,train] [--train-args "--epochs 1"]

The images are 32 px JPEGs in 10 class folders (a class colour plus noise,
so the task is learnable), written once under --data (default
/tmp/imgclf-memory). Memory is sampled 10 times a second over the whole
process tree (the CLI and its data-loading workers) from
/proc/PID/smaps_rollup:
  private  Pss_Anon: heap, tensors, Python objects; what must fit in RAM
  total    Pss: private plus file pages mapped in (the memory-mapped feature
           shards, libraries); the kernel can drop file pages under pressure
PSS counts a page shared by n processes as 1/n to each, so workers forked
from the CLI are not counted twice.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, machine, table


def _write(args: tuple[Path, int, int]) -> None:
    import numpy as np
    from PIL import Image

    root, start, stop = args
    for i in range(start, stop):
        c = i % 10
        rng = np.random.default_rng(i)
        base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256], np.float32)
        img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        d = root / f"class{c}"
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=90)


def generate(root: Path, n: int) -> Path:
    """n images of 32 px in root/n/class0..9 (written once)."""
    from multiprocessing import Pool

    data = root / str(n)
    done = data / ".complete"
    if done.exists():
        return data
    for c in range(10):
        (data / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 2000
    with Pool(os.cpu_count()) as pool:
        pool.map(_write, [(data, s, min(n, s + step)) for s in range(0, n, step)])
    done.touch()
    return data


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out


def _pss(pid: int) -> tuple[int, int]:
    tot = anon = 0
    for p in _tree(pid):
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    tot += int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1])
        except OSError:
            pass
    return tot, anon


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak total / private PSS (MiB) of a command's process tree."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = [0, 0]

    def sample():
        while p.poll() is None:
            tot, anon = _pss(p.pid)
            peak[0], peak[1] = max(peak[0], tot), max(peak[1], anon)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.communicate()[0]
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return {"s": round(time.time() - t0, 1), "total": round(peak[0] / 1024), "private": round(peak[1] / 1024),
            "log": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--what", default="check,train")
    ap.add_argument("--data", default="/tmp/imgclf-memory")
    ap.add_argument("--train-args", default="", help="extra flags for imgclf train, e.g. '--epochs 1'")
    a = ap.parse_args()
    cli = [sys.executable, "-m", "imgclf"]
    rows = []
    for n in map(int, a.sizes.split(",")):
        t0 = time.time()
        data = generate(Path(a.data), n)
        row = {"images": f"{n:,}", "generate s": round(time.time() - t0, 1)}
        if "check" in a.what:
            m = measure([*cli, "check", str(data)])
            row.update({"check s": m["s"], "check private MiB": m["private"], "check total MiB": m["total"]})
        if "train" in a.what:
            run, cache = Path(a.data) / f"run-{n}", Path(a.data) / f"cache-{n}"
            subprocess.run(["rm", "-rf", str(run), str(cache)], check=True)
            m = measure([*cli, "train", str(data), "--out", str(run), "--cache-dir", str(cache), *a.train_args.split()])
            feats = next((ln for ln in m["log"].splitlines() if ln.startswith("features:")), "")
            print(feats, flush=True)
            row.update({"train s": m["s"], "train private MiB": m["private"], "train total MiB": m["total"]})
        rows.append(row)
        print(row, flush=True)
    cols = [c for c in ("images", "check s", "check private MiB", "check total MiB", "train s", "train private MiB",
                        "train total MiB") if c in rows[0]]
    print(f"\nmachine: {machine()}\n")
    print(table(rows, cols))
    if len(rows) > 1:
        n0, n1 = (int(r["images"].replace(",", "")) for r in (rows[0], rows[-1]))
        for k in ("check private MiB", "train private MiB"):
            if k in rows[0]:
                grow = (rows[-1][k] - rows[0][k]) * 2**20 / (n1 - n0)
                print(f"{k}: x{rows[-1][k] / rows[0][k]:.2f} for x{n1 / n0:.0f} the images "
                      f"({grow:.0f} bytes per added image)")


if __name__ == "__main__":
    main()
