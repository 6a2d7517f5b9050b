"""Which cross-validated logistic regression imgclf keeps: torch L-BFGS
(training/head_fit.py) or scikit-learn's LogisticRegression.

    .venv/bin/python bench/bench_logreg.py      # a few minutes on 2 cores

On cached EfficientNet-Lite1 features (plain, the model's default
preprocessing) of cats_and_dogs_filtered and hymenoptera, two uses:
  cv head    the L2 strength chosen by 5-fold CV over head_fit.L2_GRID, refit
             on all of train, scored on val (what `imgclf train` does); sklearn
             gets the same folds, grid (C = 1 / (l2 * n)) and warm starts
  oof probs  5-fold out-of-fold probabilities at one strength, L2 = 10 / n
             (what label-noise suspects use): out-of-fold accuracy on train
Time is wall-clock, best of REPEATS, and the CPU seconds of that run, with
torch and BLAS on THREADS threads (1; THREADS=2 to change).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table  # noqa: E402

REPEATS = 3
# One thread each: on a machine shared with other jobs, two threads wait for
# each other and wall-clock times swing with the load (docs/benchmarks.md).
THREADS = int(os.environ.get("THREADS", 1))
DATA = {"cats_and_dogs_filtered": ("train", "validation"), "hymenoptera": ("train", "val")}


def features(name: str):
    from imgclf.data.datasets import discover
    from imgclf.models.embedder import BackboneEmbedder

    splits = discover(str(DATASETS / name), 0.1, 0.0, 0, False)
    emb = BackboneEmbedder.pretrained("efficientnet_lite1", device="cpu")
    ftr, ytr, _ = emb.features_items(splits.root, splits.train, progress=False)
    fva, yva, _ = emb.features_items(splits.root, splits.val, progress=False)
    return ftr["plain"], ytr, fva["plain"], yva


def best_of(fn):
    """(result, best wall-clock seconds, CPU seconds of that run) over REPEATS."""
    out, best, cpu = None, float("inf"), 0.0
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if time.perf_counter() - t0 < best:
            best, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, best, cpu


def torch_cv_head(X, y, Xv, yv, folds):
    from imgclf.training.head_fit import fit_head_cv

    fit = fit_head_cv(torch.from_numpy(X), torch.from_numpy(y), 1, 5, 0)
    acc = ((torch.from_numpy(Xv) @ fit.weight.T + fit.bias).argmax(1).numpy() == yv).mean()
    return acc, fit.l2


def sklearn_cv_head(X, y, Xv, yv, folds):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from imgclf.training.head_fit import L2_GRID, choose_l2

    n = len(y)
    cv = {}
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        sc = StandardScaler().fit(X[tr])
        lr = LogisticRegression(warm_start=True, max_iter=100, tol=1e-4)
        for l2 in L2_GRID:
            lr.set_params(C=1.0 / (l2 * tr.sum()))
            lr.fit(sc.transform(X[tr]), y[tr])
            p = np.clip(lr.predict_proba(sc.transform(X[te]))[np.arange(te.sum()), y[te]], 1e-12, 1)
            cv.setdefault(l2, {"loss": 0.0})["loss"] += -np.log(p).sum() / n
    l2 = choose_l2(cv)
    sc = StandardScaler().fit(X)
    lr = LogisticRegression(C=1.0 / (l2 * n), max_iter=100, tol=1e-4).fit(sc.transform(X), y)
    return (lr.predict(sc.transform(Xv)) == yv).mean(), l2


def torch_oof(X, y, folds, l2):
    from imgclf.training.head_fit import fit_linear, standardise

    hits = 0
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        Z, mu, sd = standardise(torch.from_numpy(X[tr]))
        W, b = fit_linear(Z, torch.from_numpy(y[tr]), l2)
        p = torch.softmax(((torch.from_numpy(X[te]) - mu) / sd) @ W.T + b, 1).numpy()
        hits += (p.argmax(1) == y[te]).sum()
    return hits / len(y)


def sklearn_oof(X, y, folds, l2):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    hits = 0
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        sc = StandardScaler().fit(X[tr])
        lr = LogisticRegression(C=1.0 / (l2 * tr.sum()), max_iter=300, tol=1e-3).fit(sc.transform(X[tr]), y[tr])
        hits += (lr.predict(sc.transform(X[te])) == y[te]).sum()
    return hits / len(y)


def main() -> None:
    from threadpoolctl import threadpool_limits

    from imgclf.data.folds import stratified_folds

    torch.set_num_threads(THREADS)
    rows = []
    for name in DATA:
        X, y, Xv, yv = features(name)
        folds = stratified_folds(y, 5, 0)
        for impl, head, oof in (("torch L-BFGS", torch_cv_head, torch_oof),
                                ("sklearn lbfgs", sklearn_cv_head, sklearn_oof)):
            with threadpool_limits(THREADS):
                (acc, l2), secs, cpu = best_of(lambda: head(X, y, Xv, yv, folds))
                # the oof strength: label noise's, L2 = 10 / n (scikit-learn's C = 0.1)
                oacc, osecs, ocpu = best_of(lambda: oof(X, y, folds, 10.0 / (0.8 * len(y))))
            rows.append({"data": name, "n train": len(y), "impl": impl, "cv head val acc": f"{acc:.4f}",
                         "chosen l2": f"{l2:.3g}", "cv head s (cpu s)": f"{secs:.2f} ({cpu:.2f})",
                         "oof acc": f"{oacc:.4f}", "oof s (cpu s)": f"{osecs:.2f} ({ocpu:.2f})"})
            print(rows[-1], flush=True)
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f} at the end (shared machine)")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
