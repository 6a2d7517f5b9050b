"""`imgclf export` for a detection run: one graph with the letterbox, the
network and NMS inside (tasks/detect/export.py), checked against the PyTorch
predictor on val images by matching detections; deploy/export.py dispatches
here and writes the file as it does a classifier's."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.config import ExportConfig
from imgclf.data.images import BadImage, open_image
from imgclf.deploy.export_common import Int8Recipe, every_kth, held_out, quantize, to_ort, with_metadata
from imgclf.deploy.resize_graph import resize_model
from imgclf.deploy.web import site
from imgclf.errors import ConfigError, ExportError
from imgclf.inference.onnx_predictor import FORMAT, RESIZE_IN_GRAPH
from imgclf.log import get_logger
from imgclf.ort import ort_session
from imgclf.runs import RunDir
from imgclf.tasks.detect import export as det_export
from imgclf.tasks.detect.evaluate import val_metrics
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
from imgclf.tasks.detect.splits import DetSplits
from imgclf.tasks.detect.torch_predictor import CANDIDATE_SCORE, TorchDetPredictor

log = get_logger(__name__)

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
    ref_out = [o for i in range(0, len(x), 8) for o in reference.outputs(x[i:i + 8])]  # with masks, if any
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
    return held_out(run, {"n": "images", "map": "map", "map50": "map50"})


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
    masks = src.reference.model.mask_branch is not None and cfg.format != "web"
    if src.reference.model.mask_branch is not None and not masks:
        report["note"] = "the web app answers boxes only: instance masks are in the .onnx/.ort exports"
        log.warning(report["note"])
    graph = det_export.detector_onnx(src.reference.model, pp.size, src.reference.thresholds, resize_model(pp), masks)
    fp32 = with_metadata(graph, meta)
    det_parity(OnnxDetPredictor(fp32), "onnxruntime", src, report, None if masks else [o[:3] for o in src.ref_out])
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
           "min_iou": min(p["min_iou"] for p in per), "max_score_diff": max(p["max_score_diff"] for p in per),
           **det_export.mask_parity(ref_out or src.ref_out, got, per, src.x_check.shape[1])}
    report.update({f"parity_{k}": v for k, v in fig.items()})
    bad = fig["missing"] or fig["extra"] or fig["min_iou"] < DET_MIN_IOU or fig["max_score_diff"] > DET_SCORE_ATOL
    bad = bad or fig.get("mask_min_iou", 1.0) < det_export.MIN_MASK_IOU
    msg = (f"{fig['matched']} of {fig['detections']} detections matched, {fig['missing']} missing, {fig['extra']} "
           f"extra, min IoU {fig['min_iou']:.4f} (limit {DET_MIN_IOU}), max score difference "
           f"{fig['max_score_diff']:.1e} (limit {DET_SCORE_ATOL:g})"
           + (f", mask IoU min {fig['mask_min_iou']:.4f} (limit {det_export.MIN_MASK_IOU}) mean "
              f"{fig['mask_mean_iou']:.4f}" if "mask_min_iou" in fig else "")
           + f" on {len(src.x_check)} {src.split} images")
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
    for path, (b, s, c, *_) in zip(src.paths, src.ref_out):
        img = open_image(path)
        ob, os_, oc = session.run(list(det_export.OUTPUTS[:3]), {"images": np.asarray(img)[None]})
        v = os_[0] > 0
        per.append(det_export.match((ref.to_original(b, img.size), s, c), (ob[0][v], os_[0][v], oc[0][v]),
                                    0.02, 0.9, 0.1))
    total = sum(p["reference"] for p in per)
    return {"any_size_images": len(per), "any_size_matched_share": sum(p["matched"] for p in per) / max(total, 1),
            "any_size_min_iou": min((p["min_iou"] for p in per), default=1.0)}


def det_int8(fp32: bytes, src: DetSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """Static INT8 of the trunk, refused when val mAP@.5 (and, for a run with
    instance masks, mask mAP@.5) drops by more than --max-drop points: the
    float mask branch reads the quantized trunk's maps, so boxes could pass
    while the masks got worse."""
    t0 = time.time()
    splits = DetSplits.read(src.run)
    ds = read_dataset(splits.data)
    items = splits.indices(ds)
    x_cal = np.stack([src.reference.prepare(str(ds.images[i].path))[0]
                      for i in every_kth(items["train"], cfg.calib_images)])
    q = quantize(fp32, x_cal, meta, DET_INT8_RECIPE)
    report.update(calib_images=len(x_cal), calib_seconds=round(time.time() - t0, 1), val_images=len(items[src.split]))
    m32, m8 = (val_metrics(p, ds, items[src.split]) for p in (OnnxDetPredictor(fp32), OnnxDetPredictor(q)))
    drops = {}
    for key in ("map50", "mask_map50"):
        if key in m32:
            drops[key] = (m32[key] - m8[key]) * 100
            report.update({f"fp32_{key}": m32[key], f"int8_{key}": m8[key],
                           f"{key}_change_points": round(-drops[key], 2)})
            log.info(f"INT8: {src.split} {GATED[key]} {m32[key]:.3f} -> {m8[key]:.3f} ({-drops[key]:+.1f} points)")
    log.info(f"INT8: on {len(items[src.split])} images; calibrated on {len(x_cal)} train images in "
             f"{report['calib_seconds']} s")
    worst = max(drops, key=drops.get)
    if drops[worst] > cfg.max_drop + 1e-9 and not cfg.force:
        raise ExportError(f"INT8 {GATED[worst]} drops by {drops[worst]:.1f} points ({m32[worst]:.3f} -> "
                          f"{m8[worst]:.3f} on {src.split}), over the limit of {cfg.max_drop:g}; the file was "
                          "not written", "use the fp32 export, or write it anyway with --force (or raise --max-drop)")
    return q


GATED = {"map50": "mAP@.5", "mask_map50": "mask mAP@.5"}  # what the INT8 gate compares, as the messages name it


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
