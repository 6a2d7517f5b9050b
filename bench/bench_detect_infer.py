"""A detector's inference engines, measured in one run.

  .venv/bin/python bench/bench_detect_infer.py [--run RUN]

The same detection run (default: EfficientNet-Lite0 + RetinaNet trained for
2 epochs at 256 px on the first 24 BCCD images, into runs/bench-detect when
missing) as PyTorch eager (the network and torchvision's postprocess: the
baseline), ONNX Runtime fp32 and INT8 (`imgclf export`, `--int8`: the
letterbox, network and NMS in one graph): images/s at batch 1 and 8 on the
letterboxed uint8 images (the Pillow letterbox is the same for all and not
timed), and the fp32 graph fed the 640x480 photos themselves (its letterbox
inside, timed). Every engine returns the candidates above 0.05 (at most 300
per image) that NMS keeps, so a barely trained model, which scores many
candidates, costs the postprocess more than a well-trained one. PyTorch
and onnxruntime also run at one intra-op thread: on a busy machine, two
spinning threads can cost PyTorch far more than they give.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import DATASETS, ROOT, machine, one_thread, speed_columns, speedup, table


def ensure_run(run: Path) -> Path:
    if not (run / "model.pt").exists():
        data = run.parent / (run.name + "-data")
        (data / "Annotations").mkdir(parents=True, exist_ok=True)
        (data / "JPEGImages").mkdir(exist_ok=True)
        for xml in sorted((DATASETS / "bccd" / "Annotations").glob("*.xml"))[:24]:
            shutil.copy(xml, data / "Annotations")
            shutil.copy(DATASETS / "bccd" / "JPEGImages" / f"{xml.stem}.jpg", data / "JPEGImages")
        print(f"training {run} on 24 BCCD images (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "imgclf", "train", str(data), "--out", str(run), "--epochs", "2",
                        "--image-size", "256"], check=True, capture_output=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-detect")
    ap.add_argument("--repeats1", type=int, default=20, help="timed calls at batch 1")
    ap.add_argument("--repeats8", type=int, default=5, help="timed calls at batch 8")
    a = ap.parse_args()

    import torch

    from imgclf.config import ExportConfig
    from imgclf.data.images import open_image
    from imgclf.deploy.export import export
    from imgclf.runs import RunDir
    from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
    from imgclf.tasks.detect.splits import DetSplits
    from imgclf.tasks.detect.torch_predictor import TorchDetPredictor

    run = ensure_run(a.run)
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    export(ExportConfig(run=str(run), out=str(tmp / "fp32.onnx")))
    r8 = export(ExportConfig(run=str(run), out=str(tmp / "int8.onnx"), int8=True, force=True))
    ref = TorchDetPredictor.from_run(run, device="cpu")
    photos = sorted(Path(DetSplits.read(RunDir(run)).data).rglob("*.jpg"))[:8]
    x = np.stack([ref.prepare(str(p))[0] for p in photos])
    raw = np.stack([np.asarray(open_image(p)) for p in photos])  # every BCCD photo is 640x480
    fp32 = OnnxDetPredictor(tmp / "fp32.onnx")
    threads = torch.get_num_threads()

    engines = {f"PyTorch eager, {threads} threads (baseline)": (ref.outputs, x),
               "PyTorch eager, 1 thread": (one_thread(ref.outputs), x),
               "ONNX Runtime fp32": (fp32.outputs, x),
               "ONNX Runtime fp32, 1 thread": (OnnxDetPredictor(tmp / "fp32.onnx", threads=1).outputs, x),
               "ONNX Runtime INT8": (OnnxDetPredictor(tmp / "int8.onnx").outputs, x),
               "ONNX Runtime fp32, 640x480 photos in": (
                   lambda b: fp32.session.run(["boxes", "scores", "labels"], {"images": b}), raw)}
    rows = []
    for name, (fn, data) in engines.items():
        rows.append({"engine": name, **speed_columns(fn, data, (1, 8), (a.repeats1, a.repeats8), ms_digits=0)})
        print(f"  {name}: done", file=sys.stderr, flush=True)
    for r, s1, s8 in zip(rows, speedup(rows, "batch 1 img/s"), speedup(rows, "batch 8 img/s")):
        r["speed-up b1 / b8"] = f"{s1} / {s8}"
    print(f"Machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(f"Model: {ref.arch} {ref.preprocess.size}px from {run}; INT8 val mAP@.5 {r8['fp32_map50']:.3f} -> "
          f"{r8['int8_map50']:.3f}; sizes: fp32 {(tmp / 'fp32.onnx').stat().st_size / 1e6:.1f} MB, INT8 "
          f"{(tmp / 'int8.onnx').stat().st_size / 1e6:.1f} MB\n")
    print(table(rows, ["engine", "batch 1 img/s", "batch 1 ms/img", "batch 8 img/s", "batch 8 ms/img",
                       "speed-up b1 / b8"]))


if __name__ == "__main__":
    main()
