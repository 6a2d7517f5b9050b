"""COCO detection metrics through faster-coco-eval (the COCO evaluator's
definitions, in C++: the same numbers as pycocotools, several times faster),
per-class F1-optimal score thresholds from its matches, its precision-recall
curves, and the detection confusion matrix at the stored thresholds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.formats.write import to_coco

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
                "thresholds": {c: 1.0 for c in gt.classes}, "f1": dict(per0), "pr_curves": {}}
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
    out["pr_curves"] = pr_curves(ev, gt.classes)
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


def pr_curves(ev, classes: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per class with ground truth, the evaluator's own precision-recall curve
    at IoU 0.5 (all sizes, 100 detections an image): interpolated precision
    and the score reached at each of its 101 recall points (COCO's recThrs;
    0 where that recall is never reached)."""
    prec, score = ev.eval["precision"][0, :, :, 0, -1], ev.eval["scores"][0, :, :, 0, -1]
    recall = [round(float(r), 2) for r in ev.params.recThrs]
    return {c: {"recall": recall, "precision": [round(float(v), 4) for v in np.clip(prec[:, k], 0, 1)],
                "score": [round(float(v), 4) for v in np.clip(score[:, k], 0, 1)]}
            for k, c in enumerate(classes) if (prec[:, k] > -1).any()}


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


# The detection confusion matrix (rows: truth, columns: prediction, the last
# of each "background"), counted on the detections a user gets: those at or
# above their class's stored threshold. Per image, two greedy passes by
# descending score at IoU >= 0.5 (COCO's IoU): first each detection takes the
# best-overlapping unmatched true box of its own class (COCO's own rule, so
# the diagonal is the true positives at the thresholds), then each detection
# left takes the best-overlapping true box left of any class (a wrong class,
# off the diagonal). What stays unmatched is a false positive (background row)
# or a missed object (background column). Hand-written (40 lines over
# faster-coco-eval's IoU): supervision's and Ultralytics' matrices take one
# confidence for every class and match by IoU alone, and would pull in
# OpenCV (and for Ultralytics, AGPL code) for this.
MATCH_IOU = 0.5
WORST = 12  # images in the report's gallery (and eval_*.json's worst_images)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N) against b (M), as the COCO evaluator computes it."""
    from faster_coco_eval.core.mask import iou  # deferred: as coco_metrics, for evaluation only

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], 1).astype(np.float64)  # noqa: E731
    return np.asarray(iou(xywh(a), xywh(b), [0] * len(b))).reshape(len(a), len(b))


def match_image(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, iou: float = MATCH_IOU) -> np.ndarray:
    """For each detection (already thresholded), the index of the true box it
    matches, or -1: the two passes above."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    m = _iou(np.asarray(boxes).reshape(-1, 4), np.asarray(gt_boxes).reshape(-1, 4))
    match = np.full(len(order), -1)
    taken = np.zeros(len(gt_labels), bool)
    for same_class in (True, False):
        for d in order:
            if match[d] >= 0:
                continue
            ok = (m[d] >= iou) & ~taken & ((gt_labels == labels[d]) if same_class else True)
            if ok.any():
                g = int(np.argmax(np.where(ok, m[d], -1)))
                match[d], taken[g] = g, True
    return match


def confusion(gt: DetDataset, preds: list[dict], thresholds: list[float], iou: float = MATCH_IOU
              ) -> tuple[np.ndarray, list[dict]]:
    """The (K+1) x (K+1) confusion matrix over gt's images (see above), and
    per image its detections at the thresholds with their matches and its
    counts: missed objects, false positives, wrong classes."""
    k = len(gt.classes)
    cm = np.zeros((k + 1, k + 1), np.int64)
    thr = np.asarray(thresholds, np.float64)
    per_image = []
    for im, p in zip(gt.images, preds):
        labels = np.asarray(p["labels"], np.int64).reshape(-1)
        scores = np.asarray(p["scores"], np.float64).reshape(-1)
        keep = scores >= thr[labels] if len(labels) else np.zeros(0, bool)
        boxes, labels, scores = np.asarray(p["boxes"]).reshape(-1, 4)[keep], labels[keep], scores[keep]
        match = match_image(boxes, labels, scores, im.boxes, im.labels, iou)
        hit = match >= 0
        np.add.at(cm, (im.labels[match[hit]], labels[hit]), 1)
        np.add.at(cm, (np.full((~hit).sum(), k), labels[~hit]), 1)
        found = np.zeros(len(im.labels), bool)
        found[match[hit]] = True
        np.add.at(cm, (im.labels[~found], np.full((~found).sum(), k)), 1)
        wrong = int((im.labels[match[hit]] != labels[hit]).sum())
        per_image.append({"boxes": boxes, "labels": labels, "scores": scores, "match": match, "found": found,
                          "missed": int((~found).sum()), "false_positives": int((~hit).sum()), "wrong_class": wrong})
    return cm, per_image


def background_name(classes: list[str]) -> str:
    return "background" if "background" not in classes else "(background)"


def worst_images(per_image: list[dict], n: int = WORST) -> list[int]:
    """The n images with the most errors (missed + false positive + wrong
    class), most first; images without errors are never listed."""
    errors = [(p["missed"] + p["false_positives"] + p["wrong_class"], i) for i, p in enumerate(per_image)]
    return [i for e, i in sorted(errors, key=lambda t: (-t[0], t[1])) if e > 0][:n]
