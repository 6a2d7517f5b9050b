"""k-fold cross-validation folds: the one fold scheme of imgclf.

The head's cross-validated L2 strength (training/head_fit.py), `--search`
trials (training/search.py), label-noise suspects' out-of-fold probabilities
(data_engine/label_noise.py) and the cross-fitted temperature
(evaluation/calibration.py) all split their images with this function.
"""

from __future__ import annotations

import numpy as np


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Each image's fold in 0..k-1, stratified: every class's images are
    shuffled and dealt round-robin, so each fold holds its share of every
    class and fold sizes differ by at most one. y: class indices, or zeros
    for plain k-fold (multi-label). Written here rather than scikit-learn's
    StratifiedKFold: importing sklearn costs 2.5 s of a one-minute `train`."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    folds = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class starts where this one ended: fold sizes stay even
    return folds
