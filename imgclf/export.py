"""`imgclf export RUN`: a self-contained model file for deployment.

ONNX (default): the graph takes uint8 RGB images (N, H, W, 3) at the model's
input size, normalises inside, and returns softmax(logits / temperature), the
calibrated probabilities; the batch size is dynamic. Class names, the
preprocessing (size, resize policy) and versions are in the file's metadata,
so `imgclf predict model.onnx` and `imgclf serve model.onnx` need nothing else
(and no torch: see onnx_model.py). The resize stays outside the graph, in
PIL, because crop/pad/squash of arbitrary-sized images is not something every
ONNX runtime does the same way, and the exact training resize matters more.

Every export checks itself against PyTorch on validation images and fails
loudly when they disagree. `--int8` adds static quantization (onnxruntime),
calibrated on training images, and refuses when validation accuracy drops by
more than `max_drop` points unless forced.

TorchScript: the same wrapper (uint8 NHWC in, probabilities out), traced,
with the metadata as an extra file `imgclf.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from .onnx_model import FORMAT, INPUT, OUTPUT

PARITY_ATOL = 1e-4  # fp32 onnxruntime vs PyTorch probabilities, max abs difference


class ExportError(ValueError):
    """An export that failed its own check; the message says what to do."""


def _wrapper(model, pp, temperature: float):
    """PyTorch module: uint8 (N, H, W, 3) -> probabilities (N, C)."""
    import torch
    from torch import nn

    class Probs(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # mean/std are on [0, 1] pixels; fold the /255 into them.
            self.register_buffer("mean", torch.tensor(pp.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(pp.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.inv_t = 1.0 / float(temperature)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).float()
            x = (x - self.mean) / self.std
            return torch.softmax(self.model(x) * self.inv_t, dim=1)

    return Probs().eval()


def _metadata(record: dict, run: Path, int8: bool) -> dict[str, str]:
    from . import __version__

    pp = record["preprocess"]
    metrics = {}
    for split in ("test", "val"):
        f = run / f"eval_{split}.json"
        if f.exists():
            m = json.loads(f.read_text())
            metrics = {"split": split, "n": m.get("n"), "accuracy": m.get("accuracy"),
                       "balanced_accuracy": m.get("balanced_accuracy")}
            break
    meta = {
        "format": FORMAT,
        "classes": record["classes"],
        "preprocess": pp,
        "input_size": pp["size"],
        "resize": pp["resize"],
        "input": f"uint8 RGB images (N, {pp['size']}, {pp['size']}, 3), resized by '{pp['resize']}' outside the graph",
        "output": "calibrated probabilities (N, C) = softmax(logits / temperature)",
        "temperature": float(record.get("temperature", 1.0)),
        "arch": record["arch"],
        "imgclf_version": __version__,
        "trained_with": record.get("imgclf_version", "?"),
        "metrics": metrics,
        "int8": int8,
        "run": run.name,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def split_images(run: Path, split: str, limit: int | None = None, record: dict | None = None):
    """uint8 (N, S, S, 3) images of a run's split, resized as in training, and
    their labels. Unreadable files are skipped (training skipped them too)."""
    from .data import Splits
    from .images import BadImage, open_image
    from .preprocess import Preprocess, resize_image
    from .runs import read_json

    f = run / "splits.json"
    if not f.exists():
        raise ExportError(f"{f} is missing: export needs the run's splits to check itself; "
                          f"export from the run directory that `imgclf train` wrote")
    s = Splits.from_dict(read_json(f))
    items = getattr(s, split)
    if limit:
        # Every k-th item, so a subset still covers every class (splits are sorted by class).
        items = items[::max(1, len(items) // limit)][:limit]
    pp = Preprocess.from_dict(record["preprocess"])
    xs, ys = [], []
    for rel, y in items:
        try:
            xs.append(np.asarray(resize_image(open_image(s.path(rel), draft_size=pp.draft_size), pp), np.uint8))
            ys.append(y)
        except BadImage:
            continue
    if not xs:
        raise ExportError(f"no readable images in the run's {split} split under {s.root}; "
                          f"is the data still there?")
    return np.stack(xs), np.array(ys)


def _val_split(run: Path) -> str:
    from .runs import read_json

    d = read_json(run / "splits.json")
    return "val" if d.get("val") else "test"


def _run_dir(run: str | Path) -> Path:
    p = Path(run)
    return p.parent if p.suffix == ".pt" else p


def _ort_session(path_or_bytes, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _ort_probs(sess, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run([OUTPUT], {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _images_per_second(sess, x: np.ndarray, repeats: int = 3) -> float:
    sess.run([OUTPUT], {INPUT: x[:1]})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop: float, force: bool) -> str | None:
    """None if the INT8 model may be written; otherwise why not (and how to override)."""
    drop = (fp32_acc - int8_acc) * 100
    if drop <= max_drop + 1e-9 or force:
        return None
    return (f"INT8 accuracy drops by {drop:.1f} points ({fp32_acc:.1%} -> {int8_acc:.1%} on validation), "
            f"over the limit of {max_drop:g}; the file was not written. Use the fp32 export, calibrate on more "
            f"images (--calib-images), or write it anyway with --force (or raise --max-drop)")


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, int8: bool = False,
           max_drop: float = 1.0, force: bool = False, calib_images: int = 100, check_images: int = 32,
           printer=print) -> dict:
    """Export a run; returns a report dict (path, parity, INT8 accuracy and speed)."""
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown format {fmt!r}; use onnx or torchscript")
    if int8 and fmt != "onnx":
        raise ValueError("--int8 is for --format onnx (onnxruntime quantization)")
    import torch

    from .runs import model_file_path, model_from_record, torch_load
    from .preprocess import Preprocess

    run_dir = _run_dir(run)
    record = torch_load(model_file_path(run))
    pp = Preprocess.from_dict(record["preprocess"])
    wrapped = _wrapper(model_from_record(record), pp, record.get("temperature", 1.0))
    split = _val_split(run_dir)
    x_check, _ = split_images(run_dir, split, check_images, record)
    with torch.inference_mode():
        p_torch = wrapped(torch.from_numpy(x_check)).numpy()
    suffix = {"onnx": ".int8.onnx" if int8 else ".onnx", "torchscript": ".torchscript.pt"}[fmt]
    out = Path(out) if out else run_dir / f"model{suffix}"
    meta = _metadata(record, run_dir, int8)
    report: dict = {"format": fmt, "path": str(out), "int8": int8, "classes": record["classes"],
                    "input_size": pp.size, "check_split": split, "check_images": len(x_check)}

    if fmt == "torchscript":
        from .runs import atomic_write_bytes
        import io

        with torch.inference_mode():
            traced = torch.jit.trace(wrapped, torch.from_numpy(x_check[:2]), check_trace=False)
            diff = float(np.abs(traced(torch.from_numpy(x_check)).numpy() - p_torch).max())
        if diff > PARITY_ATOL:
            raise ExportError(f"TorchScript probabilities differ from eager PyTorch by {diff:.2e} (limit {PARITY_ATOL:g})")
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"imgclf.json": json.dumps(meta)})
        atomic_write_bytes(out, buf.getvalue())
        report["max_abs_diff"] = diff
        printer(f"wrote {out} (TorchScript; max |p - p_torch| = {diff:.1e} on {len(x_check)} {split} images)")
        return report

    fp32 = _to_onnx(wrapped, pp.size, meta)
    sess = _ort_session(fp32)
    diff = float(np.abs(_ort_probs(sess, x_check) - p_torch).max())
    report["max_abs_diff"] = diff
    if diff > PARITY_ATOL:
        raise ExportError(f"onnxruntime's probabilities differ from PyTorch's by {diff:.2e} on {len(x_check)} "
                          f"{split} images (limit {PARITY_ATOL:g}); the export is wrong, not written. "
                          f"Set IMGCLF_DEBUG=1 and report it with the run's model.pt")
    printer(f"parity: max |p_onnx - p_torch| = {diff:.1e} on {len(x_check)} {split} images (limit {PARITY_ATOL:g})")
    data = fp32
    if int8:
        data = _int8(fp32, meta, run_dir, record, split, calib_images, max_drop, force, report, printer)
    from .runs import atomic_write_bytes

    atomic_write_bytes(out, data)
    report["bytes"] = len(data)
    printer(f"wrote {out} ({len(data) / 1e6:.1f} MB{', INT8' if int8 else ''}); "
            f"try it: imgclf predict {out} IMAGE  |  imgclf serve {out}")
    return report


def _to_onnx(wrapped, size: int, meta: dict[str, str]) -> bytes:
    import io
    import warnings

    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, torch.zeros(1, size, size, 3, dtype=torch.uint8), buf,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}}, opset_version=17, dynamo=False)
    return _with_metadata(onnx.load_from_string(buf.getvalue()), meta)


def _with_metadata(m, meta: dict[str, str]) -> bytes:
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.doc_string = "imgclf image classifier: " + meta["input"] + " -> " + meta["output"]
    return m.SerializeToString()


def _int8(fp32: bytes, meta: dict[str, str], run_dir: Path, record: dict, split: str, calib_images: int,
          max_drop: float, force: bool, report: dict, printer) -> bytes:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x_cal, _ = split_images(run_dir, "train", calib_images, record)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(x_cal), 8))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {INPUT: x_cal[i:i + 8]}

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # Per-channel weights keep the depthwise convs accurate. On this AVX2 CPU
        # (no VNNI) the QOperator format with u8 activations / s8 weights was
        # the only variant faster than fp32 (1.2x; QDQ was 0.9x, u8/u8 QDQ 0.25x).
        # Only convolutions and the classifier are quantized: normalisation and
        # softmax stay float.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns per tensor about bias scales
        try:
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        q = _with_metadata(onnx.load(str(dst)), meta)
    report["calib_images"] = len(x_cal)
    report["calib_seconds"] = round(time.time() - t0, 1)

    x_val, y_val = split_images(run_dir, split, None, record)
    s32, s8 = _ort_session(fp32), _ort_session(q)
    acc32 = float((_ort_probs(s32, x_val).argmax(1) == y_val).mean())
    acc8 = float((_ort_probs(s8, x_val).argmax(1) == y_val).mean())
    xb = x_val[:16]
    ips32, ips8 = _images_per_second(s32, xb), _images_per_second(s8, xb)
    report.update({"val_images": len(x_val), "fp32_accuracy": acc32, "int8_accuracy": acc8,
                   "accuracy_change_points": round((acc8 - acc32) * 100, 2),
                   "fp32_images_per_s": round(ips32, 1), "int8_images_per_s": round(ips8, 1),
                   "speedup": round(ips8 / ips32, 2)})
    printer(f"INT8: {split} accuracy {acc32:.1%} -> {acc8:.1%} ({(acc8 - acc32) * 100:+.1f} points, {len(x_val)} images); "
            f"speed {ips32:.0f} -> {ips8:.0f} images/s at batch {len(xb)} ({ips8 / ips32:.2f}x); "
            f"calibrated on {len(x_cal)} train images in {report['calib_seconds']} s")
    why = int8_verdict(acc32, acc8, max_drop, force)
    if why:
        raise ExportError(why)
    if force and (acc32 - acc8) * 100 > max_drop:
        printer(f"warning: writing the INT8 model despite a drop over {max_drop:g} points (--force)")
    return q
