"""The post-training fits: what a model learns from its validation split once
its weights are final, stored in model.pt beside them.

  calibration  single-label: the temperature T (calibration.fit_calibration)
               multi-label: a decision threshold per label, best F1 (metrics.tune_thresholds)
  unknown      the kNN unknown-input scorer (inference/unknown.py) and the --reject threshold

`imgclf train` runs them all on its in-memory predictor of the best weights
(`fit_after_training`), which then evaluates the held-out split without
reading model.pt back; `imgclf evaluate --calibrate` reruns the calibration
fit of an existing run and stores it (`refit_calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.datasets import multi_hot
from imgclf.data.loading import BadFileLog
from imgclf.evaluation.calibration import fit_calibration
from imgclf.evaluation.metrics import tune_thresholds
from imgclf.inference.predictor import reject_threshold
from imgclf.inference.torch_predictor import TorchPredictor, probs_from_logits
from imgclf.inference.unknown import bank_sample, fit_scorer
from imgclf.io import torch_save_atomic
from imgclf.log import get_logger
from imgclf.runs import RunDir

log = get_logger(__name__)


@dataclass
class FitData:
    """The images the fits read (relative paths under `root`), and how."""

    root: str | Path
    train: list
    val: list
    batch_size: int = 32
    workers: int = 1
    bad: BadFileLog | None = None
    use_cache: bool = True

    def features(self, clf: TorchPredictor, items: list) -> tuple[np.ndarray, np.ndarray]:
        """Plain backbone features and labels of the readable `items`, through the feature cache."""
        f, labels, _ = clf.features_items(self.root, items, self.batch_size, self.workers, self.bad, progress=False,
                                          use_cache=self.use_cache)
        return f["plain"], labels


def fit_after_training(clf: TorchPredictor, data: FitData, threshold: float | None, reject, seed: int) -> dict:
    """Every post-training fit, from the validation features computed once.
    Applies the results to `clf` and returns them as model-record fields."""
    features, labels = data.features(clf, data.val)
    fields = calibration_fit(clf, _logits(clf, features), labels, threshold, "T stays 1")
    fields.update(unknown_fit(clf, data, features, seed, reject))
    clf.use_fits(fields)
    return fields


def refit_calibration(run: RunDir, clf: TorchPredictor, workers: int, bad: BadFileLog, use_cache: bool = True) -> None:
    """evaluate --calibrate: the calibration fit again on val, stored in model.pt
    (for runs trained before training fitted it). Exports made earlier then
    warn that they are stale."""
    splits = run.splits()
    if not splits.val:
        log.info("note: no validation split to fit a calibration on; keeping the stored one")
        return
    data = FitData(splits.root, splits.train, splits.val, workers=workers, bad=bad, use_cache=use_cache)
    features, labels = data.features(clf, data.val)
    fields = calibration_fit(clf, _logits(clf, features), labels, (clf.record.get("config") or {}).get("threshold"),
                             "keeping the stored temperature")
    if fields:
        clf.use_fits(fields)
        torch_save_atomic(clf.record, run.model_file)
        log.info(f"calibration stored in {run.model_file}")


def calibration_fit(clf: TorchPredictor, logits: np.ndarray, labels, threshold: float | None, kept: str) -> dict:
    """The kind's calibration as record fields: multi-label thresholds, else
    the temperature ({} when none can be fitted; `kept` says what stays)."""
    if clf.multi_label:
        log.info("calibration: multi-label: per-label sigmoid scores with decision thresholds tuned on val instead")
        return thresholds_fit(clf.classes, logits, labels, threshold)
    return temperature_fit(logits, labels, kept)


def temperature_fit(logits: np.ndarray, labels: np.ndarray, kept: str = "T stays 1") -> dict:
    """T on the validation logits. The "after" ECE is cross-fitted (each image
    scored with a T fit on the other folds): the same images chose T, so a
    plain refit would flatter itself."""
    cal = fit_calibration(logits, labels)
    if "skipped" in cal:
        log.info(f"calibration: {cal['skipped']}; {kept}")
        return {}
    if "declined_temperature" in cal:
        log.info(f"calibration: T = 1 kept: the best fit on val, T = {cal['declined_temperature']:.3f}, raised the "
            f"cross-fitted log loss ({cal['nll_before']:.4f} -> {cal['declined_nll']:.4f}); val ECE "
            f"{100 * cal['ece_before']:.2f}%: already calibrated")
    else:
        log.info(f"calibration: T = {cal['temperature']:.3f} fitted on val ({cal['n']} images); val ECE "
            f"{100 * cal['ece_before']:.2f}% -> {100 * cal['ece_after']:.2f}% (cross-fitted)")
    return {"temperature": cal["temperature"], "calibration": cal}


def thresholds_fit(classes: list[str], logits: np.ndarray, labels, fixed: float | None = None) -> dict:
    """Multi-label: per-label decision thresholds, each maximising F1 on val
    (or `fixed`, --threshold, for all). The held-out split then measures them."""
    p = probs_from_logits({"plain": logits}, 1.0, multi_label=True)
    thr = tune_thresholds(multi_hot(labels, len(classes)), p, fixed)
    how = f"--threshold {fixed:g}" if fixed else "tuned on val for the best F1 per label"
    log.info(f"thresholds ({how}): " + ", ".join(f"{c} {t:.2f}" for c, t in zip(classes[:10], thr))
        + (" ..." if len(thr) > 10 else ""))
    return {"thresholds": [float(t) for t in thr]}


def unknown_fit(clf: TorchPredictor, data: FitData, val_features: np.ndarray, seed: int, reject) -> dict:
    """The unknown-input scorer: training images' features (cached: training
    just computed them) as the kNN bank, the validation images' distances as
    its scale, and --reject's threshold."""
    train = data.train
    groups = np.zeros(len(train), int) if clf.multi_label else np.array([y for _, y in train])  # class-balanced bank
    bank, _ = data.features(clf, [train[i] for i in bank_sample(groups, seed)])
    scorer = fit_scorer(bank, np.zeros(len(bank), int), val_features)  # already sampled
    threshold = reject_threshold(reject, None)
    log.info(f"unknown inputs: kNN scorer on {len(scorer.bank)} training images (k={scorer.k}); "
        + (f"answers 'unknown' above {threshold:g} (--reject {reject})" if threshold is not None else
           "the score is returned, rejection is off (--reject auto turns it on)"))
    return {"unknown": scorer.to_record(), "reject": threshold}


def _logits(clf: TorchPredictor, features: np.ndarray) -> np.ndarray:
    return clf.logits_from_features(features) if len(features) else np.zeros((0, len(clf.classes)), np.float32)
