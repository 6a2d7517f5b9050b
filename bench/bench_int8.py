"""INT8 recipes for the default model, compared on validation images: accuracy,
top-1 agreement with fp32, max and mean |p8 - p32|
(per image, its largest class difference), and (with --speed) images/s.

  .venv/bin/python bench/bench_int8.py [--runs RUN ...] [--variants NAME ...] [--speed]

Each run (default: the default model, EfficientNet-Lite1 208 px with a
linear head, trained on cats_dogs_tiny and on cats_and_dogs_filtered into
runs/bench-i8-*, once) is exported to fp32 ONNX as `imgclf export` does, then
quantized by every recipe in VARIANTS (`quantize` in imgclf/deploy/export_common.py,
the function `export --int8` calls) with calibration images from the run's
*train* split; every figure is scored on the run's validation split, which no
calibration saw. "gate" says whether `export --int8` would write the file:
accuracy drop within 1 point and top-1 agreement with fp32 at least 99%.

--speed times fp32 and the recipes named by --speed-variants with
onnxruntime (its default threads) at batch 1 (median of --repeats1 calls)
and batch 32 (median of --repeats32 calls), in turns, --rounds times, each
keeping its best turn, so a busy moment on a shared machine does not land on
one model alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import DATASETS, ROOT, machine, table, timeit

from imgclf.deploy.export_common import INT8_RECIPE, Int8Recipe

R = INT8_RECIPE
OLD = dataclasses.replace(R, ops=("Conv", "Gemm", "MatMul"))  # the recipe before this benchmark
VARIANTS: dict[str, tuple[Int8Recipe, int]] = {  # name -> (recipe, calibration images)
    "before (Conv, Gemm)": (OLD, 100),
    "before, QDQ": (dataclasses.replace(OLD, format="qdq"), 100),
    "default": (R, 100),
    "default, 32 calib": (R, 32),
    "default, 300 calib": (R, 300),
    "QDQ": (dataclasses.replace(R, format="qdq"), 100),
    "no Add, GAP": (dataclasses.replace(R, ops=("Conv", "Clip", "Gemm", "MatMul")), 100),
    "per-tensor weights": (dataclasses.replace(R, per_channel=False), 100),
    "symmetric act.": (dataclasses.replace(R, symmetric_activations=True), 100),
    "entropy": (dataclasses.replace(R, calibration="entropy"), 100),
    "percentile 99.999": (dataclasses.replace(R, calibration="percentile"), 100),
    "float stem": (dataclasses.replace(R, float_layers=("conv_stem",)), 100),
    "float head": (dataclasses.replace(R, float_layers=("conv_head", "/head/")), 100),
    "float depthwise": (dataclasses.replace(R, float_layers=("conv_dw",)), 100),
    "no pre-process": (dataclasses.replace(R, preprocess=False), 100),
}
DATA = {"tiny": "cats_dogs_tiny", "cdf": "cats_and_dogs_filtered"}


def ensure_run(name: str) -> Path:
    from imgclf.runs import RunDir

    run = ROOT / "runs" / f"bench-i8-{name}"
    if not RunDir(run).model_file.exists():
        print(f"training {run} on {DATA[name]} (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "imgclf", "train", str(DATASETS / DATA[name]), "--out", str(run)],
                       check=True, capture_output=True)
    return run


def fp32_model(run: Path):
    """The run's fp32 ONNX bytes and metadata, made as `imgclf export` makes them."""
    from imgclf.deploy.export import load_source, metadata, output_names, to_onnx
    from imgclf.runs import RunDir

    src = load_source(RunDir(run), 8)
    meta = metadata(src, True)
    return src, to_onnx(src.wrapped, src.pp.size, meta, output_names(src)), meta


def accuracy_rows(run: Path, names: list[str]) -> tuple[list[dict], dict]:
    from imgclf.deploy.export import batched_probs, parity, quality, split_images
    from imgclf.deploy.export_common import quantize
    from imgclf.inference.onnx_predictor import OnnxPredictor

    src, fp32, meta = fp32_model(run)
    x_val, y_val = split_images(src.run, src.split, None, src.pp)
    p32 = batched_probs(OnnxPredictor(fp32), x_val)
    acc32 = quality(p32, y_val)
    cal: dict[int, np.ndarray] = {}
    rows, models = [], {"fp32": fp32}
    for name in names:
        recipe, n = VARIANTS[name]
        if n not in cal:
            cal[n] = split_images(src.run, "train", n, src.pp)[0]
        t0 = time.time()
        q = quantize(fp32, cal[n], meta, recipe)
        secs = time.time() - t0
        p8 = batched_probs(OnnxPredictor(q), x_val)
        acc8 = quality(p8, y_val)
        diff, agree = parity(p8, p32)
        ok = (acc32 - acc8) * 100 <= 1 + 1e-9 and agree >= 0.99
        rows.append({"run": run.name, "recipe": name, "calib": len(cal[n]), "val": len(x_val),
                     "fp32 acc": f"{acc32:.1%}", "int8 acc": f"{acc8:.1%}", "change": f"{(acc8 - acc32) * 100:+.1f}",
                     "top-1 agree": f"{agree:.1%}", "max |p8-p32|": f"{diff:.3f}",
                     "mean |p8-p32|": f"{np.abs(p8 - p32).max(1).mean():.4f}",
                     "gate": "pass" if ok else "refused", "quantize s": f"{secs:.0f}", "MB": f"{len(q) / 1e6:.1f}"})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        models[name] = q
    return rows, {"models": models, "x": x_val}


def speed_rows(run: Path, models: dict[str, bytes], x: np.ndarray, a) -> list[dict]:
    from imgclf.inference.onnx_predictor import OnnxPredictor

    preds = {k: OnnxPredictor(v) for k, v in models.items()}
    x32 = np.resize(x, (32, *x.shape[1:]))
    best = {k: [float("inf"), float("inf")] for k in preds}
    for _ in range(a.rounds):
        for k, p in preds.items():
            best[k][0] = min(best[k][0], timeit(p.probs, x32[:1], a.repeats1))
            best[k][1] = min(best[k][1], timeit(p.probs, x32, a.repeats32))
    f1, f32 = 1 / best["fp32"][0], 32 / best["fp32"][1]
    return [{"run": run.name, "model": k, "img/s b1": f"{1 / b1:.1f}", "img/s b32": f"{32 / b32:.1f}",
             "vs fp32 b1": f"{1 / b1 / f1:.2f}x", "vs fp32 b32": f"{32 / b32 / f32:.2f}x"}
            for k, (b1, b32) in best.items()]


def vnni() -> str:
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    have = [f for f in flags if "vnni" in f or f.startswith("amx")]
    return ", ".join(have) or "none (AVX2 at most: no int8 dot-product instructions)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", type=Path, help="run folders (default: the tiny and cdf default-model runs)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--speed", action="store_true", help="also time fp32 and --speed-variants")
    ap.add_argument("--speed-variants", nargs="*", default=["before (Conv, Gemm)", "no Add, GAP", "default", "QDQ"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats1", type=int, default=20)
    ap.add_argument("--repeats32", type=int, default=3)
    a = ap.parse_args()
    runs = a.runs or [ensure_run(n) for n in DATA]
    print(f"machine: {machine()}; int8 dot-product instructions: {vnni()}", flush=True)
    acc, speed = [], []
    for run in runs:
        names = list(dict.fromkeys(a.variants + (a.speed_variants if a.speed else [])))
        rows, got = accuracy_rows(run, names)
        acc += rows
        if a.speed:
            models = {k: got["models"][k] for k in ["fp32", *a.speed_variants]}
            speed += speed_rows(run, models, got["x"], a)
            print(table(speed, list(speed[0])), flush=True)
    print("\n" + table(acc, list(acc[0])))
    if speed:
        print("\n" + table(speed, list(speed[0])))


if __name__ == "__main__":
    main()
