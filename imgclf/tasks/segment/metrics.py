"""Semantic segmentation metrics from one confusion matrix over all pixels
of a split: mIoU (void pixels ignored; the mean over classes present in the
truth or the predictions), IoU per class, pixel accuracy, mean class
accuracy.

The confusion matrix is a bincount of truth * K + prediction, as
torchvision's segmentation reference computes it; torchmetrics'
MulticlassJaccardIndex computes the same numbers from the same matrix, and
a dependency for a bincount was not worth it. IoU of class c =
TP / (TP + FP + FN), the standard (Pascal VOC, Cityscapes) definition,
accumulated over the split (not averaged over images).
"""

from __future__ import annotations

import numpy as np


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(K, K) int64 counts, rows truth, columns prediction, void pixels left out
    (as are truth values outside the class list)."""
    t, p = np.asarray(truth).ravel().astype(np.int64), np.asarray(pred).ravel().astype(np.int64)
    keep = (t != ignore_index) & (t < num_classes)
    return np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(cm: np.ndarray, classes: list[str]) -> dict:
    """mIoU, IoU per class (None for a class absent from truth and predictions),
    pixel accuracy, mean class accuracy, the matrix."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), np.nan)
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "iou_per_class": {c: (None if np.isnan(v) else round(float(v), 6)) for c, v in zip(classes, iou)},
        "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() else 0.0,
        "mean_class_accuracy": float(np.nanmean(recall)) if np.isfinite(recall).any() else 0.0,
        "pixels": int(cm.sum()),
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }
