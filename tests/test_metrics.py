"""Metrics and calibration against small cases worked out by hand."""

import numpy as np
import pytest

from imgclf.evaluation.calibration import ece, fit_temperature, nll
from imgclf.evaluation.metrics import classification_metrics
from imgclf.inference.torch_predictor import probs_from_logits


def softmax(logits, t=1.0):
    return probs_from_logits({"plain": np.asarray(logits, dtype=np.float64)}, t)


def _onehot_probs(pred, n):
    p = np.full((len(pred), n), 0.01)
    p[np.arange(len(pred)), pred] = 1 - 0.01 * (n - 1)
    return p


def test_three_class_metrics_by_hand():
    # true 0 0 0 1 1 2 / predicted 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    m = classification_metrics(y, _onehot_probs([0, 0, 1, 1, 2, 2], 3), ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: TP 2, FP 0, FN 1 | b: TP 1, FP 1, FN 1 | c: TP 1, FP 1, FN 0
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1.0, 2 / 3, 0.8))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert [m["per_class"][k]["support"] for k in "abc"] == [3, 2, 1]


def test_top5_only_with_more_than_five_classes():
    y = np.arange(6)
    p = np.tile(np.linspace(1, 0.5, 6), (6, 1))  # every row ranks classes 0..5 in order
    m = classification_metrics(y, p / p.sum(1, keepdims=True), list("abcdef"))
    assert m["accuracy"] == pytest.approx(1 / 6) and m["top5_accuracy"] == pytest.approx(5 / 6)
    assert "top5_accuracy" not in classification_metrics(y[:2], np.eye(2), ["a", "b"])


def test_ece_by_hand():
    # two at confidence 0.9, both right (gap 0.1); two at 0.6, one right (gap 0.1): ECE = 0.1
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1])
    assert ece(probs, labels, bins=10) == pytest.approx(0.1)
    assert ece(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), bins=10) == pytest.approx(0.0)


def test_temperature_scaling_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    # 80% right, but with logits scaled as if 99.9% sure: overconfident
    pred = np.where(rng.random(400) < 0.8, labels, 1 - labels)
    logits = np.zeros((400, 2))
    logits[np.arange(400), pred] = 7.0
    t = fit_temperature(logits, labels)
    assert t > 2  # softer
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
    p = softmax(logits, t)
    assert p.max(1).mean() == pytest.approx(0.8, abs=0.03)  # confidence now matches accuracy
    assert ece(p, labels) < ece(softmax(logits), labels)


def test_no_temperature_is_fitted_without_mistakes():
    """All validation images right: the log loss keeps falling as T shrinks, so
    any fitted T would be the search bound. T must stay 1, saying why."""
    from imgclf.evaluation.calibration import fit_calibration

    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    right = np.stack([np.where(labels == 0, 2.0, -2.0), np.where(labels == 0, -2.0, 2.0)], 1) + rng.normal(0, 0.3, (40, 2))
    cal = fit_calibration(right, labels)
    assert cal["temperature"] == 1.0 and "0 of 40" in cal["skipped"]
    noisy = right.copy()
    noisy[:6] = noisy[:6, ::-1]  # six confident mistakes: an over-confident model, T > 1
    cal = fit_calibration(noisy, labels)
    assert "skipped" not in cal and 1.0 < cal["temperature"] < 20 and cal["nll_after"] < cal["nll_before"]
