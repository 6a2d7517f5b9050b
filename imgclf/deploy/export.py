"""`imgclf export RUN`: a self-contained model file for deployment.

ONNX (default): the graph takes uint8 RGB images (N, H, W, 3) at the model's
input size, normalises inside, and returns softmax(logits / temperature), the
calibrated probabilities; the batch size is dynamic. Class names, the
preprocessing (size, resize policy) and versions are in the file's metadata,
so `imgclf predict model.onnx` and `imgclf serve model.onnx` need nothing else
(and no torch: see inference/onnx_predictor.py). The graph is traced from the
same `normalize` and `calibrated_probs` PyTorch runs, and the file records the
hash of the model.pt it came from, so a later retrain or recalibration makes
`predict`/`serve` warn that the export is stale. The resize stays outside that graph, in
Pillow, exactly as in training (JPEG draft decoding included).

`--any-size` (onnx, ort) and the web export put the resize inside the graph
instead (deploy/resize_graph.py): uint8 photos of any size in, for apps that
decode a photo and should not port the resize. It is checked on the check
images decoded at full size: its resize against Pillow's (RESIZE_LEVELS), the
whole graph against that resize fed to the checked fixed-size model.

Every export checks itself against PyTorch on validation images and fails
loudly when they disagree. `--int8` adds static quantization (onnxruntime),
calibrated on training images, and refuses when validation accuracy drops by
more than `max_drop` points, or the top-1 answers agree with fp32's on fewer
than `min_agreement` of the validation images, unless forced.

TorchScript: the same wrapper (uint8 NHWC in, probabilities out), traced,
with the metadata as an extra file `imgclf.json`.

TFLite (LiteRT, for Android): the same wrapper converted by litert-torch
(deploy/tflite.py says why that converter), the metadata in the flatbuffer,
checked with the LiteRT interpreter; `--int8` is dynamic-range INT8 behind the
same accuracy gate.

Web: a static folder (imgclf/deploy/web) holding the checked any-size ONNX
model, its metadata as model.json, ONNX Runtime Web and a page that decodes the
photo and hands it to the graph; it works offline after the first visit.

A detection run goes to deploy/export_detect.py; what both drivers share
(check images, ONNX metadata, INT8, .ort) is in deploy/export_common.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.config import ExportConfig
from imgclf.data.datasets import multi_hot
from imgclf.data.images import BadImage, open_image
from imgclf.data.preprocess import normalize, resize_image
from imgclf.deploy.export_common import every_kth, int8_verdict, quantize, to_ort, with_metadata
from imgclf.deploy.export_detect import export_detector
from imgclf.deploy.export_segment import export_segmenter
from imgclf.deploy.resize_graph import resize_model, with_resize
from imgclf.deploy.tflite import quantize_tflite, to_tflite
from imgclf.deploy.tflite import with_metadata as tflite_metadata
from imgclf.deploy.web import site
from imgclf.deploy.web.site import is_export
from imgclf.errors import ConfigError, ExportError
from imgclf.evaluation.metrics import mean_average_precision
from imgclf.inference.litert_predictor import LiteRTPredictor
from imgclf.inference.onnx_predictor import (
    FORMAT,
    INPUT,
    OUTPUT,
    REJECTED_OUTPUT,
    RESIZE_IN_GRAPH,
    SELECTED_OUTPUT,
    UNKNOWN_OUTPUT,
    OnnxPredictor,
)
from imgclf.inference.torch_predictor import TorchPredictor, calibrated_probs
from imgclf.io import atomic_write_bytes, atomic_write_folder, check_replaceable_folder
from imgclf.log import get_logger
from imgclf.models.records import model_from_record
from imgclf.models.same_pad import trace_to_onnx
from imgclf.ort import ort_session
from imgclf.runs import RunDir
from imgclf.tasks import task_of

log = get_logger(__name__)

PARITY_ATOL = 1e-4  # fp32 onnxruntime vs PyTorch probabilities, max abs difference
ORT_ATOL = 1e-5  # .ort vs the .onnx it was saved from: the same engine and graph
# The any-size graph's resize vs Pillow's plain resize of the same full-size
# decode, max difference in levels: onnxruntime's fixed-point rounding differs
# from Pillow's by one level on a few percent of pixels (two, rarely, upscaling).
RESIZE_LEVELS = 2


def probs_module(model, pp, temperature: float, scorer=None, reject: float | None = None, thresholds=None):
    """PyTorch module: uint8 (N, H, W, 3) -> calibrated probabilities (N, C),
    from the same functions every other path runs. With an unknown-input
    scorer, also the unknown score (N,) and whether it is rejected (N,); for a
    multi-label model (sigmoid scores), the labels at or above their
    thresholds (N, C) last. Decisions are in the graph, so an app needs no
    threshold logic of its own."""
    import torch
    from torch import nn


    class Probs(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.scorer = model, scorer
            self.register_buffer("thresholds", torch.as_tensor(thresholds if thresholds is not None else [],
                                                               dtype=torch.float32))

        def forward(self, images):
            f = self.model.forward_features(normalize(images.permute(0, 3, 1, 2), pp))
            p = calibrated_probs(self.model.forward_head(f), float(temperature), thresholds is not None)
            out = [p]
            if self.scorer is not None:
                u = self.scorer(f)
                out += [u, (u > reject) if reject is not None else torch.zeros_like(u, dtype=torch.bool)]
            if thresholds is not None:
                out.append(p >= self.thresholds)
            return tuple(out) if len(out) > 1 else p

    return Probs().eval()


def output_names(src: ExportSource) -> list[str]:
    return ([OUTPUT] + ([UNKNOWN_OUTPUT, REJECTED_OUTPUT] if src.record.get("unknown") else [])
            + ([SELECTED_OUTPUT] if src.record.get("multi_label") else []))


@dataclass
class ExportSource:
    """The run being exported: its record, wrapped model and check images."""

    run: RunDir
    record: dict
    pp: object  # Preprocess
    wrapped: object  # probs_module
    split: str  # the split the parity and accuracy checks use
    x_check: np.ndarray
    p_torch: np.ndarray
    u_torch: np.ndarray | None  # unknown scores, if the run has a scorer


def load_source(run: RunDir, check_images: int, reject: str | None = None) -> ExportSource:
    """The run's model, and the reference probabilities every export must
    reproduce: the eager-PyTorch Predictor's, the path `imgclf.load(run)` takes."""
    record = run.record()
    reference = TorchPredictor(record, device="cpu", engine="torch")
    reference.set_reject(reject)
    record["reject"] = reference.reject  # what the metadata and the graph carry
    pp = reference.preprocess
    wrapped = probs_module(model_from_record(record), pp, reference.temperature, reference.scorer, reference.reject,
                           reference.thresholds if reference.multi_label else None)
    split = run.selection_split()
    x_check, _ = split_images(run, split, check_images, pp)
    return ExportSource(run, record, pp, wrapped, split, x_check, *reference.outputs(x_check))


def input_metadata(pp, any_size: bool) -> dict[str, str]:
    """What `images` takes: resized outside the graph, or any size (the resize inside)."""
    text = (f"uint8 RGB images (N, H, W, 3) of any size, decoded at full size, upright; resized by "
            f"'{pp.resize}' to {pp.size} px inside the graph" if any_size else
            f"uint8 RGB images (N, {pp.size}, {pp.size}, 3), resized by '{pp.resize}' outside the graph")
    return {"input": text, RESIZE_IN_GRAPH: json.dumps(any_size)}


def metadata(src: ExportSource, int8: bool) -> dict[str, str]:
    pp, record = src.pp, src.record
    meta = {
        "format": FORMAT, "classes": record["classes"], "preprocess": pp.to_dict(), "input_size": pp.size,
        "resize": pp.resize,
        **input_metadata(pp, any_size=False),
        "output": ("per-label probabilities (N, C) = sigmoid(logits); selected (N, C): at or above the label's "
                   "threshold" if record.get("multi_label") else
                   "calibrated probabilities (N, C) = softmax(logits / temperature)") + (
            "; unknown (N,): share of known validation images more familiar than the input (kNN distance in "
            "feature space); rejected (N,): unknown > reject" if record.get("unknown") else ""),
        "reject": record.get("reject"),
        "multi_label": bool(record.get("multi_label")), "thresholds": record.get("thresholds"),
        "temperature": float(record.get("temperature", 1.0)), "arch": record["arch"], "imgclf_version": __version__,
        "trained_with": record.get("imgclf_version", "?"), "metrics": src.run.headline_metrics(), "int8": int8,
        "run": src.run.path.name, "run_path": str(src.run.path.resolve()), "model_sha256": src.run.model_sha256(),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def split_images(run: RunDir, split: str, limit: int | None, pp) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S, 3) images of a run's split, as the model sees them, and
    their labels. Unreadable files are skipped (training skipped them too)."""
    s = run.splits()
    items = every_kth(getattr(s, split), limit)
    xs, ys = [], []
    for rel, y in items:
        try:
            xs.append(pp.load(s.path(rel)))
            ys.append(y)
        except BadImage:
            continue
    if not xs:
        raise ExportError(f"no readable images in the run's {split} split under {s.root}", "is the data still there?")
    if s.multi_label:
        return np.stack(xs), multi_hot(ys, len(s.classes))
    return np.stack(xs), np.array(ys)


def quality(p: np.ndarray, y: np.ndarray) -> float:
    """What the INT8 gate compares: accuracy; multi-label: mAP."""
    if y.ndim == 2:
        return mean_average_precision(y, p)
    return float((p.argmax(1) == y).mean())


def batched_probs(pred, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([pred.probs(x[i:i + batch]) for i in range(0, len(x), batch)])


def images_per_second(pred, x: np.ndarray, repeats: int = 3) -> float:
    pred.probs(x[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.probs(x)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def parity(p: np.ndarray, p_ref: np.ndarray) -> tuple[float, float]:
    """Max |p - p_ref| over every image and class, and the share of images whose top-1 label agrees."""
    return float(np.abs(p - p_ref).max()), float((p.argmax(1) == p_ref.argmax(1)).mean())


def export(cfg: ExportConfig) -> dict:
    """Export a run; returns a report dict (path, parity, INT8 accuracy and speed)."""
    if cfg.int8 and cfg.format not in ("onnx", "ort", "tflite"):
        raise ConfigError(f"--int8 is for --format onnx, ort or tflite, not {cfg.format}", "drop --int8")
    if cfg.any_size and (cfg.format not in ("onnx", "ort") or cfg.int8):
        raise ConfigError(f"--any-size is for fp32 --format onnx or ort, not {cfg.format}{' --int8' * cfg.int8}",
                          "drop --any-size (the web export always resizes in its graph)")
    run = RunDir(cfg.run)
    out = Path(cfg.out) if cfg.out else run.export_file(cfg.format, cfg.int8)
    if cfg.any_size and not cfg.out:
        out = out.with_name(f"{out.stem}.any-size{out.suffix}")
    if cfg.format == "web":  # a folder: say now, not after the export, that --out is taken

        check_replaceable_folder(out, is_export)
    if task_of(run.path) == "detect":
        return write_export(out, export_detector(run, cfg, out), cfg)
    if task_of(run.path) == "segment":
        return write_export(out, export_segmenter(run, cfg, out), cfg)
    if task_of(run.path) != "classify":
        raise ConfigError(f"{run}: exporting a {task_of(run.path)} run is not built yet",
                          "predict and evaluate with the run itself (imgclf predict RUN IMAGES)")
    src = load_source(run, cfg.check_images, cfg.reject)
    meta = metadata(src, cfg.int8)
    report: dict = {"format": cfg.format, "path": str(out), "int8": cfg.int8, "classes": src.record["classes"],
                    "input_size": src.pp.size, "check_split": src.split, "check_images": len(src.x_check)}
    data = EXPORTERS[cfg.format](src, cfg, meta, report)
    return write_export(out, (data, report), cfg)


def write_export(out: Path, made: tuple, cfg: ExportConfig) -> dict:
    """Write what an exporter made (bytes, or a folder as relative path ->
    bytes) atomically, and say so; returns the report."""
    data, report = made
    if isinstance(data, dict):  # a folder: relative path -> content

        atomic_write_folder(out, data, is_export)
        report["bytes"] = sum(map(len, data.values()))
        report["files"] = {k: len(v) for k, v in sorted(data.items())}
        log.info(f"wrote {out}/ ({len(data)} files, {report['bytes'] / 1e6:.1f} MB); try it: "
                f"python -m http.server -d {out} 8000  and open http://localhost:8000/")
        return report
    atomic_write_bytes(out, data)
    report["bytes"] = len(data)
    log.info(f"wrote {out} ({len(data) / 1e6:.1f} MB{', INT8' if cfg.int8 else ''}); "
            f"try it: imgclf predict {out} IMAGE" + ("" if cfg.format == "torchscript" else f"  |  imgclf serve {out}"))
    return report


def export_torchscript(src: ExportSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """The same wrapper, traced; the metadata as an extra file imgclf.json."""
    import io

    import torch

    with torch.inference_mode():
        traced = torch.jit.trace(src.wrapped, torch.from_numpy(src.x_check[:2]), check_trace=False)
        out = traced(torch.from_numpy(src.x_check))
        diff = float(np.abs((out[0] if isinstance(out, tuple) else out).numpy() - src.p_torch).max())
    if diff > PARITY_ATOL:
        raise ExportError(f"TorchScript probabilities differ from eager PyTorch by {diff:.2e} (limit {PARITY_ATOL:g})",
                          "the export is wrong and was not written; report it with the run's model.pt")
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"imgclf.json": json.dumps(meta)})
    report["max_abs_diff"] = diff
    log.info(f"parity: max |p - p_torch| = {diff:.1e} on {len(src.x_check)} {src.split} images (TorchScript)")
    return buf.getvalue()


def export_onnx(src: ExportSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """fp32 ONNX, checked against PyTorch; with --int8, quantized and gated on accuracy."""
    fp32 = to_onnx(src.wrapped, src.pp.size, meta, output_names(src))
    diff, _ = check_against_torch(OnnxPredictor(fp32), "onnxruntime", src, report)
    log.info(f"parity: max |p_onnx - p_torch| = {diff:.1e} on {len(src.x_check)} {src.split} images "
            f"(limit {PARITY_ATOL:g})")
    if cfg.any_size:
        return any_size_checked(src, fp32, meta, report)
    if not cfg.int8:
        return fp32
    return quantize_checked(fp32, src, cfg, report, lambda x_cal: quantize(fp32, x_cal, meta))


def check_photos(src: ExportSource) -> list[Path]:
    """The check images' files, to decode at full size as an app does."""
    s = src.run.splits()
    return [s.path(rel) for rel, _ in every_kth(getattr(s, src.split), len(src.x_check))]


def any_size_checked(src: ExportSource, fp32: bytes, meta: dict, report: dict) -> bytes:
    """The checked fixed-size model behind the resize graph (uint8 photos of
    any size in), checked on the check images decoded at full size: the
    graph's resize within RESIZE_LEVELS of Pillow's resize_image, the whole
    graph within PARITY_ATOL of that resize fed to the checked model. Reports
    (not gated) how far it is from the Python path, which decodes big JPEGs
    at a reduced scale: docs/architecture.md says why that is tolerated."""
    try:
        merged = with_metadata(with_resize(fp32, src.pp), {**meta, **input_metadata(src.pp, any_size=True)})
    except Exception as e:  # onnx's version converter and compose raise their own types
        raise ExportError(f"cannot put the resize into this model's graph ({type(e).__name__}: {e})",
                          "export it without --any-size and resize in the app as its metadata says") from None
    r = any_size_figures(src, fp32, merged)
    report.update(r)
    levels, diff, n = r["any_size_resize_max_levels"], r["any_size_max_abs_diff"], r["any_size_images"]
    if levels > RESIZE_LEVELS or diff > PARITY_ATOL or not n:
        raise ExportError(f"the any-size graph's resize differs from Pillow's by {levels} levels (limit "
                          f"{RESIZE_LEVELS}) or its probabilities from the checked model's by {diff:.2e} (limit "
                          f"{PARITY_ATOL:g}) on {n} {src.split} photos; the export is wrong, not written",
                          "report it with the run's model.pt and your onnxruntime version")
    log.info(f"any size: resize within {levels} level(s) of Pillow's, max |p - p_checked| = {diff:.1e}; against "
            f"the Python path (JPEG draft decoding): max |p - p_python| = {r['any_size_vs_python_max_abs_diff']:.1e}, "
            f"top-1 agreement {r['any_size_vs_python_top1']:.0%} on {n} {src.split} photos")
    return merged


def any_size_figures(src: ExportSource, fp32: bytes, merged: bytes) -> dict:
    """The any-size graph on the check photos decoded at full size, against
    Pillow's resize, the fixed-size model fed its own resize, and the Python path."""
    fixed, whole = OnnxPredictor(fp32), OnnxPredictor(merged, any_size=True)
    resize = ort_session(resize_model(src.pp).SerializeToString())
    levels, diff, vs_python, agree, n = 0, 0.0, 0.0, 0, 0
    for path in check_photos(src):
        try:
            img, x_py = open_image(path), src.pp.load(path)
        except BadImage:
            continue
        photo = np.asarray(img)[None]
        x = resize.run(None, {"images": photo})[0]
        levels = max(levels, int(np.abs(x[0].astype(int) - np.asarray(resize_image(img, src.pp, None))).max()))
        p, p_two, p_py = whole.probs(photo), fixed.probs(x), fixed.probs(x_py[None])
        diff, vs_python = max(diff, float(np.abs(p - p_two).max())), max(vs_python, float(np.abs(p - p_py).max()))
        agree, n = agree + int(p.argmax() == p_py.argmax()), n + 1
    return {"any_size_resize_max_levels": levels, "any_size_max_abs_diff": diff, "any_size_images": n,
            "any_size_vs_python_max_abs_diff": vs_python, "any_size_vs_python_top1": agree / max(n, 1)}


def export_ort(src: ExportSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """ONNX Runtime's own format (.ort) for apps that embed onnxruntime-mobile:
    the checked (and, with --int8, accuracy-gated) ONNX model, saved by
    onnxruntime itself with basic graph optimisations only, which stay valid on
    any device (the "extended" ones can fuse ops for this CPU), then checked
    again against PyTorch through onnxruntime."""

    onnx_bytes = export_onnx(src, cfg, meta, report)
    data = to_ort(onnx_bytes)
    # The .ort must answer exactly as the checked ONNX model does (which itself
    # matched PyTorch, or passed the INT8 accuracy gate).
    p_ort = OnnxPredictor(data, any_size=cfg.any_size).probs(src.x_check)
    diff = float(np.abs(p_ort - OnnxPredictor(onnx_bytes, any_size=cfg.any_size).probs(src.x_check)).max())
    # (An any-size graph crops the check images again, so only the .onnx comparison applies to it.)
    vs_torch = None if cfg.any_size else float(np.abs(p_ort - src.p_torch).max())
    report.update(ort_max_abs_diff_vs_onnx=diff, ort_max_abs_diff_vs_torch=vs_torch)
    if diff > ORT_ATOL:
        raise ExportError(f"the .ort model's probabilities differ from the ONNX model's by {diff:.2e} "
                          f"(limit {ORT_ATOL:g})", "the export is wrong and was not written; report it with model.pt")
    log.info(f"parity (.ort): max |p_ort - p_onnx| = {diff:.1e}"
            + (f", max |p_ort - p_torch| = {vs_torch:.1e}" if vs_torch is not None else "")
            + f" on {len(src.x_check)} {src.split} images")
    return data


def check_against_torch(pred, engine: str, src: ExportSource, report: dict) -> tuple[float, float]:
    """An exported file's answers on the check images against PyTorch's: the
    probabilities within PARITY_ATOL and the unknown score within a rank step,
    or ExportError (nothing is written). Returns (max difference, top-1 agreement)."""
    p, u = pred.outputs(src.x_check)
    diff, agree = parity(p, src.p_torch)
    report.update(max_abs_diff=diff, top1_agreement=agree)
    if src.u_torch is not None:
        check_unknown_parity(u, src, report)
    if diff > PARITY_ATOL:
        raise ExportError(f"{engine}'s probabilities differ from PyTorch's by {diff:.2e} on {len(src.x_check)} "
                          f"{src.split} images (limit {PARITY_ATOL:g}); the export is wrong, not written",
                          "set IMGCLF_DEBUG=1 and report it with the run's model.pt")
    return diff, agree


def check_unknown_parity(u: np.ndarray | None, src: ExportSource, report: dict) -> None:
    """The unknown score is a rank among the validation distances: a float
    difference at a boundary may move it by one step, never more."""
    step = 1 / len(src.record["unknown"]["val_sorted"])
    diff = float(np.abs(u - src.u_torch).max()) if u is not None else float("inf")
    report["unknown_max_abs_diff"] = diff
    if diff > step + 1e-6:
        raise ExportError(f"the exported unknown scores differ from PyTorch's by {diff:.3g} (limit one rank step, "
                          f"{step:.3g}); the export is wrong, not written", "report it with the run's model.pt")



def export_tflite(src: ExportSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """LiteRT (TFLite) for Android: converted from the same wrapper by litert-torch,
    checked with the LiteRT interpreter against PyTorch (max probability
    difference within PARITY_ATOL, top-1 agreement reported); with --int8,
    dynamic-range INT8 behind the same accuracy gate as ONNX INT8."""
    t0 = time.time()
    plain = to_tflite(src.wrapped, src.pp.size, (src.run.model_sha256(), src.pp.size, src.record.get("reject")),
                      tuple(output_names(src)))
    fp32 = tflite_metadata(plain, meta)
    report["convert_seconds"] = round(time.time() - t0, 1)
    diff, agree = check_against_torch(LiteRTPredictor(fp32), "LiteRT", src, report)
    log.info(f"parity (LiteRT): max |p_tflite - p_torch| = {diff:.1e} (limit {PARITY_ATOL:g}), top-1 agreement "
            f"{agree:.0%} on {len(src.x_check)} {src.split} images; converted in {report['convert_seconds']} s")
    if not cfg.int8:
        return fp32
    return quantize_checked(fp32, src, cfg, report, lambda _: tflite_metadata(quantize_tflite(plain), meta),
                            LiteRTPredictor, calibrated=False)


def to_onnx(wrapped, size: int, meta: dict[str, str], outputs: list[str] = (OUTPUT,)) -> bytes:
    import torch


    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    return with_metadata(trace_to_onnx(wrapped, example, [INPUT], list(outputs)), meta)


def quantize_checked(fp32: bytes, src: ExportSource, cfg: ExportConfig, report: dict, quantize_fn,
                     predictor=OnnxPredictor, calibrated: bool = True) -> bytes:
    """INT8 = quantize_fn(calibration images, from train), refused when validation
    accuracy drops by more than --max-drop points or its top-1 answers agree
    with fp32's on fewer than --min-agreement of the validation images;
    `predictor` runs both models."""
    t0 = time.time()
    x_cal = split_images(src.run, "train", cfg.calib_images, src.pp)[0] if calibrated else np.zeros((0,))
    q = quantize_fn(x_cal)
    report.update(calib_images=len(x_cal), calib_seconds=round(time.time() - t0, 1))
    x_val, y_val = split_images(src.run, src.split, None, src.pp)
    s32, s8 = predictor(fp32), predictor(q)
    p32, p8 = batched_probs(s32, x_val), batched_probs(s8, x_val)
    acc32, acc8 = quality(p32, y_val), quality(p8, y_val)
    diff, agree = parity(p8, p32)
    ips32, ips8 = images_per_second(s32, x_val[:16]), images_per_second(s8, x_val[:16])
    report.update({"val_images": len(x_val), "fp32_accuracy": acc32, "int8_accuracy": acc8,
                   "accuracy_change_points": round((acc8 - acc32) * 100, 2),
                   "int8_max_abs_diff_vs_fp32": diff, "int8_top1_agreement_vs_fp32": agree,
                   "fp32_images_per_s": round(ips32, 1), "int8_images_per_s": round(ips8, 1),
                   "speedup": round(ips8 / ips32, 2)})
    how = f"calibrated on {len(x_cal)} train images" if calibrated else "dynamic range, no calibration"
    log.info(f"INT8: {src.split} accuracy {acc32:.1%} -> {acc8:.1%} ({(acc8 - acc32) * 100:+.1f} points, "
            f"{len(x_val)} images; top-1 as fp32 on {agree:.1%}, max |p8 - p32| = {diff:.3f}); speed "
            f"{ips32:.0f} -> {ips8:.0f} images/s at batch {len(x_val[:16])} ({ips8 / ips32:.2f}x); {how} in "
            f"{report['calib_seconds']} s")
    gated = agree if y_val.ndim == 1 else None  # multi-label: no single top-1 answer to keep
    why = int8_verdict(acc32, acc8, cfg.max_drop, cfg.force, gated, cfg.min_agreement)
    if why:
        raise ExportError(why)
    if cfg.force and int8_verdict(acc32, acc8, cfg.max_drop, False, gated, cfg.min_agreement):
        log.warning(f"warning: writing the INT8 model despite a drop over {cfg.max_drop:g} points or a top-1 "
                    f"agreement under {cfg.min_agreement:.0%} (--force)")
    return q


def export_web(src: ExportSource, cfg: ExportConfig, meta: dict, report: dict) -> dict[str, bytes]:
    """A static site: the checked fp32 ONNX model (without the run's local path,
    since the folder is meant to be published) and the page that runs it."""
    site.require_runtime()  # before the export's own cost
    site.check_preprocess(src.pp)
    meta = {k: v for k, v in meta.items() if k != "run_path"}
    fp32 = export_onnx(src, cfg, meta, report)
    onnx_bytes = any_size_checked(src, fp32, meta, report)
    return site.build(onnx_bytes, OnnxPredictor(onnx_bytes, any_size=True).metadata)


EXPORTERS = {"onnx": export_onnx, "ort": export_ort, "torchscript": export_torchscript, "tflite": export_tflite,
             "web": export_web}
