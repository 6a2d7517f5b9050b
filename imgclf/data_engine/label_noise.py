"""Label-noise suspects: training images whose given label looks wrong.

The trained head has seen every training image, so its own opinion of them is
worthless for this (it memorises the mistakes). Instead each image is scored
by a model that never trained on it: k-fold logistic regression on the cached
pooled features of the run's backbone ("confident learning", Northcutt et al.
2021, in its simplest form). Images whose given label gets the lowest
out-of-fold probability come first. The features usually come from the cache
that training filled; the fits take seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch

from imgclf.data.folds import stratified_folds
from imgclf.training.head_fit import fit_linear, standardise


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probs[N, C], scored[N]): each row from a logistic regression fit on
    the other folds (the one fold scheme, the one L-BFGS fit of
    training/head_fit.py). An image is unscored when its class is too rare to
    appear in both the training and the held-out part (fewer than 2 images)."""
    n = len(labels)
    probs = np.zeros((n, num_classes))
    scored = np.zeros(n, bool)
    counts = np.bincount(labels, minlength=num_classes)
    idx_ok = np.flatnonzero(counts[labels] >= 2)
    if len(idx_ok) < 4 or len(np.unique(labels[idx_ok])) < 2:
        return probs, scored
    k = int(max(2, min(folds, counts[counts >= 2].min())))
    fold = stratified_folds(labels[idx_ok], k, seed)
    x_all = torch.from_numpy(np.asarray(features[idx_ok], np.float32))
    y_all = torch.from_numpy(np.asarray(labels[idx_ok], np.int64))
    for f in range(k):
        tr, te = torch.from_numpy(fold != f), torch.from_numpy(fold == f)
        Z, mu, sd = standardise(x_all[tr])
        # L2 of 10 / n (scikit-learn's C = 0.1): strong enough that a few
        # mislabelled images cannot pull the boundary onto themselves in 1,000+ dimensions.
        W, b = fit_linear(Z, y_all[tr], 10.0 / int(tr.sum()))
        p = torch.softmax(((x_all[te] - mu) / sd) @ W.T + b, dim=1).numpy()
        rows = idx_ok[fold == f]
        probs[rows, :p.shape[1]] = p
        scored[rows] = True
    return probs, scored


def find_suspects(clf, root: str, items: list[tuple[str, int]], limit: int = 16, threshold: float = 0.5,
                  workers: int = 1, bad=None, folds: int = 5) -> dict:
    """Training images whose given label gets out-of-fold probability below
    `threshold`, lowest first (at most `limit`). Features are the run's
    backbone's, through the feature cache."""
    import time

    t0 = time.time()
    feats, labels, kept = clf.features_items(root, items, workers=workers, bad=bad, progress=False)
    f = feats["plain"]
    probs, scored = out_of_fold_probs(f, labels, len(clf.classes), folds=folds)
    p_given = probs[np.arange(len(labels)), labels]
    order = [i for i in np.argsort(p_given, kind="stable") if scored[i] and p_given[i] < threshold]
    rows = []
    for i in order[:limit]:
        j = int(probs[i].argmax())
        rows.append({"path": items[int(kept[i])][0], "given": clf.classes[int(labels[i])], "p_given": float(p_given[i]),
                     "likely": clf.classes[j], "p_likely": float(probs[i, j])})
    oof_acc = float((probs.argmax(1) == labels)[scored].mean()) if scored.any() else None
    return {"method": f"{min(folds, 5)}-fold out-of-fold logistic regression on the backbone's pooled features",
            "scored": int(scored.sum()), "below_threshold": len(order), "threshold": threshold,
            "out_of_fold_accuracy": oof_acc, "suspects": rows, "seconds": round(time.time() - t0, 2)}


def suspects_section(clf, splits, workers: int, bad) -> dict | str:
    """The report's label-noise section: find_suspects on the run's training
    split, or why there is none to check."""
    if not splits.train:
        return ("No training split is recorded for this data (a new labelled folder), so there are no training "
                "labels to check.")
    return find_suspects(clf, splits.root, splits.train, workers=workers, bad=bad)
