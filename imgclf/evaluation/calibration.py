"""Can the probabilities be trusted? Expected calibration error, reliability
data, and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fit
on held-out data by minimising the negative log-likelihood. It never changes
which class wins (accuracy is untouched), only how confident the model says it
is. The fitted T is stored in RUN/model.pt (`record["temperature"]`), which
`imgclf train` fits T on the validation split as its last step; every
prediction path applies it through `imgclf.inference.torch_predictor.calibrated_probs`.
"""

from __future__ import annotations

import numpy as np

from imgclf.data.folds import stratified_folds
from imgclf.inference.torch_predictor import probs_from_logits

T_MIN, T_MAX = 0.05, 20.0  # beyond these the model is broken, not miscalibrated


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under the calibrated
    probabilities (in float64: the fit compares NLLs that differ by 1e-6)."""
    p = probs_from_logits({"plain": np.asarray(logits, dtype=np.float64)}, temperature)
    return float(-np.log(np.clip(p[np.arange(len(labels)), np.asarray(labels)], 1e-300, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises NLL on (logits, labels). The NLL is
    smooth and unimodal in log T, so a bounded scalar search (scipy) finds it
    in a few dozen evaluations: milliseconds even for 10^5 images."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    res = minimize_scalar(lambda lt: nll(logits, labels, float(np.exp(lt))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def cross_fit_temperatures(logits: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """One T per image, each fit on the other folds: an honest 'after' when
    the split being evaluated is the one T is fit on (data with no test
    split). Folds: the one fold scheme (data/folds.py). Divide logits by `T[:, None]`."""
    n = len(labels)
    if n < 2 * folds:
        return np.full(n, fit_temperature(logits, labels))
    out = np.zeros(n)
    logits, labels = np.asarray(logits), np.asarray(labels)
    fold = stratified_folds(labels, folds, seed)
    for k in range(folds):
        held = fold == k
        out[held] = fit_temperature(logits[~held], labels[~held])
    return out


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Top-1 confidence binned into `bins` equal-width bins over [0, 1]: per
    bin the mean confidence, the accuracy and the count; ECE is the
    count-weighted mean gap |accuracy - confidence| (Naeini et al., 2015)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, bool)
    # Bins are (lo, hi]; confidence 0 cannot occur for a top-1 probability.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(float), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    gaps = np.where(count > 0, np.abs(acc_sum - conf_sum), 0.0)
    ece = float(gaps.sum() / max(len(conf), 1))
    return {"edges": edges.tolist(), "confidence": _nan_to_none(mean_conf), "accuracy": _nan_to_none(acc),
            "count": count.astype(int).tolist(), "ece": ece}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (equal-width bins)."""
    return reliability(probs, labels, bins)["ece"]


def fit_calibration(val_logits: np.ndarray, val_labels: np.ndarray) -> dict:
    """T fitted on validation logits, with ECE and NLL before (T = 1) and
    after. "After" is cross-fitted: each image is scored with a T fit on the
    other folds, since these same images chose T. When no T can be fitted the
    result is {"temperature": 1.0, "skipped": why}."""
    if len(val_labels) < 10 or len(np.unique(val_labels)) < 2:
        return {"temperature": 1.0, "skipped": f"{len(val_labels)} validation images of "
                f"{len(np.unique(val_labels))} class(es) are too few to fit a temperature"}
    t = fit_temperature(val_logits, val_labels)
    wrong = int((np.asarray(val_logits).argmax(1) != np.asarray(val_labels)).sum())
    if wrong == 0 or not T_MIN * 1.01 < t < T_MAX / 1.01:
        # With no mistakes on val the log loss keeps falling as T shrinks: the
        # "optimum" is wherever the search stops, a guess, not a fit. Every
        # prediction would then claim ~100% and mistakes could not be caught.
        return {"temperature": 1.0, "skipped": f"no temperature fits: {wrong} of {len(val_labels)} validation "
                f"images are misclassified, too few to tell how confident the model should be"}
    before = probs_from_logits({"plain": val_logits}, 1.0)
    after = probs_from_logits({"plain": val_logits}, cross_fit_temperatures(val_logits, val_labels)[:, None])
    idx = np.arange(len(val_labels))
    out = {"temperature": t, "fitted_on": "val", "n": int(len(val_labels)),
           "ece_before": ece(before, val_labels), "ece_after": ece(after, val_labels),
           "nll_before": float(-np.log(np.clip(before[idx, val_labels], 1e-12, 1)).mean()),
           "nll_after": float(-np.log(np.clip(after[idx, val_labels], 1e-12, 1)).mean())}
    if out["nll_after"] >= out["nll_before"]:
        # Scored honestly, T made held-out probabilities worse: the model is
        # already calibrated (a logistic-regression head usually is), so T stays 1.
        out.update({"temperature": 1.0, "declined_temperature": t, "declined_ece": out["ece_after"],
                    "declined_nll": out["nll_after"], "ece_after": out["ece_before"], "nll_after": out["nll_before"]})
    return out


def _nan_to_none(a: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in a]
