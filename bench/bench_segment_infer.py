"""A segmenter's inference engines at CamVid's full frame, measured in one run.

  .venv/bin/python bench/bench_segment_infer.py --run RUN

RUN is a CamVid segmentation run, e.g. the one bench/bench_segment.py trains
(/tmp/bench_segment_0/imgclf_s0_0_default_default: Lite0 + FPN decoder,
480 px). The same run as PyTorch eager (the network, the logits resized to
the frame and the argmax: the baseline) and ONNX Runtime fp32 and INT8
(`imgclf export`, `--int8 --force`: the resize, network, upsampling and
argmax in one graph, a uint8 label map out), fed the 480x360 test frames
themselves (at image_size 480 the resize is the identity). Images/s at
batch 1 and 8, and each export's pixel agreement with PyTorch's label maps
and its mIoU on the run's held-out split, so a faster engine that answers
differently shows it. Two and one intra-op threads: on a busy machine two
spinning threads can cost more than they give (OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import machine, one_thread, speed_columns, speedup, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("/tmp/bench_segment_0/imgclf_s0_0_default_default"))
    ap.add_argument("--repeats1", type=int, default=10, help="timed calls at batch 1")
    ap.add_argument("--repeats8", type=int, default=3, help="timed calls at batch 8")
    a = ap.parse_args()

    import torch

    from imgclf.config import ExportConfig
    from imgclf.data.images import open_image
    from imgclf.deploy.export import export
    from imgclf.tasks.segment.data import read_dataset
    from imgclf.tasks.segment.evaluate import evaluate_items
    from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor
    from imgclf.tasks.segment.torch_predictor import TorchSegPredictor

    if not (a.run / "model.pt").exists():
        raise SystemExit(f"{a.run}: no run; train one with bench/bench_segment.py --seed 0 (see its docstring)")
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    r32 = export(ExportConfig(run=str(a.run), out=str(tmp / "fp32.onnx")))
    r8 = export(ExportConfig(run=str(a.run), out=str(tmp / "int8.onnx"), int8=True, force=True))
    ref = TorchSegPredictor.from_run(a.run, device="cpu")
    splits = json.loads((a.run / "splits.json").read_text())
    frames = np.stack([np.asarray(open_image(p)) for p in splits["test"][:8]])
    assert frames.shape[1:] == (360, 480, 3), frames.shape  # the full frame, as a camera gives it
    x = np.stack([ref.prepare(f)[0] for f in frames])
    fp32, int8 = OnnxSegPredictor(tmp / "fp32.onnx"), OnnxSegPredictor(tmp / "int8.onnx")
    threads = torch.get_num_threads()

    want = [m["mask"] for m in ref.predict(list(frames))]  # PyTorch's label maps, once

    def agreement(pred) -> str:
        got = [m["mask"] for m in pred.predict(list(frames))]
        return f"{np.mean([(g == w).mean() for g, w in zip(got, want)]):.2%}"

    ds = read_dataset(splits["root"], splits["format"], splits["ignore_index"], strict=False)
    index = {str(it.image): i for i, it in enumerate(ds.items)}
    test = [index[p] for p in splits["test"]]
    a32 = agreement(fp32)  # the 1-thread session runs the same file
    miou = {name: evaluate_items(p, ds, test)["miou"] for name, p in (("torch", ref), ("fp32", fp32), ("int8", int8))}
    engines = {f"PyTorch eager, {threads} threads (baseline)": (ref.outputs, x, "100%", miou["torch"]),
               "PyTorch eager, 1 thread": (one_thread(ref.outputs), x, "100%", miou["torch"]),
               "ONNX Runtime fp32": (fp32.outputs, frames, a32, miou["fp32"]),
               "ONNX Runtime fp32, 1 thread": (OnnxSegPredictor(tmp / "fp32.onnx", threads=1).outputs, frames,
                                               a32, miou["fp32"]),
               "ONNX Runtime INT8": (int8.outputs, frames, agreement(int8), miou["int8"])}
    rows = []
    for name, (fn, data, agree, m) in engines.items():
        rows.append({"engine": name, **speed_columns(fn, data, (1, 8), (a.repeats1, a.repeats8), ms_digits=0),
                     "pixels as PyTorch": agree, "test mIoU": f"{m:.3f}"})
        print(f"  {name}: done", file=sys.stderr, flush=True)
    for r, s1, s8 in zip(rows, speedup(rows, "batch 1 img/s"), speedup(rows, "batch 8 img/s")):
        r["speed-up b1 / b8"] = f"{s1} / {s8}"
    print(f"Machine: {machine()}, torch threads {threads}")
    print(f"Model: {ref.arch} at {ref.image_size} px from {a.run}; export parity {r32.get('parity_pixel_agreement')}; "
          f"INT8 val mIoU {r8['fp32_miou']:.3f} -> {r8['int8_miou']:.3f}; sizes: fp32 "
          f"{(tmp / 'fp32.onnx').stat().st_size / 1e6:.1f} MB, INT8 {(tmp / 'int8.onnx').stat().st_size / 1e6:.1f} MB\n")
    print(table(rows, ["engine", "batch 1 img/s", "batch 1 ms/img", "batch 8 img/s", "batch 8 ms/img",
                       "speed-up b1 / b8", "pixels as PyTorch", "test mIoU"]))


if __name__ == "__main__":
    main()
