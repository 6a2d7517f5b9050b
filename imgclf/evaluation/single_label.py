"""Single-label evaluation: one class per image, softmax probabilities at the
run's temperature; accuracy, per-class figures, calibration and flip TTA.
The page is report.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.evaluation import report
from imgclf.evaluation.calibration import ece, reliability
from imgclf.evaluation.kinds import CLOSE_CALLS, Decisions, LabelKind, Scored
from imgclf.evaluation.metrics import classification_metrics, format_metrics
from imgclf.inference.torch_predictor import probs_from_logits


class SingleLabel(LabelKind):
    name = "single-label"
    label_column = "label"
    close_calls = CLOSE_CALLS

    def metrics(self, clf, sc: Scored, cfg) -> dict:
        m = classification_metrics(sc.labels, sc.scored, clf.classes)
        m.update({"tta": cfg.tta, "temperature": clf.temperature, "ece": ece(sc.scored, sc.labels),
                  "calibration": calibration_section(sc, clf)})
        if cfg.tta == "flip":
            m["tta_comparison"] = tta_comparison(sc, clf.classes)
        return m

    def decisions(self, clf, sc: Scored) -> Decisions:
        pred = sc.probs.argmax(1) if len(sc.probs) else np.zeros(0, int)
        return Decisions(true=[[clf.classes[int(y)]] for y in sc.labels],
                         predicted=[[clf.classes[int(p)]] for p in pred],
                         wrong=(pred != sc.labels).astype(int),
                         rank=sc.probs.max(1) if len(sc.probs) else np.zeros(0))  # by confidence

    def case(self, clf, sc: Scored, d: Decisions, i: int) -> dict:
        p, y = sc.probs[i], int(sc.labels[i])
        return {"path": sc.paths[i], "true": clf.classes[y], "predicted": clf.classes[int(p.argmax())],
                "pred_idx": int(p.argmax()), "probability": float(p.max()), "p_true": float(p[y])}

    def summary(self, m: dict, sc: Scored) -> list[str]:
        cal = m["calibration"]
        lines = [format_metrics(m),
                 f"\ncalibration: T = {cal['temperature']:.3f} (fitted on val when training); ECE on {sc.name} "
                 f"{100 * cal['ece_before']:.2f}% at T = 1 -> {100 * cal['ece_after']:.2f}%"
                 + (" (cross-fitted)" if cal["cross_fitted"] else "")]
        if m.get("tta_comparison"):
            t = m["tta_comparison"]
            lines.append(f"flip TTA: accuracy {t['plain']['accuracy']:.4f} -> {t['flip']['accuracy']:.4f} "
                         f"({t['fixed']} fixed, {t['broken']} broken)")
        return lines

    def report(self, run, clf, sc: Scored, m: dict, cfg, workers: int, bad, engine_sections: dict) -> Path:
        return report.build_report(run, clf, sc, m, self, workers=workers, bad=bad,
                                   suspects=cfg.suspects and engine_sections.get("suspects"), gradcam=cfg.gradcam,
                                   data_map=cfg.map and engine_sections.get("data_map"))


def calibration_section(sc: Scored, clf) -> dict:
    """ECE and log loss at T = 1 and at the run's temperature, on this split."""
    before = probs_from_logits(sc.logits, 1.0)
    rb, ra = reliability(before, sc.labels), reliability(sc.scored, sc.labels)
    idx = np.arange(len(sc.labels))

    def nll(p):
        return float(-np.log(np.clip(p[idx, sc.labels], 1e-12, 1)).mean()) if len(idx) else 0.0

    return {"temperature": clf.temperature, "fitted_on": "val", "cross_fitted": not np.isscalar(sc.temperature),
            "ece_before": rb["ece"], "ece_after": ra["ece"], "nll_before": nll(before), "nll_after": nll(sc.scored),
            "reliability_before": rb, "reliability_after": ra}


def tta_comparison(sc: Scored, classes: list[str]) -> dict:
    """Metrics without and with flip TTA, and how many predictions it changed."""
    out, preds = {}, {}
    for k, lg in (("plain", {"plain": sc.logits["plain"]}), ("flip", sc.logits)):
        p = probs_from_logits(lg, sc.temperature)
        mm = classification_metrics(sc.labels, p, classes)
        preds[k] = p.argmax(1)
        out[k] = {"accuracy": mm["accuracy"], "balanced_accuracy": mm["balanced_accuracy"],
                  "macro_f1": mm["macro"]["f1"], "log_loss": mm["log_loss"], "ece": ece(p, sc.labels)}
    a, b = preds["plain"] == sc.labels, preds["flip"] == sc.labels
    out.update({"changed": int((preds["plain"] != preds["flip"]).sum()), "fixed": int((~a & b).sum()),
                "broken": int((a & ~b).sum())})
    return out
