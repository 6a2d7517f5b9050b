"""Time to a validated model: imgclf's defaults against the recipe everyone copies.

  .venv/bin/python bench/bench_train.py [--plain-epochs 3] [--lite2]

In one run, on this machine and the same data:
  1. `imgclf train` with default settings on cats_and_dogs_filtered (train on
     train/, report on validation/) and on hymenoptera, each with an empty
     feature cache, start-up, reading, training, validation and saving included;
  2. the same cats_and_dogs_filtered run again with another head setting
     (--head-hidden 256): the feature cache is reused;
  3. the plain recipe: torchvision ImageFolder, RandomResizedCrop + flip, the
     same pretrained EfficientNet-Lite0 with a new linear head, Adam 1e-4, full
     fine-tuning, batch 32, evaluated after every epoch, until it reaches
     imgclf's accuracy or --plain-epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import DATASETS, machine, table, timed_cli


def imgclf_row(name: str, data: Path, out: Path, cache: Path, *extra: str) -> dict:
    wall, peak, stdout = timed_cli(["train", data, "--out", out, "--cache-dir", cache, *extra])
    m = json.loads((out / "eval_val.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    n = sum(s["counts"].values())
    return {"method": name, "wall s": f"{wall:.1f}", "val accuracy": f"{m['accuracy'] * 100:.2f}%",
            "images/s": f"{n / wall:.0f}", "peak memory GiB": f"{peak:.2f}", "_acc": m["accuracy"], "_wall": wall}


def plain_recipe(data: Path, target: float, max_epochs: int) -> list[dict]:
    import torch
    import torchvision.transforms as T
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from imgclf.models.registry import build_model

    t0 = time.time()
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2, pretrained=True, dropout=0.0)  # same pretrained Lite0, new linear head
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    tr = ImageFolder(str(data / "train"), T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    va = ImageFolder(str(data / "validation"), T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), norm]))
    tl = DataLoader(tr, batch_size=32, shuffle=True, num_workers=2)
    vl = DataLoader(va, batch_size=32, num_workers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in tl:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in vl:
                correct += (model(x).argmax(1) == y).sum().item()
        acc = correct / len(va)
        wall = time.time() - t0
        peak = int([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]) / 2**20
        rows.append({"method": f"plain recipe, epoch {epoch}", "wall s": f"{wall:.1f}", "val accuracy": f"{acc * 100:.2f}%",
                     "images/s": f"{epoch * (len(tr) + len(va)) / wall:.0f}", "peak memory GiB": f"{peak:.2f}",
                     "_acc": acc, "_wall": wall})
        print(rows[-1], flush=True)
        if acc >= target:
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain-epochs", type=int, default=3)
    ap.add_argument("--lite2", action="store_true", help="also the 99%% setting, --model efficientnet_lite2")
    ap.add_argument("--skip-plain", action="store_true")
    a = ap.parse_args()
    cd, hy = DATASETS / "cats_and_dogs_filtered", DATASETS / "hymenoptera"
    print(f"machine: {machine()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [imgclf_row("imgclf default, empty cache", cd, tmp / "cd", tmp / "cache")]
        print(rows[-1], flush=True)
        rows.append(imgclf_row("imgclf --head-hidden 256, cache reused", cd, tmp / "cd2", tmp / "cache", "--head-hidden", "256"))
        print(rows[-1], flush=True)
        if a.lite2:
            rows.append(imgclf_row("imgclf --model efficientnet_lite2, empty cache", cd, tmp / "cd3", tmp / "cache2",
                                   "--model", "efficientnet_lite2"))
            print(rows[-1], flush=True)
        target = rows[0]["_acc"]
        if not a.skip_plain:
            plain = plain_recipe(cd, target, a.plain_epochs)
            rows += plain
            reached = [r for r in plain if r["_acc"] >= target]
            if reached:
                ratio = f"{reached[0]['_wall'] / rows[0]['_wall']:.1f}x"
                verdict = f"plain recipe reached {target * 100:.2f}% after {reached[0]['_wall']:.0f} s: imgclf is {ratio} faster"
            else:
                verdict = (f"plain recipe did not reach {target * 100:.2f}% in {len(plain)} epochs "
                           f"({plain[-1]['_wall']:.0f} s): imgclf is more than {plain[-1]['_wall'] / rows[0]['_wall']:.1f}x faster")
        hy_row = imgclf_row("imgclf default, empty cache", hy, tmp / "hy", tmp / "cache3")
    cols = ["method", "wall s", "val accuracy", "images/s", "peak memory GiB"]
    print("\ncats_and_dogs_filtered (train 2000, validation 1000), EfficientNet-Lite0 ImageNet weights unless noted")
    print(table(rows, cols))
    if not a.skip_plain:
        print(verdict)
    print("\nhymenoptera (train 245, val 153)")
    print(table([hy_row], cols))


if __name__ == "__main__":
    main()
