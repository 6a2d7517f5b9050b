"""Inference engines for a deployed model, measured in one run.

  .venv/bin/python bench/bench_infer.py [--run RUN]

The same trained model (default: EfficientNet-Lite0 trained on cats_dogs_tiny,
into runs/bench-tiny when missing) as PyTorch eager (the baseline), ONNX
Runtime fp32 and ONNX Runtime INT8 (`imgclf export --int8`): images/s and
per-image latency at batch 1 and 32 on uint8 224x224 images (the resize in
PIL is the same for all three and not timed), and validation accuracy of each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import DATASETS, ROOT, machine, speed_columns, speedup, table


def ensure_run(run: Path) -> Path:
    from imgclf.runs import RunDir

    if not RunDir(run).model_file.exists():
        print(f"training {run} on cats_dogs_tiny (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "imgclf", "train", str(DATASETS / "cats_dogs_tiny"), "--out", str(run)],
                       check=True, capture_output=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-tiny")
    ap.add_argument("--repeats1", type=int, default=30, help="timed calls at batch 1")
    ap.add_argument("--repeats32", type=int, default=3, help="timed calls at batch 32")
    a = ap.parse_args()

    import torch

    from imgclf.config import ExportConfig
    from imgclf.data.preprocess import Preprocess
    from imgclf.deploy.export import export, probs_module, split_images
    from imgclf.inference.onnx_predictor import OnnxPredictor
    from imgclf.models.records import model_from_record
    from imgclf.runs import RunDir

    run = RunDir(ensure_run(a.run))
    record = run.record()
    pp = Preprocess.from_dict(record["preprocess"])
    x_val, y_val = split_images(run, "val", None, pp)
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    export(ExportConfig(run=str(run), out=str(tmp / "fp32.onnx")))  # the library is silent without a log handler
    r8 = export(ExportConfig(run=str(run), out=str(tmp / "int8.onnx"), int8=True, force=True))

    wrapped = probs_module(model_from_record(record), pp, record.get("temperature", 1.0))

    def torch_fn(x):
        with torch.inference_mode():
            return wrapped(torch.from_numpy(x)).numpy()

    engines = {"PyTorch eager (baseline)": torch_fn,
               "ONNX Runtime fp32": OnnxPredictor(tmp / "fp32.onnx").probs,
               "ONNX Runtime INT8": OnnxPredictor(tmp / "int8.onnx").probs}
    rows = []
    for name, fn in engines.items():
        acc = float((np.concatenate([fn(x_val[i:i + 32]) for i in range(0, len(x_val), 32)]).argmax(1) == y_val).mean())
        rows.append({"engine": name, "val accuracy": f"{acc:.1%}",
                     **speed_columns(fn, x_val, (1, 32), (a.repeats1, a.repeats32))})
        print(f"  {name}: done", file=sys.stderr, flush=True)
    for r, s in zip(rows, speedup(rows, "batch 32 img/s")):
        r["speed-up (b32)"] = s
    print(f"Machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(f"Model: {record['arch']} {record['preprocess']['size']}px from {run}; val = {len(y_val)} images of "
          f"cats_dogs_tiny; INT8 calibrated on {r8['calib_images']} train images; sizes: fp32 "
          f"{(tmp / 'fp32.onnx').stat().st_size / 1e6:.1f} MB, INT8 {(tmp / 'int8.onnx').stat().st_size / 1e6:.1f} MB\n")
    print(table(rows, ["engine", "val accuracy", "batch 1 img/s", "batch 1 ms/img", "batch 32 img/s", "batch 32 ms/img",
                       "speed-up (b32)"]))


if __name__ == "__main__":
    main()
