"""Classification metrics and their plain-text table."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/support,
    macro and weighted averages, confusion matrix (rows: true, columns: predicted)
    and top-5 accuracy when there are more than 5 classes.

    numpy, with scikit-learn's definitions (zero_division=0; balanced accuracy
    over the classes present; tests/test_evaluate.py compares them): importing
    sklearn.metrics costs 2.5 s, a twentieth of a one-minute training run."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs):
        probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 +- 1e-7
    k = len(classes)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    p = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros(k), where=(p + r) > 0)
    n = len(y_true)
    out = {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(r[support > 0].mean()) if n else 0.0,
        "log_loss": float(-np.log(np.clip(probs[np.arange(n), y_true], 1e-12, 1)).mean()) if n else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "macro": {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())},
        "weighted": {m: float((v * support).sum() / support.sum()) if support.sum() else 0.0
                     for m, v in (("precision", p), ("recall", r), ("f1", f))},
    }
    for c, j in zip(classes, confused_with(out["confusion_matrix"])):
        out["per_class"][c]["confused_with"] = classes[j] if j is not None else None
    if k > 5:
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


# ------------------------------------------------------------------ multi-label

def mean_average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Macro average precision over the labels present in y (0/1, (N, L))."""
    from sklearn.metrics import average_precision_score

    present = y.sum(0) > 0
    if not present.any():
        return 0.0
    return float(np.mean([average_precision_score(y[:, j], p[:, j]) for j in np.flatnonzero(present)]))


def tune_thresholds(y: np.ndarray, p: np.ndarray, fixed: float | None = None) -> np.ndarray:
    """Per-label decision thresholds maximising F1 on (y, p), each halfway
    between two neighbouring scores so it does not sit on an image; a label
    without positives here keeps 0.5. `fixed` sets every one instead."""
    from sklearn.metrics import precision_recall_curve

    out = np.full(y.shape[1], 0.5 if fixed is None else fixed, np.float32)
    if fixed is not None:
        return out
    for j in range(y.shape[1]):
        if y[:, j].sum() == 0 or y[:, j].sum() == len(y):
            continue
        prec, rec, thr = precision_recall_curve(y[:, j], p[:, j])
        f1 = 2 * prec[:-1] * rec[:-1] / np.clip(prec[:-1] + rec[:-1], 1e-12, None)
        k = int(np.argmax(f1))
        below = p[:, j][p[:, j] < thr[k]]
        out[j] = (thr[k] + below.max()) / 2 if len(below) else thr[k] / 2
    return out


def multilabel_metrics(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> dict:
    """mAP and per-label AP (threshold-free); precision, recall and F1 per
    label and micro/macro at the stored thresholds; subset accuracy (every
    label right), Hamming loss (share of wrong label decisions); and the
    labels most often missed (false negatives) or added (false positives)."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    pred = p >= thresholds[None]
    yb = y > 0.5
    pr, rc, f1, sup = precision_recall_fscore_support(yb, pred, average=None, zero_division=0)
    mi = precision_recall_fscore_support(yb, pred, average="micro", zero_division=0)
    per = {c: {"ap": float(average_precision_score(yb[:, j], p[:, j])) if yb[:, j].any() else None,
               "precision": float(pr[j]), "recall": float(rc[j]), "f1": float(f1[j]), "support": int(sup[j]),
               "threshold": float(thresholds[j]), "missed": int((yb[:, j] & ~pred[:, j]).sum()),
               "added": int((~yb[:, j] & pred[:, j]).sum())} for j, c in enumerate(classes)}
    present = [j for j in range(len(classes)) if yb[:, j].any()]
    return {"multi_label": True, "n": len(y), "map": mean_average_precision(y, p), "per_label": per,
            "micro": {"precision": float(mi[0]), "recall": float(mi[1]), "f1": float(mi[2])},
            "macro": {"precision": float(np.mean(pr[present])) if present else 0.0,
                      "recall": float(np.mean(rc[present])) if present else 0.0,
                      "f1": float(np.mean(f1[present])) if present else 0.0},
            "subset_accuracy": float((pred == yb).all(1).mean()), "hamming_loss": float((pred != yb).mean()),
            "accuracy": float((pred == yb).all(1).mean()),  # what run summaries and /v1/model show
            "most_missed": sorted(({"label": c, "count": per[c]["missed"]} for c in classes),
                                  key=lambda d: -d["count"])[:5],
            "most_added": sorted(({"label": c, "count": per[c]["added"]} for c in classes),
                                 key=lambda d: -d["count"])[:5]}


def format_multilabel(m: dict) -> str:
    w = max(8, *(len(c) for c in m["per_label"]))
    lines = [f"mAP {m['map']:.4f}   micro F1 {m['micro']['f1']:.4f}   macro F1 {m['macro']['f1']:.4f}   "
             f"subset accuracy {m['subset_accuracy']:.4f}   Hamming loss {m['hamming_loss']:.4f}",
             f"{'label':<{w}}  {'AP':>6}  {'thresh':>6}  {'prec':>6}  {'recall':>6}  {'F1':>6}  {'support':>7}"]
    for c, d in m["per_label"].items():
        ap = f"{d['ap']:.4f}" if d["ap"] is not None else "   n/a"
        lines.append(f"{c:<{w}}  {ap:>6}  {d['threshold']:>6.3f}  {d['precision']:>6.3f}  {d['recall']:>6.3f}  "
                     f"{d['f1']:>6.3f}  {d['support']:>7}")
    return "\n".join(lines)
