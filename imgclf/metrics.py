"""Classification metrics (scikit-learn) and their plain-text table."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support,
    macro and weighted averages, confusion matrix (rows: true, columns: predicted)
    and top-5 accuracy when there are more than 5 classes."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 log_loss, precision_recall_fscore_support)

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs):
        probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 +- 1e-7
    labels = list(range(len(classes)))
    y_pred = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "log_loss": float(log_loss(y_true, np.clip(probs, 1e-12, 1), labels=labels)) if len(y_true) else 0.0,
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    if len(classes) > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        out["top5_accuracy"] = float(np.mean([t in row for t, row in zip(y_true, top5)]))
    return out


def format_metrics(m: dict) -> str:
    """The metrics as a text table, for a terminal."""
    classes = m["classes"]
    w = max(12, *(len(c) for c in classes))
    lines = [
        f"accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   images {m['n']}"
        + (f"   top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
        "",
        f"{'class':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for c in classes:
        pc = m["per_class"][c]
        lines.append(f"{c:<{w}} {pc['precision']:>9.4f} {pc['recall']:>9.4f} {pc['f1']:>9.4f} {pc['support']:>8d}")
    for avg in ("macro", "weighted"):
        a = m[avg]
        lines.append(f"{avg + ' avg':<{w}} {a['precision']:>9.4f} {a['recall']:>9.4f} {a['f1']:>9.4f} {m['n']:>8d}")
    cm = m["confusion_matrix"]
    if len(classes) <= 20:
        cw = max(6, *(len(c) for c in classes))
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * (w + 1) + " ".join(f"{c[:cw]:>{cw}}" for c in classes)]
        for c, row in zip(classes, cm):
            lines.append(f"{c:<{w}} " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)
