"""Every export format, fp32 and INT8, in one table: file size, validation
accuracy, images/s on this CPU and parity with the PyTorch model.

  .venv/bin/python bench/bench_formats.py [--run RUN]

One trained model (default: EfficientNet-Lite0 trained on cats_dogs_tiny,
into runs/bench-tiny when missing) exported by `imgclf export` to onnx, ort,
torchscript and tflite, with --int8 where the format has it (INT8 is written
with force=True so it can be measured; the "INT8 gate" column says whether the
default gate, --max-drop 1, would have let it through). Each file then runs on
the validation images of the run (100 for cats_dogs_tiny) in the engine an
app would use: onnxruntime (.onnx, .ort), PyTorch's TorchScript runtime, the
LiteRT interpreter (.tflite, XNNPACK). Parity: max |p - p_torch| over all
images and classes, and top-1 agreement, against eager PyTorch (the baseline
row, measured in the same run). Speed: uint8 224x224 inputs (the PIL resize is
common to all and not timed); the engines are timed in turns, --rounds times
(each turn: the median of 5 calls at batch 1, one call at batch 32), and each
keeps its best turn, so a busy moment on a shared machine does not land on one
engine alone. The .tflite graph has batch size 1, as phones call it, so its
batch-32 figure is 32 calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_infer import ensure_run
from common import ROOT, machine, table, timeit

FORMATS = [("onnx", False), ("onnx", True), ("ort", False), ("ort", True), ("torchscript", False),
           ("tflite", False), ("tflite", True)]


def torchscript_fn(path: Path):
    import torch

    m = torch.jit.load(str(path))

    def fn(x):
        with torch.inference_mode():
            return m(torch.from_numpy(x)).numpy()
    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-tiny")
    ap.add_argument("--rounds", type=int, default=8, help="turns of timing every engine")
    a = ap.parse_args()

    import torch

    import imgclf
    from imgclf.config import ExportConfig
    from imgclf.deploy.export import export, probs_module, split_images
    from imgclf.deploy.export_common import int8_verdict
    from imgclf.models.records import model_from_record
    from imgclf.runs import RunDir

    run = RunDir(ensure_run(a.run))
    record = run.record()
    pp = imgclf.load(run.path, engine="torch").preprocess
    x_val, y_val = split_images(run, "val", None, pp)
    wrapped = probs_module(model_from_record(record), pp, record.get("temperature", 1.0))

    def torch_fn(x):
        with torch.inference_mode():
            return wrapped(torch.from_numpy(x)).numpy()

    fns = {}

    def measure(name: str, fn, size: str, extra: dict) -> dict:
        p = np.concatenate([fn(x_val[i:i + 32]) for i in range(0, len(x_val), 32)])
        fns[name] = fn
        row = {"format": name, "file MB": size, "val accuracy": f"{(p.argmax(1) == y_val).mean():.1%}", **extra}
        print(f"  {name}: exported and checked", file=sys.stderr, flush=True)
        return row, p

    rows = []
    base, p_torch = measure("PyTorch eager (baseline)", torch_fn, "-", {})
    base.update({"max abs diff vs PyTorch": "0", "top-1 agreement": "100%", "INT8 gate": "-", "export s": "-"})
    rows.append(base)
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-formats-"))
    for fmt, int8 in FORMATS:
        out = tmp / run.export_file(fmt, int8).name
        t0 = time.time()
        r = export(ExportConfig(run=str(run), format=fmt, int8=int8, force=True, out=str(out)))
        seconds = time.time() - t0
        fn = torchscript_fn(out) if fmt == "torchscript" else imgclf.load(out).probs
        gate = "-" if not int8 else ("pass" if int8_verdict(r["fp32_accuracy"], r["int8_accuracy"], 1.0, False)
                                     is None else "refused (forced here)")
        row, p = measure(f"{fmt} {'INT8' if int8 else 'fp32'}", fn, f"{out.stat().st_size / 1e6:.1f}",
                         {"INT8 gate": gate, "export s": f"{seconds:.0f}"})
        row["max abs diff vs PyTorch"] = f"{np.abs(p - p_torch).max():.1e}"
        row["top-1 agreement"] = f"{(p.argmax(1) == p_torch.argmax(1)).mean():.0%}"
        rows.append(row)
    best1, best32 = dict.fromkeys(fns, float("inf")), dict.fromkeys(fns, float("inf"))
    for _ in range(a.rounds):
        for name, fn in fns.items():
            best1[name] = min(best1[name], timeit(fn, x_val[:1], 5))
            best32[name] = min(best32[name], timeit(fn, x_val[:32], 1))
    for row in rows:
        row["batch 1 img/s"] = f"{1 / best1[row['format']]:.1f}"
        row["batch 32 img/s"] = f"{32 / best32[row['format']]:.1f}"
    print(f"Machine: {machine()}, torch threads {torch.get_num_threads()}; load average at the end "
          f"{os.getloadavg()[0]:.1f} (shared machine)")
    print(f"Model: {record['arch']} {pp.size}px from {run}; val = {len(y_val)} images of cats_dogs_tiny; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(table(rows, ["format", "file MB", "val accuracy", "max abs diff vs PyTorch", "top-1 agreement",
                       "batch 1 img/s", "batch 32 img/s", "INT8 gate", "export s"]))


if __name__ == "__main__":
    main()
