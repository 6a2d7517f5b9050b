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
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.config import ExportConfig
from imgclf.data.datasets import multi_hot
from imgclf.data.images import BadImage, open_image
from imgclf.data.preprocess import normalize, resize_image
from imgclf.deploy.export_segment import Shared, export_segmenter
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
from imgclf.tasks.detect import export as det_export
from imgclf.tasks.detect.data import read_dataset
from imgclf.tasks.detect.evaluate import val_metrics
from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
from imgclf.tasks.detect.splits import DetSplits
from imgclf.tasks.detect.torch_predictor import CANDIDATE_SCORE, TorchDetPredictor

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


def every_kth(items: list, limit: int | None) -> list:
    """Every k-th item, so a subset still covers every class (splits are sorted by class)."""
    return items[::max(1, len(items) // limit)][:limit] if limit else items


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


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop: float, force: bool, agreement: float | None = None,
                 min_agreement: float = 0.0) -> str | None:
    """None if the INT8 model may be written; otherwise why not (and how to override).
    Accuracy alone can hide answers that change both ways, so the share of
    images whose top-1 answer stays fp32's (`agreement`, single-label) is
    gated too."""
    drop = (fp32_acc - int8_acc) * 100
    low = agreement is not None and agreement < min_agreement - 1e-9
    if (drop <= max_drop + 1e-9 and not low) or force:
        return None
    same = "" if agreement is None else f"; top-1 as fp32 on {agreement:.1%}"
    if drop > max_drop + 1e-9:
        why = (f"INT8 accuracy drops by {drop:.1f} points ({fp32_acc:.1%} -> {int8_acc:.1%} on validation{same}), "
               f"over the limit of {max_drop:g}")
    else:
        why = (f"INT8 changes the top-1 answer of {1 - agreement:.1%} of validation images (top-1 as fp32 on "
               f"{agreement:.1%}, under the limit of {min_agreement:.1%}; accuracy {fp32_acc:.1%} -> {int8_acc:.1%})")
    return (f"{why}; the file was not written. Use the fp32 export, calibrate on more images (--calib-images), "
            f"or write it anyway with --force (or raise --max-drop / lower --min-agreement)")


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
    if task_of(run.path) == "segment":  # its driver takes this module's machinery as arguments (no import cycle)
        return write_export(out, export_segmenter(run, cfg, out, Shared(with_metadata, quantize, Int8Recipe, to_ort)), cfg)
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


def with_metadata(m, meta: dict[str, str]) -> bytes:
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    what = "imgclf object detector: " if meta.get("task") == "detect" else "imgclf image classifier: "
    m.doc_string = what + meta["input"] + " -> " + meta["output"]
    return m.SerializeToString()


@dataclass(frozen=True)
class Int8Recipe:
    """How `quantize` makes a static INT8 model; the default is the one chosen
    by measurement (bench/bench_int8.py, docs/benchmarks.md).

    ops: the op types quantized. `Clip` (ReLU6) must be among them: only then
    does the quantizer give each convolution's output the range after the
    clip ([0, 6]) instead of the wide range before it, and drop the
    dequantize -> Clip -> quantize between convolutions; without it the
    default model lost accuracy and most of the speed. `Add` and
    `GlobalAveragePool` keep the residual sums and the pooling in int8 too
    (fewer conversions; as accurate). Per-channel weights: per-tensor ones
    lose accuracy on the depthwise convolutions.
    float_layers: node-name parts kept in float ("conv_stem", "conv_head",
    "/head/", "conv_dw"). calibration: minmax, entropy or percentile.
    """

    format: str = "qoperator"  # or "qdq"
    ops: tuple[str, ...] = ("Conv", "Clip", "Add", "GlobalAveragePool", "Gemm", "MatMul")
    per_channel: bool = True
    symmetric_activations: bool = False
    calibration: str = "minmax"
    percentile: float = 99.999
    float_layers: tuple[str, ...] = ()
    preprocess: bool = True


INT8_RECIPE = Int8Recipe()


def quantize(fp32: bytes, x_cal: np.ndarray, meta: dict[str, str], recipe: Int8Recipe = INT8_RECIPE) -> bytes:
    """Static INT8 with onnxruntime, calibrated on `x_cal`, made as `recipe` says."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Batches of one size: the histogram calibrators (entropy, percentile) stack them.
    b = max(d for d in range(1, 9) if len(x_cal) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(x_cal), b))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {INPUT: x_cal[i:i + b]}

    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        if recipe.preprocess:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        else:
            pre = src
        # The unknown scorer stays float: its scale is a rank among validation distances.
        keep = ("/scorer/",) + recipe.float_layers
        skip = [n.name for n in onnx.load(str(pre)).graph.node if any(k in n.name for k in keep)]
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[recipe.calibration]
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns per tensor about bias scales
        try:
            quantize_static(str(pre), str(dst), Reader(),
                            quant_format=QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator,
                            per_channel=recipe.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(recipe.ops),
                            nodes_to_exclude=skip, calibrate_method=method,
                            extra_options={"ActivationSymmetric": recipe.symmetric_activations,
                                           "CalibPercentile": recipe.percentile})
        finally:
            root.setLevel(level)
        return with_metadata(onnx.load(str(dst)), meta)


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


# ---------------------------------------------------------------- detection
# A detection run's export: one graph with the letterbox, the network and NMS
# inside (tasks/detect/export.py), checked against the PyTorch predictor on
# val images by matching detections, written by the same driver.

DET_MIN_IOU, DET_SCORE_ATOL = 0.99, 1e-4  # a matched box and score, exported vs PyTorch
DET_FORMATS_NOT = {
    "torchscript": "torchvision's detection postprocess loops over images in Python; export --format onnx instead",
    "tflite": "litert-torch converts fixed-shape graphs: NMS and the data-dependent number of boxes have no "
              "builtin TFLite op it emits; use --format onnx or ort (onnxruntime-mobile runs on Android and iOS)",
}
# INT8 for a detector: the trunk's convolutions only. The FPN and the head
# (GroupNorm, box regression in pixels) stay float: the boxes are sums of
# small regression deltas times anchor sizes, which int8 rounding moves.
DET_INT8_RECIPE = Int8Recipe(ops=("Conv", "Clip", "Add"), float_layers=("/fpn/", "/head/"))


@dataclass
class DetSource:
    """The detection run being exported and its check images."""

    run: RunDir
    reference: object  # TorchDetPredictor: the answers every export must reproduce
    split: str
    paths: list[str]  # the check images' files
    x_check: np.ndarray  # their letterboxes (N, S, S, 3)
    ref_out: list  # the reference's (boxes, scores, labels) per check image


def det_source(run: RunDir, check_images: int) -> DetSource:
    reference = TorchDetPredictor.from_run(run.path, device="cpu")
    splits = DetSplits.read(run)
    ds = read_dataset(splits.data)
    items = splits.indices(ds)
    split = "val" if items["val"] else "test"
    paths, xs = [], []
    for i in every_kth(items[split], check_images):
        try:
            xs.append(reference.prepare(str(ds.images[i].path))[0])
            paths.append(str(ds.images[i].path))
        except BadImage:
            continue
    if not xs:
        raise ExportError(f"no readable images in the run's {split} split under {ds.root}", "is the data still there?")
    x = np.stack(xs)
    # Instance masks stay in PyTorch for now: the graph answers boxes, and parity is on them.
    ref_out = [o[:3] for i in range(0, len(x), 8) for o in reference.outputs(x[i:i + 8])]
    return DetSource(run, reference, split, paths, x, ref_out)


def det_metadata(src: DetSource, int8: bool) -> dict[str, str]:
    ref, pp = src.reference, src.reference.preprocess
    meta = {
        "format": FORMAT, "task": "detect", "classes": ref.classes, "preprocess": pp.to_dict(), "input_size": pp.size,
        "resize": pp.resize, RESIZE_IN_GRAPH: True,
        "input": f"uint8 RGB images (N, H, W, 3) of any size (one size per call), upright; letterboxed to {pp.size} "
                 "px inside the graph",
        "output": "boxes (N, D, 4) x1, y1, x2, y2 in the input image's pixels; scores (N, D), best first, 0 = "
                  "padding; labels (N, D) class indices; selected (N, D): score >= its class's threshold",
        "thresholds": [float(t) for t in ref.thresholds],
        "postprocess": {"candidate_score": det_export.CANDIDATE, "nms_iou": det_export.IOU,
                        "topk_per_level": det_export.TOPK_PER_LEVEL, "per_image": det_export.PER_IMAGE},
        "arch": ref.arch, "imgclf_version": __version__, "trained_with": src.reference.metadata.get("trained_with", "?"),
        "metrics": det_headline(src.run), "int8": int8, "run": src.run.path.name,
        "run_path": str(src.run.path.resolve()), "model_sha256": src.run.model_sha256(),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def det_headline(run: RunDir) -> dict:
    """The held-out mAP a deployment shows, from the run's eval file."""
    for split in ("test", "val"):
        f = run.eval_file(split)
        if f.exists():
            m = json.loads(f.read_text())
            return {"split": split, "n": m.get("images"), "map": m.get("map"), "map50": m.get("map50")}
    return {}


def export_detector(run: RunDir, cfg: ExportConfig, out: Path) -> tuple[bytes, dict]:
    """A detection run as ONNX (or .ort), NMS inside, checked on val images."""
    if cfg.format in DET_FORMATS_NOT:
        raise ConfigError(f"--format {cfg.format} is not available for a detection run: "
                          f"{DET_FORMATS_NOT[cfg.format]}", "use --format onnx or --format ort")
    if cfg.reject is not None:
        raise ConfigError("--reject is for classifiers (a detector has no unknown-input score)", "drop --reject")
    src = det_source(run, cfg.check_images)
    meta = det_metadata(src, cfg.int8)
    pp = src.reference.preprocess
    report: dict = {"format": cfg.format, "path": str(out), "int8": cfg.int8, "task": "detect",
                    "classes": src.reference.classes, "input_size": pp.size, "check_split": src.split,
                    "check_images": len(src.x_check)}
    if src.reference.model.mask_branch is not None:
        report["note"] = "instance masks are not exported: the graph answers boxes (masks: imgclf predict RUN)"
        log.warning(report["note"])
    graph = det_export.detector_onnx(src.reference.model, pp.size, src.reference.thresholds, resize_model(pp))
    fp32 = with_metadata(graph, meta)
    det_parity(OnnxDetPredictor(fp32), "onnxruntime", src, report)
    report.update(det_any_size_figures(src, fp32))
    if cfg.format == "web":
        site.require_runtime()
        public = with_metadata(graph, {k: v for k, v in meta.items() if k != "run_path"})  # the folder is published
        return site.build(public, OnnxDetPredictor(public).metadata), report
    data = det_int8(fp32, src, cfg, meta, report) if cfg.int8 else fp32
    if cfg.format == "ort":
        data = det_ort(data, src, report)
    return data, report


def det_parity(pred: OnnxDetPredictor, engine: str, src: DetSource, report: dict,
               ref_out: list | None = None) -> dict:
    """The exported graph's detections on the check images against the
    reference's: the same detections, matched boxes IoU >= DET_MIN_IOU and
    scores within DET_SCORE_ATOL, or ExportError (nothing is written)."""
    got = [o for i in range(0, len(src.x_check), 8) for o in pred.outputs(src.x_check[i:i + 8])]
    per = [det_export.match(r, g, DET_SCORE_ATOL, DET_MIN_IOU, CANDIDATE_SCORE)  # the reference's own cut
           for r, g in zip(ref_out or src.ref_out, got)]
    fig = {"detections": sum(p["reference"] for p in per), "matched": sum(p["matched"] for p in per),
           "missing": sum(p["missing"] for p in per), "extra": sum(p["extra"] for p in per),
           "min_iou": min(p["min_iou"] for p in per), "max_score_diff": max(p["max_score_diff"] for p in per)}
    report.update({f"parity_{k}": v for k, v in fig.items()})
    bad = fig["missing"] or fig["extra"] or fig["min_iou"] < DET_MIN_IOU or fig["max_score_diff"] > DET_SCORE_ATOL
    msg = (f"{fig['matched']} of {fig['detections']} detections matched, {fig['missing']} missing, {fig['extra']} "
           f"extra, min IoU {fig['min_iou']:.4f} (limit {DET_MIN_IOU}), max score difference "
           f"{fig['max_score_diff']:.1e} (limit {DET_SCORE_ATOL:g}) on {len(src.x_check)} {src.split} images")
    if bad:
        raise ExportError(f"{engine}'s detections differ from PyTorch's: {msg}; the export is wrong, not written",
                          "set IMGCLF_DEBUG=1 and report it with the run's model.pt")
    log.info(f"parity ({engine}): {msg}")
    return fig


def det_any_size_figures(src: DetSource, fp32: bytes) -> dict:
    """Not gated, reported: the graph fed the check photos at their own size
    (its letterbox inside) against the Python path (Pillow's letterbox, boxes
    mapped back): the resize differs by a level or two, so a detection at
    the edge of the candidate cut may come or go."""
    session = ort_session(fp32)
    ref = src.reference
    per = []
    for path, (b, s, c) in zip(src.paths, src.ref_out):
        img = open_image(path)
        ob, os_, oc = session.run(list(det_export.OUTPUTS[:3]), {"images": np.asarray(img)[None]})
        v = os_[0] > 0
        per.append(det_export.match((ref.to_original(b, img.size), s, c), (ob[0][v], os_[0][v], oc[0][v]),
                                    0.02, 0.9, 0.1))
    total = sum(p["reference"] for p in per)
    return {"any_size_images": len(per), "any_size_matched_share": sum(p["matched"] for p in per) / max(total, 1),
            "any_size_min_iou": min((p["min_iou"] for p in per), default=1.0)}


def det_int8(fp32: bytes, src: DetSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """Static INT8 of the trunk, refused when val mAP@.5 drops by more than --max-drop points."""
    t0 = time.time()
    splits = DetSplits.read(src.run)
    ds = read_dataset(splits.data)
    items = splits.indices(ds)
    x_cal = np.stack([src.reference.prepare(str(ds.images[i].path))[0]
                      for i in every_kth(items["train"], cfg.calib_images)])
    q = quantize(fp32, x_cal, meta, DET_INT8_RECIPE)
    report.update(calib_images=len(x_cal), calib_seconds=round(time.time() - t0, 1))
    p32, p8 = OnnxDetPredictor(fp32), OnnxDetPredictor(q)
    m32, m8 = (val_metrics(p, ds, items[src.split])["map50"] for p in (p32, p8))
    drop = (m32 - m8) * 100
    report.update(fp32_map50=m32, int8_map50=m8, map50_change_points=round(-drop, 2), val_images=len(items[src.split]))
    log.info(f"INT8: {src.split} mAP@.5 {m32:.3f} -> {m8:.3f} ({-drop:+.1f} points) on {len(items[src.split])} "
             f"images; calibrated on {len(x_cal)} train images in {report['calib_seconds']} s")
    if drop > cfg.max_drop + 1e-9 and not cfg.force:
        raise ExportError(f"INT8 mAP@.5 drops by {drop:.1f} points ({m32:.3f} -> {m8:.3f} on {src.split}), over the "
                          f"limit of {cfg.max_drop:g}; the file was not written",
                          "use the fp32 export, or write it anyway with --force (or raise --max-drop)")
    return q


def det_ort(onnx_bytes: bytes, src: DetSource, report: dict) -> bytes:
    """The checked ONNX graph in ONNX Runtime's own format, checked again: its
    detections on the check images the same as the .onnx's."""

    data = to_ort(onnx_bytes)
    ref = OnnxDetPredictor(onnx_bytes)
    ref_out = [o for i in range(0, len(src.x_check), 8) for o in ref.outputs(src.x_check[i:i + 8])]
    sub: dict = {}
    det_parity(OnnxDetPredictor(data), ".ort", src, sub, ref_out)
    report.update({k.replace("parity_", "ort_parity_"): v for k, v in sub.items()})
    return data


def to_ort(onnx_bytes: bytes) -> bytes:
    """ONNX Runtime's own format (.ort) of an ONNX graph: basic optimisations, saved by onnxruntime itself."""
    import onnxruntime as ort  # deferred: a converter, only for --format ort

    with tempfile.TemporaryDirectory(prefix="imgclf-ort-") as tmp:
        path = Path(tmp) / "model.ort"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(path)
        so.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        return path.read_bytes()
