"""`imgclf evaluate RUN [DATA]`: metrics on the split the model never saw.

One pipeline for every kind of label (kinds.py): score the split, then the
run's kind (single_label.py, multilabel.py) gives the metrics, the per-image
decisions behind the one predictions file, the terminal summary and the
report's sections. Logits come from the run's `TorchPredictor` through the
feature cache (the entries training wrote), probabilities from the one
`probs_from_logits`, so the figures here are the probabilities `predict` and
`serve` return.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgclf.config import EvaluateConfig
from imgclf.data.datasets import Splits, discover
from imgclf.data.loading import BadFileLog, default_workers, scan
from imgclf.errors import DataError, RunError
from imgclf.evaluation.calibration import cross_fit_temperatures
from imgclf.evaluation.fits import refit_calibration
from imgclf.evaluation.kinds import LabelKind, Scored, write_predictions
from imgclf.evaluation.multilabel import MultiLabel
from imgclf.evaluation.open_set import format_unknown, unknown_section
from imgclf.evaluation.single_label import SingleLabel
from imgclf.inference.torch_predictor import TorchPredictor, probs_from_logits
from imgclf.io import write_json
from imgclf.log import get_logger
from imgclf.runs import RunDir

log = get_logger(__name__)
KINDS: dict[str, LabelKind] = {k.name: k for k in (SingleLabel(), MultiLabel())}


def label_kind(clf) -> LabelKind:
    """The run's kind of label (the model record says)."""
    return KINDS["multi-label" if clf.multi_label else "single-label"]


def evaluate_run(cfg: EvaluateConfig, predictor: TorchPredictor | None = None, workers: int | None = None,
                 sections: dict | None = None, quiet: bool = False) -> dict:
    """Evaluate a run on its held-out split (test, else val) as recorded in
    RUN/splits.json; with DATA, the same relative files under another root.
    Writes RUN/eval_<split>.json and RUN/predictions_<split>.csv (and the HTML
    report unless cfg.report is off); returns the metrics. `predictor`: the
    run's model already in memory (train passes the one it fitted).
    `sections`: the report's data-engine sections by name, "suspects" and
    "data_map" (data_engine.REPORT_SECTIONS: they live above this layer;
    classification's evaluate verb, tasks/classify.py, passes them). `quiet`: the summary lines at DEBUG instead of INFO."""
    say = functools.partial(log.log, logging.DEBUG if quiet else logging.INFO)
    run = RunDir(cfg.run)
    clf = predictor or TorchPredictor.from_run(run.path, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir)
    w = default_workers() if workers is None else workers
    bad = BadFileLog()
    if cfg.calibrate:
        refit_calibration(run, clf, w, bad, cfg.cache)
    t0 = time.time()
    sc = score_split(run, clf, cfg, w, bad, say)
    kind = label_kind(clf)
    m = kind.metrics(clf, sc, cfg)
    m.update({"split": sc.name, "run": str(run), "data": sc.splits.root, "model": clf.arch, "skipped": len(bad.seen),
              "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
              "seconds": round(time.time() - t0, 2)})
    if cfg.unknown:
        m["unknown"] = unknown_section(clf, sc, cfg.unknown, w, bad, cfg.cache)
    write_json(run.eval_file(sc.name), m)
    write_predictions(run.predictions_file(sc.name), sc, clf.classes, kind, kind.decisions(clf, sc))
    print_summary(kind, m, sc, run, say)
    if cfg.report:
        page = kind.report(run, clf, sc, m, cfg, w, bad, sections or {})
        say(f"report: {page} (open it in a browser)")
    return m


def score_split(run: RunDir, clf: TorchPredictor, cfg: EvaluateConfig, workers: int, bad: BadFileLog,
                say: Callable[[str], None]) -> Scored:
    """Logits and probabilities of the evaluated split's readable images."""
    splits = run_splits(run, cfg.data, clf.classes)
    name, items = splits.eval_split(cfg.split)
    if cfg.split is None and name == "val":
        if clf.record.get("best", {}).get("chosen_by") == "cv":
            say("note: this data has no test split; evaluating on val, which chose nothing (the head's "
                    "settings came from cross-validation on train), so this figure is a held-out estimate")
        else:
            say("note: this data has no test split; evaluating on val (which also chose the best epoch, "
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


def print_summary(kind: LabelKind, m: dict, sc: Scored, run: RunDir, say: Callable[[str], None]) -> None:
    say(f"\n{sc.name} split ({len(sc.labels)} images, {sc.splits.root}){kind.header_note}:")
    for line in kind.summary(m, sc):
        say(line)
    if m.get("unknown"):
        say(format_unknown(m["unknown"]))
    say(f"\nwritten {run.eval_file(sc.name)}, {run.predictions_file(sc.name)}")


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
