"""`imgclf evaluate` on a detection run: COCO metrics (faster-coco-eval) of
the predictor's detections, the same path `predict` and `serve` answer
through, on the run's held-out split or on every image of another dataset
(VOC, COCO, YOLO or masks, classes matched by name).

    RUN/eval_<split>.json: map, map50, map75, map_small/medium/large, ar100,
    ap_per_class, ap50_per_class, the thresholds in use and their F1, the
    precision-recall curves, the confusion matrix with background at those
    thresholds, and the images with the most errors
"""

from __future__ import annotations

import time

import numpy as np

from imgclf.config import EvaluateConfig
from imgclf.errors import DataError
from imgclf.io import write_json
from imgclf.log import get_logger
from imgclf.runs import RunDir
from imgclf.tasks.detect.data import DetDataset, DetImage
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.metrics import MATCH_IOU, background_name, coco_metrics, confusion, worst_images
from imgclf.tasks.detect.predictor import DetPredictor
from imgclf.tasks.detect.splits import DetSplits
from imgclf.tasks.detect.torch_predictor import TorchDetPredictor

log = get_logger(__name__)


def detections(pred: DetPredictor, ds: DetDataset, items: list[int]) -> tuple[list[int], list[dict], list[dict]]:
    """Every candidate detection (no threshold: AP needs the whole ranking)
    of the images `items`; unreadable images are left out and listed."""
    dets = pred.detect([str(ds.images[i].path) for i in items], conf=0.0)
    kept, preds, bad = [], [], []
    for i, d in zip(items, dets):
        if "error" in d:
            bad.append({"path": str(ds.images[i].path), "reason": d["error"]})
            continue
        kept.append(i)
        preds.append({"boxes": d["boxes_xyxy"], "scores": d["scores"], "labels": d["labels"],
                      **({"masks": d["masks"]} if "masks" in d else {})})
    return kept, preds, bad


def val_metrics(pred: DetPredictor, ds: DetDataset, items: list[int]) -> dict:
    """COCO metrics of `pred` on ds's images `items` (training's validation)."""
    kept, preds, _ = detections(pred, ds, items)
    return coco_metrics(subset(ds, kept), preds)


def subset(ds: DetDataset, items: list[int]) -> DetDataset:
    return DetDataset(classes=ds.classes, images=[ds.images[i] for i in items], format=ds.format, root=ds.root)


def evaluate_split(run: RunDir, pred: DetPredictor, ds: DetDataset, items: list[int], split: str,
                   report: bool = True) -> dict:
    """Score `items`, write RUN/eval_<split>.json (and the report), say the headline."""
    t0 = time.time()
    kept, preds, bad = detections(pred, ds, items)
    sub = subset(ds, kept)
    m = coco_metrics(sub, preds)
    m.update(split=split, run=str(run), data=str(ds.root), images=len(kept), skipped_files=bad,
             thresholds_in_use=dict(zip(pred.classes, map(float, pred.thresholds))),
             seconds=round(time.time() - t0, 2))
    per_image = add_errors(m, sub, preds, list(pred.thresholds))
    write_json(run.eval_file(split), m)
    if "mask_map" in m:
        log.info(f"{split}: mask mAP {m['mask_map']:.3f}  mask mAP@.5 {m['mask_map50']:.3f}")
    log.info(f"{split}: mAP {m['map']:.3f}  mAP@.5 {m['map50']:.3f}  on {len(kept)} images  "
             + "  ".join(f"{c} {v:.3f}" for c, v in m["ap50_per_class"].items()) + "  (AP@.5 per class)")
    if bad:
        log.warning(f"{len(bad)} unreadable image(s) skipped, e.g. {bad[0]['path']}: {bad[0]['reason']}")
    if report:
        from imgclf.tasks.detect.report import write_report  # deferred: matplotlib, for the report only

        page = write_report(run, pred, sub, preds, m, split, per_image)
        log.info(f"report: {page}")
    return m


def add_errors(m: dict, ds: DetDataset, preds: list[dict], thresholds: list[float]) -> list[dict]:
    """Put the confusion matrix (metrics.confusion) and the worst images
    (most missed + false positive + wrong-class boxes) into `m`; returns the
    per-image matches the report draws."""
    cm, per_image = confusion(ds, preds, thresholds)
    m["confusion"] = {"labels": ds.classes + [background_name(ds.classes)], "matrix": cm.tolist(), "iou": MATCH_IOU,
                      "rows": "truth", "columns": "prediction at the stored thresholds"}
    m["worst_images"] = [{"path": str(ds.images[i].path), "boxes": len(ds.images[i].boxes),
                          **{k: per_image[i][k] for k in ("missed", "false_positives", "wrong_class")}}
                         for i in worst_images(per_image)]
    return per_image


def evaluate(cfg: EvaluateConfig, pred: DetPredictor | None = None) -> dict:
    """A run on its held-out split, or on every image of DATA (another dataset)."""
    run = RunDir(cfg.run)
    pred = pred or TorchDetPredictor.from_run(run.path, cfg.device)
    if cfg.data:
        ds = remap(read_dataset(cfg.data), pred.classes, cfg.data)
        items = [i for i, im in enumerate(ds.images) if cfg.split is None or im.split == cfg.split]
        if not items:
            raise DataError(f"{cfg.data}: no images{f' in split {cfg.split}' if cfg.split else ''}",
                            "give a dataset with images (or leave out --split to score all of them)")
        return evaluate_split(run, pred, ds, items, cfg.split or "data", cfg.report)
    splits = DetSplits.read(run)
    ds = read_dataset(splits.data)
    items = splits.indices(ds)
    split = cfg.split or ("test" if items["test"] else "val")
    return evaluate_split(run, pred, ds, items[split], split, cfg.report)


def remap(ds: DetDataset, classes: list[str], data: str) -> DetDataset:
    """Another dataset's labels as the model's class indices, matched by name."""
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise DataError(f"{data}: class(es) {', '.join(unknown)} are not among the model's ({', '.join(classes)})",
                        "score data with the model's classes, or train a model on these")
    idx = np.array([classes.index(c) for c in ds.classes], np.int64)
    images = [DetImage(im.path, im.width, im.height, im.boxes, idx[im.labels] if len(im.labels) else im.labels,
                       im.mask_path, im.split, im.source) for im in ds.images]
    return DetDataset(classes=list(classes), images=images, format=ds.format, root=ds.root)
