"""COCO detection metrics through faster-coco-eval (the COCO evaluator's
definitions, in C++: the same numbers as pycocotools, several times faster),
and per-class F1-optimal score thresholds from its matches.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.tasks.detect.data import DetDataset, to_coco

# stats_as_dict names -> ours
_STATS = {"AP_all": "map", "AP_50": "map50", "AP_75": "map75", "AP_small": "map_small", "AP_medium": "map_medium",
          "AP_large": "map_large", "AR_third": "ar100", "AR_small": "ar_small", "AR_medium": "ar_medium",
          "AR_large": "ar_large"}


def _detections(preds: list[dict]) -> list[dict]:
    out = []
    for i, p in enumerate(preds, 1):
        for b, s, c in zip(np.asarray(p["boxes"], np.float64).reshape(-1, 4).tolist(),
                           np.asarray(p["scores"]).tolist(), np.asarray(p["labels"]).tolist()):
            out.append({"image_id": i, "category_id": int(c) + 1, "score": float(s),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    return out


def coco_metrics(gt: DetDataset, preds: list[dict]) -> dict:
    """Score `preds` (one dict per image of gt, in order: "boxes" xyxy in the
    image's pixels, "scores", "labels" as class indices). Returns map
    (@[.5:.95]), map50, map75, map_small/medium/large, ar100 and AR per size,
    ap_per_class and ap50_per_class, and F1-optimal thresholds per class."""
    from faster_coco_eval import COCO, COCOeval_faster

    if len(preds) != len(gt.images):
        raise ValueError(f"{len(preds)} predictions for {len(gt.images)} images")
    dets = _detections(preds)
    zero = {v: 0.0 for v in _STATS.values()}
    per0 = {c: 0.0 for c in gt.classes}
    if not dets:
        return {**zero, "ap_per_class": per0, "ap50_per_class": dict(per0),
                "thresholds": {c: 1.0 for c in gt.classes}, "f1": dict(per0)}
    coco_gt = COCO(to_coco(gt))
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", extra_calc=True)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats_as_dict
    out = {ours: max(0.0, stats[k]) for k, ours in _STATS.items() if k in stats}
    prec = ev.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    out["ap_per_class"] = {c: _mean_valid(prec[:, :, k, 0, -1]) for k, c in enumerate(gt.classes)}
    out["ap50_per_class"] = {c: _mean_valid(prec[0, :, k, 0, -1]) for k, c in enumerate(gt.classes)}
    out["thresholds"], out["f1"] = f1_thresholds(ev, gt.classes)
    if preds and "masks" in preds[0] and all(im.mask_path for im in gt.images):
        out.update(mask_metrics(gt, preds))
    return out


def mask_metrics(gt: DetDataset, preds: list[dict]) -> dict:
    """Instance masks: the COCO evaluator's "segm" mAP@[.5:.95], @.5 and @.75
    of the predicted masks (bool arrays in the image's pixels) against the
    instance-id PNGs (instance k is the k-th box, as read_masks orders them)."""
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask as mask_utils

    coco = to_coco(gt)
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i, im in enumerate(gt.images, 1):
        ids = np.asarray(Image.open(im.mask_path))
        for a, u in zip(by_image.get(i, []), np.unique(ids[ids > 0])):
            a["segmentation"] = _rle(mask_utils, ids == u)
            a["area"] = float((ids == u).sum())
    dets = []
    for i, p in enumerate(preds, 1):
        for b, s, c, m in zip(np.asarray(p["boxes"]).reshape(-1, 4), p["scores"], p["labels"], p["masks"]):
            dets.append({"image_id": i, "category_id": int(c) + 1, "score": float(s), "segmentation": _rle(mask_utils, m),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not dets:
        return {"mask_map": 0.0, "mask_map50": 0.0, "mask_map75": 0.0}
    coco_gt = COCO(coco)
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    st = ev.stats_as_dict
    return {"mask_map": max(0.0, st["AP_all"]), "mask_map50": max(0.0, st["AP_50"]), "mask_map75": max(0.0, st["AP_75"])}


def _rle(mask_utils, m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode() if isinstance(r["counts"], bytes) else r["counts"]}


def _mean_valid(a: np.ndarray) -> float:
    v = a[a > -1]
    return float(v.mean()) if v.size else 0.0


def f1_thresholds(ev, classes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per class, the score threshold whose detections have the best F1
    against the ground truth at IoU 0.5 (the evaluator's own one-to-one
    matches), and that F1. A class never detected gets threshold 1.0."""
    tp_ids = {int(k.split("_", 1)[0]) for k, iou in ev.eval["matched"].items() if iou >= 0.5}
    n_gt = np.zeros(len(classes), int)
    for a in ev.cocoGt.anns.values():
        n_gt[a["category_id"] - 1] += 1
    thr, f1 = {}, {}
    for k, name in enumerate(classes):
        dts = sorted(((a["score"], i in tp_ids) for i, a in ev.cocoDt.anns.items() if a["category_id"] == k + 1),
                     key=lambda t: -t[0])
        if not dts or n_gt[k] == 0:
            thr[name], f1[name] = 1.0, 0.0
            continue
        scores = np.array([s for s, _ in dts])
        tp = np.cumsum([t for _, t in dts])
        f = 2 * tp / (np.arange(1, len(dts) + 1) + n_gt[k])  # 2TP / (detections + ground truth)
        best = int(np.argmax(f))
        thr[name], f1[name] = float(scores[best]), float(f[best])
    return thr, f1
