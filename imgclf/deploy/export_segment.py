"""A segmentation run's export (`imgclf export RUN` when the run is a
segmenter): one ONNX graph with the resize, the network, the logits brought
to the input's size and the argmax inside (tasks/segment/export.py), checked
against the PyTorch predictor on val images by pixel agreement, INT8 behind
a val mIoU gate, .ort and the web app from the same checked graph.

deploy/export.py's `export` dispatches here; the machinery both task
drivers share (metadata, static INT8, .ort, the held-out figures) is in
export_common.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from imgclf._version import __version__
from imgclf.config import ExportConfig
from imgclf.data.images import BadImage, open_image
from imgclf.deploy.export_common import Int8Recipe, held_out, quantize, to_ort, with_metadata
from imgclf.deploy.resize_graph import longer_side_model
from imgclf.deploy.web import site
from imgclf.errors import ConfigError, ExportError
from imgclf.inference.onnx_predictor import FORMAT, RESIZE_IN_GRAPH
from imgclf.io import read_json
from imgclf.log import get_logger
from imgclf.runs import RunDir
from imgclf.tasks.segment import export as seg_export
from imgclf.tasks.segment.data import SegDataset, read_dataset
from imgclf.tasks.segment.evaluate import evaluate_items
from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor
from imgclf.tasks.segment.predictor import palette, prepare_image
from imgclf.tasks.segment.torch_predictor import TorchSegPredictor

log = get_logger(__name__)

MIN_AGREEMENT = 0.999  # share of val pixels whose class the export gives as PyTorch does
FORMATS_NOT = {
    "torchscript": "the ONNX graph holds the resize and the argmax for deployment; TorchScript is the classifier's "
                   "wrapper; use --format onnx or ort (onnxruntime runs from Python, C++, Java, C#, JS and on phones)",
    "tflite": "imgclf's TFLite path (litert-torch) converts one fixed input shape, and a segmenter's input keeps "
              "each photo's aspect (its height and width change per image, with TensorFlow's padding worked out "
              "from them); use --format onnx or ort (onnxruntime-mobile runs on Android and iOS)",
}
# INT8 for a segmenter: the trunk's convolutions (with their ReLU6 and
# residual sums). The decoder, the classifier, the resizes and the size
# arithmetic (TF padding from the input's shape) stay float.
INT8_FLOAT_LAYERS = ("/decoder/", "/classifier/", "rs_", "tail/", seg_export.SHAPE_PREFIX)


@dataclass
class SegSource:
    """The segmentation run being exported and its check images."""

    run: RunDir
    reference: TorchSegPredictor  # the answers every export must reproduce
    ds: SegDataset
    items: dict[str, list[int]]  # split -> dataset indices
    split: str  # the split the checks use (val, else test)
    paths: list[str]  # the check images' files
    ref_maps: list[np.ndarray]  # the reference's label maps of them, at their own size


def seg_source(run: RunDir, check_images: int) -> SegSource:
    reference = TorchSegPredictor.from_run(run.path, device="cpu")
    saved = read_json(run.splits_file)
    ds = read_dataset(saved["root"], saved["format"], saved["ignore_index"], strict=False)
    index = {str(it.image): i for i, it in enumerate(ds.items)}
    items = {s: [index[p] for p in saved.get(s, []) if p in index] for s in ("train", "val", "test")}
    split = "val" if items["val"] else "test"
    chosen = items[split][::max(1, len(items[split]) // max(1, check_images))][:check_images]
    answers = reference.segment([str(ds.items[i].image) for i in chosen])
    paths = [a["path"] for a in answers if "mask" in a]
    if not paths:
        raise ExportError(f"no readable images in the run's {split} split under {ds.root}", "is the data still there?")
    return SegSource(run, reference, ds, items, split, paths, [a["mask"] for a in answers if "mask" in a])


def seg_metadata(src: SegSource, int8: bool) -> dict[str, str]:
    ref, s = src.reference, src.reference.image_size
    meta = {
        "format": FORMAT, "task": "segment", "classes": ref.classes, "image_size": s, "input_size": s,
        "ignore_index": src.ds.ignore_index, "resize": "longer side", RESIZE_IN_GRAPH: True,
        "preprocess": {"size": s, "resize": "longer side", "interpolation": "bilinear"},
        "input": f"uint8 RGB images (N, H, W, 3) of any size (one size per call), upright; resized inside the graph "
                 f"to a longer side of {s} px, aspect kept (bilinear with antialias, as Pillow)",
        "output": "labels (N, H, W) uint8: a class id per pixel at the input's resolution (the logits resized "
                  "bilinearly to it before the argmax); fed a downscaled copy of a photo, resize the labels back "
                  "to the photo with nearest neighbour (ids are never blended)",
        "label_resize": "nearest", "palette": palette(len(ref.classes)).tolist(),
        "arch": ref.arch, "imgclf_version": __version__, "trained_with": _trained_with(src.run),
        "metrics": seg_headline(src.run), "int8": int8, "run": src.run.path.name,
        "run_path": str(src.run.path.resolve()), "model_sha256": src.run.model_sha256(),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _trained_with(run: RunDir) -> str:
    try:
        return str(read_json(run.summary_file).get("imgclf_version", "?"))
    except (OSError, ValueError):
        return "?"


def seg_headline(run: RunDir) -> dict:
    """The held-out mIoU a deployment shows, from the run's eval file."""
    return held_out(run, {"n": "n", "miou": "miou", "pixel_accuracy": "pixel_accuracy"})


def graph_bytes(graph: onnx.ModelProto, meta: dict) -> bytes:
    """The graph with its metadata, and a doc string that says what it is."""
    with_metadata(graph, meta)
    graph.doc_string = "imgclf semantic segmenter: " + meta["input"] + " -> " + meta["output"]
    return graph.SerializeToString()


def export_segmenter(run: RunDir, cfg: ExportConfig, out: Path) -> tuple[bytes | dict, dict]:
    """A segmentation run as ONNX (or .ort, or the web app), checked on val images."""
    if cfg.format in FORMATS_NOT:
        raise ConfigError(f"--format {cfg.format} is not available for a segmentation run: "
                          f"{FORMATS_NOT[cfg.format]}", "use --format onnx, ort or web")
    if cfg.reject is not None:
        raise ConfigError("--reject is for classifiers (a segmenter has no unknown-input score)", "drop --reject")
    if cfg.any_size:
        raise ConfigError("--any-size: a segmentation export always takes images of any size (the resize is inside "
                          "its graph)", "drop --any-size")
    if cfg.format == "web":
        site.require_runtime()  # before the export's own cost
    src = seg_source(run, cfg.check_images)
    meta = seg_metadata(src, cfg.int8)
    size = src.reference.image_size
    report: dict = {"format": cfg.format, "path": str(out), "int8": cfg.int8, "task": "segment",
                    "classes": src.reference.classes, "input_size": size, "check_split": src.split,
                    "check_images": len(src.paths)}
    t0 = time.time()
    graph = seg_export.segmenter_onnx(src.reference.model, size, longer_side_model(size))
    report["convert_seconds"] = round(time.time() - t0, 1)
    fp32 = graph_bytes(graph, meta)
    seg_parity(OnnxSegPredictor(fp32), "onnxruntime", src, report)
    if cfg.format == "web":
        public = graph_bytes(graph, {k: v for k, v in meta.items() if k != "run_path"})  # published
        return site.build(public, OnnxSegPredictor(public).metadata), report
    data = seg_int8(fp32, src, cfg, meta, report) if cfg.int8 else fp32
    return (seg_ort(data, src, report) if cfg.format == "ort" else data), report


def seg_ort(onnx_bytes: bytes, src: SegSource, report: dict) -> bytes:
    """The checked ONNX graph in ONNX Runtime's own format, checked again:
    its label maps of the check images those of the .onnx it was saved from."""
    data = to_ort(onnx_bytes)
    same_as = [a["mask"] for a in OnnxSegPredictor(onnx_bytes).segment(src.paths)]
    sub: dict = {}
    seg_parity(OnnxSegPredictor(data), ".ort", src, sub, same_as, "the .onnx it was saved from")
    report.update({k.replace("parity_", "ort_parity_"): v for k, v in sub.items()})
    return data


def seg_parity(pred: OnnxSegPredictor, engine: str, src: SegSource, report: dict, ref_maps: list | None = None,
               against: str = "PyTorch's") -> float:
    """The export's label maps of the check images (each fed at its own size,
    as `imgclf predict` and an app feed it) against the reference's: at least
    MIN_AGREEMENT of the pixels the same class, or ExportError (nothing is
    written). Also reported: the agreement at the network's resolution (the
    graph fed Pillow's resize, so no resize rounding in between)."""
    got = [a.get("mask") for a in pred.segment(src.paths)]
    if any(g is None for g in got):
        raise ExportError(f"{engine} could not answer every check image", "report it with the run's model.pt")
    same, total = seg_export.pixel_agreement(got, ref_maps or src.ref_maps)
    share = same / max(1, total)
    report.update({"parity_pixels": total, "parity_pixel_agreement": share,
                   "parity_min_image_agreement": min((g == r).mean() for g, r in zip(got, ref_maps or src.ref_maps))})
    if ref_maps is None:  # against PyTorch: also at the network's own resolution
        xs = [prepare_image(open_image(p), src.reference.image_size) for p in src.paths]
        net = [pred.outputs(np.stack([x]))[0] for x in xs]
        want = [src.reference.outputs(np.stack([x]))[0] for x in xs]
        report["parity_network_agreement"] = seg_export.pixel_agreement(net, want)[0] / max(1, sum(w.size for w in want))
    msg = (f"{share:.4%} of {total} pixels the same class as {against} on {len(src.paths)} {src.split} images "
           f"(limit {MIN_AGREEMENT:.1%})")
    low = share < MIN_AGREEMENT or report.get("parity_network_agreement", 1.0) < MIN_AGREEMENT
    if low:
        net = report.get("parity_network_agreement")
        raise ExportError(f"{engine}'s label maps differ from {against}: {msg}"
                          + (f", {net:.4%} at the network's resolution" if net is not None else "")
                          + "; the export is wrong, not written",
                          "set IMGCLF_DEBUG=1 and report it with the run's model.pt and your onnxruntime version")
    log.info(f"parity ({engine}): {msg}" + (f"; at the network's resolution {report['parity_network_agreement']:.4%}"
                                            if "parity_network_agreement" in report else ""))
    return share


def calibration_images(src: SegSource, limit: int) -> np.ndarray:
    """Train images as the network sees them (longer side image_size), all
    brought to the commonest shape so they stack into calibration batches."""
    train = src.items["train"] or src.items[src.split]
    xs = []
    for i in train[::max(1, len(train) // max(1, limit))][:limit]:
        try:
            xs.append(prepare_image(open_image(src.ds.items[i].image), src.reference.image_size))
        except BadImage:
            continue
    if not xs:
        raise ExportError("no readable training images to calibrate INT8 on", "is the data still there?")
    h, w = Counter(x.shape[:2] for x in xs).most_common(1)[0][0]
    return np.stack([x if x.shape[:2] == (h, w) else np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR))
                     for x in xs])


def seg_int8(fp32: bytes, src: SegSource, cfg: ExportConfig, meta: dict, report: dict) -> bytes:
    """Static INT8 of the trunk, refused when val mIoU drops by more than --max-drop points (unless --force)."""
    t0 = time.time()
    x_cal = calibration_images(src, cfg.calib_images)
    recipe = Int8Recipe(ops=("Conv", "Clip", "Add"), float_layers=INT8_FLOAT_LAYERS)
    q = onnx.load_from_string(quantize(fp32, x_cal, meta, recipe))
    q.doc_string = onnx.load_from_string(fp32).doc_string
    q = q.SerializeToString()
    report.update(calib_images=len(x_cal), calib_seconds=round(time.time() - t0, 1))
    items = src.items[src.split]
    p32, p8 = OnnxSegPredictor(fp32), OnnxSegPredictor(q)
    m32, m8 = (evaluate_items(p, src.ds, items) for p in (p32, p8))
    drop = (m32["miou"] - m8["miou"]) * 100
    agree = seg_export.pixel_agreement([a["mask"] for a in p8.segment(src.paths)],
                                       [a["mask"] for a in p32.segment(src.paths)])
    report.update(fp32_miou=m32["miou"], int8_miou=m8["miou"], miou_change_points=round(-drop, 2),
                  fp32_pixel_accuracy=m32["pixel_accuracy"], int8_pixel_accuracy=m8["pixel_accuracy"],
                  int8_pixel_agreement_vs_fp32=agree[0] / max(1, agree[1]), val_images=m32["n"])
    log.info(f"INT8: {src.split} mIoU {m32['miou']:.3f} -> {m8['miou']:.3f} ({-drop:+.1f} points) on {m32['n']} "
             f"images; same class as fp32 on {agree[0] / max(1, agree[1]):.2%} of the check images' pixels; "
             f"calibrated on {len(x_cal)} train images in {report['calib_seconds']} s")
    if drop > cfg.max_drop + 1e-9:
        if not cfg.force:
            raise ExportError(f"INT8 mIoU drops by {drop:.1f} points ({m32['miou']:.3f} -> {m8['miou']:.3f} on "
                              f"{src.split}), over the limit of {cfg.max_drop:g}; the file was not written",
                              "use the fp32 export, or write it anyway with --force (or raise --max-drop)")
        log.warning(f"warning: writing the INT8 model despite an mIoU drop over {cfg.max_drop:g} points (--force)")
    return q
