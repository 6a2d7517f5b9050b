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
    for c, j in zip(classes, confused_with(out["confusion_matrix"])):
        out["per_class"][c]["confused_with"] = classes[j] if j is not None else None
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


def confused_with(cm) -> list[int | None]:
    """For each true class, the class it is most often mistaken for (None
    when it never is)."""
    cm = np.asarray(cm)
    off = cm - np.diag(np.diag(cm))
    return [int(off[i].argmax()) if off[i].max() > 0 else None for i in range(len(cm))]


def most_confused_pairs(cm, classes: list[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    cm = np.asarray(cm)
    rows = cm.sum(1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": n, "rate": n / rows[i] if rows[i] else 0.0}
            for n, i, j in cells[:k]]


def roc_pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: list[str], max_points: int = 400) -> dict:
    """ROC and precision-recall curves with their areas (scikit-learn): for two
    classes, the second class as positive; for more, one-vs-rest per class plus
    macro averages. Curves are thinned to about `max_points` points each.
    A class absent from y_true (or present everywhere) gets no curve: its AUC
    is undefined."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    targets = [1] if len(classes) == 2 else list(range(len(classes)))
    curves = {}
    for c in targets:
        y = (y_true == c).astype(int)
        if y.min(initial=1) == y.max(initial=0):
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        prec, rec, _ = precision_recall_curve(y, probs[:, c])
        curves[classes[c]] = {
            "roc_auc": float(roc_auc_score(y, probs[:, c])), "average_precision": float(average_precision_score(y, probs[:, c])),
            "pr_auc": float(auc(rec, prec)), "prevalence": float(y.mean()),
            "fpr": _thin(fpr, max_points), "tpr": _thin(tpr, max_points),
            "recall": _thin(rec, max_points), "precision": _thin(prec, max_points),
        }
    out = {"positive": classes[1] if len(classes) == 2 else None, "per_class": curves}
    if curves:
        out["macro_roc_auc"] = float(np.mean([v["roc_auc"] for v in curves.values()]))
        out["macro_average_precision"] = float(np.mean([v["average_precision"] for v in curves.values()]))
    return out


def _thin(a: np.ndarray, n: int) -> list[float]:
    """At most ~n points, always keeping both ends (enough to draw a curve)."""
    if len(a) <= n:
        return [round(float(v), 5) for v in a]
    idx = np.unique(np.r_[np.linspace(0, len(a) - 1, n).astype(int), len(a) - 1])
    return [round(float(a[i]), 5) for i in idx]
