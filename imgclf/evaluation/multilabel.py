"""Evaluating a multi-label run: metrics, predictions CSV and its report page.

The split is scored by `evaluate.score_split` (the same features, logits and
sigmoid as predict and serve); the decisions use the per-label thresholds
stored at training (tuned on val), so on the held-out split they are honest.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.data.datasets import multi_hot
from imgclf.data.images import thumbnail
from imgclf.evaluation.figures import _plt, _png, _short
from imgclf.evaluation.metrics import format_multilabel, multilabel_metrics
from imgclf.evaluation.open_set import format_unknown, unknown_section
from imgclf.evaluation.report import CSS, THUMB, Page, _e, _img, _pct, _tile, _unknown_html
from imgclf.io import atomic_write_text, write_json
from imgclf.runs import RunDir

GALLERY = 16  # images with the most wrong label decisions shown


def evaluate_multilabel(run: RunDir, clf, sc, cfg, bad, t0: float, printer) -> dict:
    y = multi_hot(sc.labels, len(clf.classes))
    m = multilabel_metrics(y, sc.probs, clf.thresholds, clf.classes)
    m.update({"split": sc.name, "run": str(run), "data": sc.splits.root, "model": clf.arch,
              "skipped": len(bad.seen), "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
              "seconds": round(time.time() - t0, 2)})
    if cfg.unknown:
        m["unknown"] = unknown_section(clf, sc, cfg.unknown, 1, bad, cfg.cache)
    write_json(run.eval_file(sc.name), m)
    write_predictions(run.predictions_file(sc.name), sc, y, clf)
    printer(f"\n{sc.name} split ({len(y)} images, {sc.splits.root}), thresholds tuned on val:")
    printer(format_multilabel(m))
    printer("most missed: " + ", ".join(f"{d['label']} ({d['count']})" for d in m["most_missed"] if d["count"])
            + "; most added: " + ", ".join(f"{d['label']} ({d['count']})" for d in m["most_added"] if d["count"]))
    if m.get("unknown"):
        printer(format_unknown(m["unknown"]))
    printer(f"\nwritten {run.eval_file(sc.name)}, {run.predictions_file(sc.name)}")
    if cfg.report:
        page = build_multilabel_report(run, clf, sc, y, m)
        printer(f"report: {page} (open it in a browser)")
    return m


def write_predictions(path: Path, sc, y: np.ndarray, clf) -> None:
    """path, true labels, predicted labels (";"-joined, as in the training CSV), every score."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "labels", "predicted", *[f"p_{c}" for c in clf.classes], "unknown"])
    u = sc.unknown if sc.unknown is not None else [None] * len(sc.paths)
    for rel, t, p, s in zip(sc.paths, y, sc.probs, u):
        w.writerow([rel, ";".join(_names(t > 0.5, clf.classes)), ";".join(_names(p >= clf.thresholds, clf.classes)),
                    *[repr(float(v)) for v in p], "" if s is None else repr(float(s))])
    atomic_write_text(path, buf.getvalue())


def _names(mask: np.ndarray, classes: list[str]) -> list[str]:
    return [c for c, on in zip(classes, mask) if on]


def error_cases(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, paths: list[str], classes: list[str]) -> list:
    """Images with the most wrong label decisions, worst first."""
    pred = p >= thresholds[None]
    wrong = (pred != (y > 0.5)).sum(1)
    order = [i for i in np.argsort(-wrong, kind="stable") if wrong[i]][:GALLERY]
    return [{"path": paths[i], "true": _names(y[i] > 0.5, classes), "predicted": _names(pred[i], classes),
             "missed": _names((y[i] > 0.5) & ~pred[i], classes), "added": _names(pred[i] & ~(y[i] > 0.5), classes)}
            for i in order]


def pr_curves_png(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> bytes | None:
    """Per-label precision-recall curves, each with its operating point (the stored threshold)."""
    from sklearn.metrics import precision_recall_curve


    present = [j for j in range(len(classes)) if 0 < y[:, j].sum() < len(y)]
    if not present:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for j in present[:20]:
        prec, rec, _ = precision_recall_curve(y[:, j], p[:, j])
        line, = ax.plot(rec, prec, lw=1.5, label=_short(classes[j]))
        on = p[:, j] >= thresholds[j]
        tp = (on & (y[:, j] > 0.5)).sum()
        ax.plot(tp / max(1, (y[:, j] > 0.5).sum()), tp / max(1, on.sum()), "o", color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title="Precision-recall per label (dot: stored threshold)")
    if len(present) <= 12:
        ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def build_multilabel_report(run: RunDir, clf, sc, y: np.ndarray, m: dict) -> Path:
    """RUN/report/index.html for a multi-label split, self-contained like the single-label page."""
    errors = error_cases(y, sc.probs, clf.thresholds, sc.paths, clf.classes)
    root = Path(sc.splits.root)
    page = Page(metrics=m, meta={}, calibration=None, tta=None, curves={}, pairs=[], errors={}, figs={},
                unknown=m.get("unknown"))
    for d in (page.unknown or {}).get("most_familiar_unknowns", []):
        page.thumbs[d["path"]] = thumbnail(Path(d["path"]), THUMB)
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{'n/a' if d['ap'] is None else format(d['ap'], '.3f')}</td>"
        f"<td>{d['threshold']:.3f}</td><td>{d['precision']:.3f}</td><td>{d['recall']:.3f}</td><td>{d['f1']:.3f}</td>"
        f"<td>{d['support']}</td><td>{d['missed']}</td><td>{d['added']}</td></tr>" for c, d in m["per_label"].items())
    tiles = "".join(_tile(thumbnail(root / e["path"], THUMB), [
        f"true: <b>{_e('; '.join(e['true']) or '(none)')}</b>",
        f"predicted: {_e('; '.join(e['predicted']) or '(none)')}",
        *([f'<span class="bad">missed: {_e("; ".join(e["missed"]))}</span>'] if e["missed"] else []),
        *([f'<span class="bad">added: {_e("; ".join(e["added"]))}</span>'] if e["added"] else [])], e["path"])
        for e in errors)
    pr = pr_curves_png(y, sc.probs, clf.thresholds, clf.classes)
    sections = [
        ("summary", "Summary", f'<table id="ml-summary"><tr><th>mAP</th><th>micro F1</th><th>macro F1</th>'
         f'<th>subset accuracy</th><th>Hamming loss</th><th>images</th></tr><tr><td>{m["map"]:.4f}</td>'
         f'<td>{m["micro"]["f1"]:.4f}</td><td>{m["macro"]["f1"]:.4f}</td><td>{_pct(m["subset_accuracy"])}</td>'
         f'<td>{m["hamming_loss"]:.4f}</td><td>{m["n"]}</td></tr></table><p class="sub">Decisions use the '
         f"per-label thresholds tuned on val at training; subset accuracy counts an image right only when every "
         f"label is.</p>"),
        ("per-label", "Per label", '<table id="per-label"><tr><th>label</th><th>AP</th><th>threshold</th>'
         '<th>precision</th><th>recall</th><th>F1</th><th>support</th><th>missed</th><th>added</th></tr>'
         + rows + "</table>"),
        ("pr", "Precision-recall curves", _img(pr, "precision-recall per label") if pr else
         '<p class="note">Needs a label both present and absent in this split.</p>'),
        ("gallery", "Error gallery", f'<div class="gallery" id="ml-errors">{tiles}</div>' if tiles else
         "<p>None: every label of every image was decided right.</p>"),
        ("unknown", "Unknown inputs", _unknown_html(page)),
    ]
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{_e(t)}</h2>{c}</section>' for k, t, c in sections)
    title = f"imgclf report: {run.path.name} (multi-label)"
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{CSS}</style></head>'
            f'<body><main><h1>{_e(title)}</h1><p class="sub">{_e(clf.arch)} &middot; {_e(m["split"])} split of '
            f'{_e(m["data"])} &middot; {time.strftime("%Y-%m-%d %H:%M")}</p><nav>{nav}</nav>{body}'
            f'<p class="sub" style="margin-top:40px">Written by imgclf {_e(__version__)}; the numbers are also in '
            f"<code>eval.json</code> next to this page.</p></main></body></html>")
    atomic_write_text(run.report_page, html)
    write_json(run.report_json, {"metrics": m, "errors": errors})
    return run.report_page
