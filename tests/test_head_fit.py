"""The head on cached features: fitted by cross-validation on train (val
chooses nothing), and `--search N` (Optuna trials scored the same way)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import imgclf
from imgclf.io import read_history
from imgclf.training.head_fit import L2_GRID

from .conftest import imgclf as run_cli


def _csv(tmp_path: Path, tiny: Path, swap_val: bool) -> Path:
    """cats_dogs_tiny as a CSV with a split column; swap_val: every val label wrong."""
    d = tmp_path / ("swapped" if swap_val else "true")
    d.mkdir()
    (d / "imgs").symlink_to(tiny)
    rows = [("path", "label", "split")]
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            label = {"cats": "dogs", "dogs": "cats"}[c] if swap_val and split == "val" else c
            rows += [(f"imgs/{split}/{c}/{f.name}", label, split) for f in sorted((tiny / split / c).iterdir())]
    with open(d / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return d / "labels.csv"


def test_default_head_is_cross_validated_and_val_chooses_nothing(tmp_path, tiny):
    """The same training images with true and with all-wrong validation labels
    give the same head, to the bit: val chose nothing. The run says so, and
    its validation figure is an honest one (>= 90% with true labels)."""
    heads, accs = [], []
    for swap in (False, True):
        out = tmp_path / f"run-{swap}"
        p = run_cli("train", _csv(tmp_path, tiny, swap), "--out", out)
        assert "chosen by 5-fold cross-validation on train" in p.stdout and "val chose nothing" in p.stdout
        assert "which chose nothing" in p.stdout  # the evaluation's note on val
        rec = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
        heads.append({k: v for k, v in rec["state_dict"].items() if k.startswith("head.")})
        hist = read_history(out / "history.csv")
        assert len(hist) == 1 and float(hist[0]["l2"]) == pytest.approx(min(L2_GRID, key=lambda g: abs(
            g - float(hist[0]["l2"]))), rel=1e-3)  # a strength from the grid
        assert float(hist[0]["cv_acc"]) >= 0.85  # held-out folds of train
        assert rec["best"]["chosen_by"] == "cv"
        accs.append(json.loads((out / "eval_val.json").read_text())["accuracy"])
    for k in heads[0]:
        assert torch.equal(heads[0][k], heads[1][k]), k
    assert accs[0] >= 0.90 and accs[1] <= 0.10  # the same predictions, scored against true and swapped labels


def test_search_writes_every_trial_and_installs_the_winner(tmp_path, tiny):
    out = tmp_path / "search"
    p = run_cli("train", tiny, "--out", out, "--search", "8", "--cv-folds", "3", "--crop-pct", "1")
    assert "search: 8 trials" in p.stdout and "best (trial" in p.stdout
    rows = list(csv.DictReader(open(out / "search.csv")))
    assert [int(r["trial"]) for r in rows] == list(range(8))
    assert {r["state"] for r in rows} <= {"complete", "pruned"} and rows[0]["state"] == "complete"
    assert rows[0]["head"] == "linear" and float(rows[0]["l2"]) == pytest.approx(0.03)  # the default, tried first
    done = [r for r in rows if r["state"] == "complete"]
    assert all(0.5 <= float(r["cv_acc"]) <= 1 and float(r["seconds"]) > 0 for r in done)
    best = min(done, key=lambda r: float(r["cv_loss"]))
    cfg = json.loads((out / "config.json").read_text())
    rec = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    # The winner's shape is the run's: model.pt rebuilds and predicts with it.
    assert cfg["head_hidden"] == ([int(best["hidden"])] if best["head"] == "mlp" else [])
    assert rec["head_hidden"] == cfg["head_hidden"] and rec["best"]["chosen_by"] == "cv"
    assert rec["preprocess"]["crop_pct"] == 1.0 and rec["preprocess"]["size"] == 208  # --crop-pct: the whole image
    assert float(read_history(out / "history.csv")[0]["cv_loss"]) == pytest.approx(float(best["cv_loss"]), abs=1e-4)
    clf = imgclf.load(out)
    res = clf.predict(sorted((tiny / "val" / "dogs").iterdir())[:10])
    assert sum(r["label"] == "dogs" for r in res) >= 8
    assert json.loads((out / "eval_val.json").read_text())["accuracy"] >= 0.85


def test_search_is_refused_where_there_is_no_head_to_tune(tmp_path, tiny):
    p = run_cli("train", tiny, "--out", tmp_path / "x", "--search", "3", "--strategy", "scratch", check=False)
    assert p.returncode == 2 and "--search tunes a head on cached features" in p.stderr


def test_metrics_match_scikit_learn():
    """classification_metrics is numpy (importing sklearn.metrics costs 2.5 s
    per run); the numbers are scikit-learn's, absent classes included."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
    )

    from imgclf.evaluation.metrics import classification_metrics

    rng = np.random.default_rng(0)
    for k, n in ((2, 50), (7, 300), (4, 30)):
        y = rng.integers(0, k - 1, n)  # the last class never occurs
        pr = rng.random((n, k))
        pr /= pr.sum(1, keepdims=True)
        m = classification_metrics(y, pr, [str(i) for i in range(k)])
        yp, lab = pr.argmax(1), list(range(k))
        for avg, got in [(None, [[m["per_class"][str(i)][q] for i in range(k)] for q in ("precision", "recall", "f1")]),
                         ("macro", [m["macro"][q] for q in ("precision", "recall", "f1")]),
                         ("weighted", [m["weighted"][q] for q in ("precision", "recall", "f1")])]:
            want = precision_recall_fscore_support(y, yp, labels=lab, average=avg, zero_division=0)[:3]
            assert np.allclose(got, want), avg
        assert m["accuracy"] == pytest.approx(accuracy_score(y, yp))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yp))
        assert m["log_loss"] == pytest.approx(log_loss(y, pr, labels=lab))
        assert m["confusion_matrix"] == confusion_matrix(y, yp, labels=lab).tolist()


def test_one_fold_scheme_is_stratified_and_even():
    """data/folds.py, the folds of head_fit, --search, label noise and the
    cross-fitted temperature: every fold holds its share of every class (a
    rare class in as many folds as it has images), sizes differ by at most
    one, and a seed gives the same folds again."""
    from imgclf.data.folds import stratified_folds

    y = np.repeat([0, 1, 2], [50, 37, 3])
    f = stratified_folds(y, 5, seed=1)
    assert np.array_equal(f, stratified_folds(y, 5, seed=1)) and not np.array_equal(f, stratified_folds(y, 5, seed=2))
    sizes = np.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    per_class = np.array([np.bincount(f[y == c], minlength=5) for c in range(3)])
    assert (per_class.max(1) - per_class.min(1) <= 1).all() and (per_class[2] > 0).sum() == 3
