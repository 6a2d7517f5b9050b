"""`imgclf evaluate RUN [DATA]`: metrics on the split the model never saw.

Logits come from the run's `TorchPredictor` through the feature cache (the
entries training wrote), probabilities from the one `probs_from_logits`, so
the figures here are the probabilities `predict` and `serve` return.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import EvaluateConfig
from imgclf.data.datasets import BadFileLog, Splits, default_workers, discover, scan
from imgclf.errors import DataError, RunError
from imgclf.evaluation.calibration import cross_fit_temperatures, ece, fit_calibration, reliability
from imgclf.evaluation.metrics import classification_metrics, format_metrics
from imgclf.evaluation.multilabel import evaluate_multilabel
from imgclf.evaluation.open_set import format_unknown, unknown_section
from imgclf.evaluation.report import build_report
from imgclf.inference.torch_predictor import TorchPredictor, probs_from_logits
from imgclf.io import atomic_write_text, write_json
from imgclf.runs import RunDir
from imgclf.training.checkpoint import save_record


@dataclass
class Scored:
    """One evaluated split: what every section of the evaluation reads."""

    name: str  # "test" | "val" | "train"
    splits: Splits
    paths: list[str]  # relative paths of the readable images, in order
    labels: np.ndarray
    logits: dict[str, np.ndarray]  # per variant ("plain", "flip")
    temperature: np.ndarray | float  # what metrics are scored with (per row when cross-fitted)
    scored: np.ndarray  # probabilities at `temperature`: what the metrics use
    probs: np.ndarray  # plain images at the stored temperature: what predict and serve return
    unknown: np.ndarray | None = None  # unknown-input scores (None: the model has no scorer)


def evaluate_run(cfg: EvaluateConfig, predictor: TorchPredictor | None = None, workers: int | None = None,
                 printer=print, sections: dict | None = None) -> dict:
    """Evaluate a run on its held-out split (test, else val) as recorded in
    RUN/splits.json; with DATA, the same relative files under another root.
    Writes RUN/eval_<split>.json and RUN/predictions_<split>.csv (and the HTML
    report unless cfg.report is off); returns the metrics. sections: the
    report's data-engine sections (data_engine.REPORT_SECTIONS; the CLI
    passes them), by name "suspects" and "data_map"."""
    run = RunDir(cfg.run)
    clf = predictor or TorchPredictor.from_run(run.path, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir)
    w = default_workers() if workers is None else workers
    bad = BadFileLog()
    if cfg.calibrate:
        recalibrate(run, clf, w, bad, printer)
    t0 = time.time()
    sc = score_split(run, clf, cfg, w, bad, printer)
    if clf.multi_label:
        return evaluate_multilabel(run, clf, sc, cfg, bad, t0, printer)
    m = classification_metrics(sc.labels, sc.scored, clf.classes)
    m.update({"split": sc.name, "run": str(run), "data": sc.splits.root, "model": clf.arch, "tta": cfg.tta,
              "skipped": len(bad.seen), "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
              "seconds": round(time.time() - t0, 2), "temperature": clf.temperature, "ece": ece(sc.scored, sc.labels)})
    m["calibration"] = calibration_section(sc, clf)
    if cfg.tta == "flip":
        m["tta_comparison"] = tta_comparison(sc, clf.classes)
    if cfg.unknown:
        m["unknown"] = unknown_section(clf, sc, cfg.unknown, w, bad, cfg.cache)
    write_json(run.eval_file(sc.name), m)
    write_predictions(run.predictions_file(sc.name), sc, clf.classes)
    print_summary(m, sc, run, printer)
    if cfg.report:
        sections = sections or {}
        page = build_report(run, clf, sc, m, workers=w, bad=bad, suspects=cfg.suspects and sections.get("suspects"),
                            gradcam=cfg.gradcam, data_map=cfg.map and sections.get("data_map"), printer=printer)
        printer(f"report: {page} (open it in a browser)")
    return m


def score_split(run: RunDir, clf: TorchPredictor, cfg: EvaluateConfig, workers: int, bad: BadFileLog,
                printer) -> Scored:
    """Logits and probabilities of the evaluated split's readable images."""
    splits = run_splits(run, cfg.data, clf.classes)
    name, items = splits.eval_split(cfg.split)
    if cfg.split is None and name == "val":
        if clf.record.get("best", {}).get("chosen_by") == "cv":
            printer("note: this data has no test split; evaluating on val, which chose nothing (the head's "
                    "settings came from cross-validation on train), so this figure is a held-out estimate")
        else:
            printer("note: this data has no test split; evaluating on val (which also chose the best epoch, "
                    "so this figure is slightly optimistic)")
    holder = Splits(splits.root, splits.classes, [], [], [], splits.layout)
    setattr(holder, name, list(items))
    for rel, reason in scan(holder, (name,)):
        bad.add(rel, reason)
    items = getattr(holder, name)
    variants = ("plain", "flip") if cfg.tta == "flip" else ("plain",)
    feats, labels, kept = clf.features_items(splits.root, items, workers=workers, bad=bad, variants=variants,
                                             use_cache=cfg.cache)
    logits = {v: clf.logits_from_features(f) if len(kept) else np.zeros((0, len(clf.classes)), np.float32)
              for v, f in feats.items()}
    # The temperature was fitted on val: scoring val with it would flatter the
    # "after" figures, so there each image gets a T fitted on the other folds.
    t = cross_fit_temperatures(logits["plain"], labels)[:, None] if name == "val" and clf.temperature != 1.0 \
        else clf.temperature
    ml = clf.multi_label
    return Scored(name, splits, [items[i][0] for i in kept], labels, logits, t, probs_from_logits(logits, t, ml),
                  probs_from_logits({"plain": logits["plain"]}, clf.temperature, ml),
                  clf.unknown_from_features(feats["plain"]) if len(kept) else None)


def calibration_section(sc: Scored, clf: TorchPredictor) -> dict:
    """ECE and log loss at T = 1 and at the run's temperature, on this split."""
    before = probs_from_logits(sc.logits, 1.0)
    rb, ra = reliability(before, sc.labels), reliability(sc.scored, sc.labels)
    idx = np.arange(len(sc.labels))

    def nll(p):
        return float(-np.log(np.clip(p[idx, sc.labels], 1e-12, 1)).mean()) if len(idx) else 0.0

    return {"temperature": clf.temperature, "fitted_on": "val", "cross_fitted": not np.isscalar(sc.temperature),
            "ece_before": rb["ece"], "ece_after": ra["ece"], "nll_before": nll(before), "nll_after": nll(sc.scored),
            "reliability_before": rb, "reliability_after": ra}


def recalibrate(run: RunDir, clf: TorchPredictor, workers: int, bad: BadFileLog, printer) -> None:
    """--calibrate: refit T on val and store it in model.pt (for runs trained
    before training fitted it). Exports made earlier then warn that they are stale."""
    splits = run.splits()
    if not splits.val:
        printer("note: no validation split to fit a temperature on; keeping the stored one")
        return
    logits, labels, _ = clf.logits_items(splits.root, splits.val, workers=workers, bad=bad, progress=False)
    cal = fit_calibration(logits["plain"], labels)
    if "skipped" in cal:
        printer(f"note: {cal['skipped']}; keeping the stored temperature")
        return
    clf.record["temperature"], clf.record["calibration"] = cal["temperature"], cal
    clf.temperature = cal["temperature"]
    save_record(clf.record, run)
    printer(f"calibration: T = {cal['temperature']:.3f} fitted on val, stored in {run.model_file}"
            + (f" (T = {cal['declined_temperature']:.3f} raised the cross-fitted log loss: kept 1)"
               if "declined_temperature" in cal else ""))


def tta_comparison(sc: Scored, classes: list[str]) -> dict:
    """Metrics without and with flip TTA, and how many predictions it changed."""
    out, preds = {}, {}
    for k, lg in (("plain", {"plain": sc.logits["plain"]}), ("flip", sc.logits)):
        p = probs_from_logits(lg, sc.temperature)
        mm = classification_metrics(sc.labels, p, classes)
        preds[k] = p.argmax(1)
        out[k] = {"accuracy": mm["accuracy"], "balanced_accuracy": mm["balanced_accuracy"], "macro_f1": mm["macro"]["f1"],
                  "log_loss": mm["log_loss"], "ece": ece(p, sc.labels)}
    a, b = preds["plain"] == sc.labels, preds["flip"] == sc.labels
    out.update({"changed": int((preds["plain"] != preds["flip"]).sum()), "fixed": int((~a & b).sum()),
                "broken": int((a & ~b).sum())})
    return out


def write_predictions(path: Path, sc: Scored, classes: list[str]) -> None:
    """One row per image: path, true label, predicted label, every probability
    (repr precision: the file reproduces the numbers exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    u = sc.unknown if sc.unknown is not None else [None] * len(sc.paths)
    w.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes], "unknown"])
    for rel, y, p, s in zip(sc.paths, sc.labels, sc.probs, u):
        w.writerow([rel, classes[int(y)], classes[int(p.argmax())], *[repr(float(v)) for v in p],
                    "" if s is None else repr(float(s))])
    atomic_write_text(path, buf.getvalue())


def print_summary(m: dict, sc: Scored, run: RunDir, printer) -> None:
    printer(f"\n{sc.name} split ({len(sc.labels)} images, {sc.splits.root}):")
    printer(format_metrics(m))
    cal = m["calibration"]
    printer(f"\ncalibration: T = {cal['temperature']:.3f} (fitted on val when training); ECE on {sc.name} "
            f"{100 * cal['ece_before']:.2f}% at T = 1 -> {100 * cal['ece_after']:.2f}%"
            + (" (cross-fitted)" if cal["cross_fitted"] else ""))
    if m.get("tta_comparison"):
        t = m["tta_comparison"]
        printer(f"flip TTA: accuracy {t['plain']['accuracy']:.4f} -> {t['flip']['accuracy']:.4f} "
                f"({t['fixed']} fixed, {t['broken']} broken)")
    if m.get("unknown"):
        printer(format_unknown(m["unknown"]))
    printer(f"\nwritten {run.eval_file(sc.name)}, {run.predictions_file(sc.name)}")


def run_splits(run: RunDir, data, classes: list[str]) -> Splits:
    """The run's recorded split, under DATA when given; a labelled folder the
    run has never seen is evaluated whole."""
    if run.splits_file.exists():
        s = run.splits()
        if data is not None and Path(data).resolve() != Path(s.root).resolve():
            # Another copy of the same data, or a new labelled folder: use its own layout if it differs.
            if Path(data).is_dir() and not all((Path(data) / p).exists() for p, _ in (s.test or s.val)[:20]):
                return new_data(data, classes)
            return run.splits(root=str(Path(data).resolve()))
        return s
    if data is None:
        raise RunError(f"{run.splits_file} is missing", f"pass the data folder: imgclf evaluate {run} DATA")
    return new_data(data, classes)


def new_data(data, classes: list[str]) -> Splits:
    """Labelled data the run has never seen: all of it is evaluated."""
    s = discover(data, val_fraction=0.0, test_fraction=0.0)
    unknown = set(s.classes) - set(classes)
    if unknown:
        raise DataError(f"{data}: classes {sorted(unknown)} are not among the model's classes {classes}",
                        "evaluate on folders named after the model's classes")
    remap = {i: classes.index(c) for i, c in enumerate(s.classes)}
    items = [(p, remap[y]) for p, y in (s.train + s.val + s.test)]
    if s.given and (s.test or s.val):
        items = [(p, remap[y]) for p, y in (s.test or s.val)]
    return Splits(s.root, classes, [], [], items, s.layout)
