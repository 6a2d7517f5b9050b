"""What a kind of label changes in an evaluation, and the steps every kind shares.

`evaluate.evaluate_run` is one pipeline: score the split, then ask the run's
`LabelKind` for its metrics, its per-image decisions (which feed the one
`write_predictions` and the one `error_cases`), its terminal summary and its
report sections (drawn in the one page skeleton, page.py). Kinds today:
single-label (single_label.py) and multi-label (multilabel.py); another kind
of classification label is a further subclass and an entry in
`evaluate.KINDS`. Detection and segmentation are tasks with their own
evaluation (tasks/<task>/evaluate.py), not kinds.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.datasets import Splits
from imgclf.io import atomic_write_text

GALLERY = 16  # mistakes shown in a report's error gallery
CLOSE_CALLS = 8  # least confident right answers shown (kinds with a confidence)


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


@dataclass
class Decisions:
    """Per image, the given labels and the model's answer (as names) and how wrong it was."""

    true: list[list[str]]
    predicted: list[list[str]]
    wrong: np.ndarray  # wrong decisions per image (0: right)
    rank: np.ndarray  # worst mistake first when descending; closest right call first when ascending


class LabelKind:
    """One kind of label. Subclasses fill in what differs; evaluate_run calls them in order."""

    name = ""
    label_column = "label"  # the predictions file's column of given labels
    header_note = ""  # after "<split> split (N images, ROOT)" in the terminal summary
    close_calls = 0  # how many least-confident right answers error_cases adds

    def metrics(self, clf, sc: Scored, cfg) -> dict:
        """The kind's figures for eval_<split>.json."""
        raise NotImplementedError

    def decisions(self, clf, sc: Scored) -> Decisions:
        raise NotImplementedError

    def case(self, clf, sc: Scored, d: Decisions, i: int) -> dict:
        """Image i as an error-gallery entry (what report/eval.json records)."""
        raise NotImplementedError

    def summary(self, m: dict, sc: Scored) -> list[str]:
        """Lines for the terminal, after the header line."""
        raise NotImplementedError

    def report(self, run, clf, sc: Scored, m: dict, cfg, workers: int, bad, engine_sections: dict) -> Path:
        """Write RUN/report/ (page.render_page + page.write_report); returns the page's path.
        `engine_sections`: the data engine's report sections by name (evaluate_run)."""
        raise NotImplementedError


def ranked(key: np.ndarray, keep: np.ndarray, limit: int) -> list[int]:
    """Indices where `keep` holds, by `key` descending (ties in file order), at most `limit`."""
    return [int(i) for i in np.argsort(-key, kind="stable") if keep[i]][:limit]


def error_cases(kind: LabelKind, clf, sc: Scored, d: Decisions | None = None) -> dict:
    """The worst mistakes and, where the kind has a confidence, the closest right calls."""
    d = d or kind.decisions(clf, sc)
    wrong = d.wrong > 0
    return {"mistakes": [kind.case(clf, sc, d, i) for i in ranked(d.rank, wrong, GALLERY)],
            "n_mistakes": int(wrong.sum()),
            "close_calls": [kind.case(clf, sc, d, i) for i in ranked(-d.rank, ~wrong, kind.close_calls)]}


def write_predictions(path: Path, sc: Scored, classes: list[str], kind: LabelKind, d: Decisions) -> None:
    """One row per image: path, given label(s), predicted label(s) (";"-joined, as in
    the training CSV), every probability and the unknown score (repr precision:
    the file reproduces the numbers exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    u = sc.unknown if sc.unknown is not None else [None] * len(sc.paths)
    w.writerow(["path", kind.label_column, "predicted", *[f"p_{c}" for c in classes], "unknown"])
    for rel, t, p, probs, s in zip(sc.paths, d.true, d.predicted, sc.probs, u):
        w.writerow([rel, ";".join(t), ";".join(p), *[repr(float(v)) for v in probs],
                    "" if s is None else repr(float(s))])
    atomic_write_text(path, buf.getvalue())


def names(mask: np.ndarray, classes: list[str]) -> list[str]:
    """The classes whose entry in `mask` is true."""
    return [c for c, on in zip(classes, mask) if on]

