"""Multi-label evaluation: several labels per image, a sigmoid score per label.

The decisions use the per-label thresholds stored at training (tuned on val),
so on the held-out split they are honest. The page is drawn in the shared
skeleton (page.py) with this kind's sections.
"""

from __future__ import annotations

import time
from pathlib import Path

from imgclf.data.datasets import multi_hot
from imgclf.data.images import thumbnail
from imgclf.evaluation.figures import pr_curves_png
from imgclf.evaluation.kinds import Decisions, LabelKind, Scored, error_cases, names
from imgclf.evaluation.metrics import format_multilabel, multilabel_metrics
from imgclf.evaluation.page import THUMB, Section, esc, img_tag, pct, render_page, tile, unknown_html, write_report


class MultiLabel(LabelKind):
    name = "multi-label"
    label_column = "labels"
    header_note = ", thresholds tuned on val"

    def metrics(self, clf, sc: Scored, cfg) -> dict:
        return multilabel_metrics(multi_hot(sc.labels, len(clf.classes)), sc.probs, clf.thresholds, clf.classes)

    def decisions(self, clf, sc: Scored) -> Decisions:
        truth = multi_hot(sc.labels, len(clf.classes)) > 0.5
        pred = sc.probs >= clf.thresholds[None]
        wrong = (pred != truth).sum(1)
        return Decisions(true=[names(t, clf.classes) for t in truth], predicted=[names(p, clf.classes) for p in pred],
                         wrong=wrong, rank=wrong.astype(float))  # the most wrong label decisions first

    def case(self, clf, sc: Scored, d: Decisions, i: int) -> dict:
        t, p = d.true[i], d.predicted[i]
        return {"path": sc.paths[i], "true": t, "predicted": p, "missed": [c for c in t if c not in p],
                "added": [c for c in p if c not in t]}

    def summary(self, m: dict, sc: Scored) -> list[str]:
        return [format_multilabel(m),
                "most missed: " + ", ".join(f"{d['label']} ({d['count']})" for d in m["most_missed"] if d["count"])
                + "; most added: " + ", ".join(f"{d['label']} ({d['count']})" for d in m["most_added"] if d["count"])]

    def report(self, run, clf, sc: Scored, m: dict, cfg, workers: int, bad, engine_sections: dict) -> Path:
        """RUN/report/index.html for a multi-label split, self-contained like the single-label page."""
        errors = error_cases(self, clf, sc)["mistakes"]
        unknowns = (m.get("unknown") or {}).get("most_familiar_unknowns", [])
        thumbs = {d["path"]: thumbnail(Path(d["path"]), THUMB) for d in unknowns}
        y = multi_hot(sc.labels, len(clf.classes))
        pr = pr_curves_png(y, sc.probs, clf.thresholds, clf.classes)
        subtitle = [esc(clf.arch), f'{esc(m["split"])} split of {esc(m["data"])}', time.strftime("%Y-%m-%d %H:%M")]
        html = render_page(f"imgclf report: {run.path.name} (multi-label)", subtitle,
                           sections(m, errors, Path(sc.splits.root), pr, thumbs))
        return write_report(run, html, {"metrics": m, "errors": errors})


def sections(m: dict, errors: list[dict], root: Path, pr: bytes | None, thumbs: dict) -> list[Section]:
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{'n/a' if d['ap'] is None else format(d['ap'], '.3f')}</td>"
        f"<td>{d['threshold']:.3f}</td><td>{d['precision']:.3f}</td><td>{d['recall']:.3f}</td><td>{d['f1']:.3f}</td>"
        f"<td>{d['support']}</td><td>{d['missed']}</td><td>{d['added']}</td></tr>" for c, d in m["per_label"].items())
    tiles = "".join(tile(thumbnail(root / e["path"], THUMB), [
        f"true: <b>{esc('; '.join(e['true']) or '(none)')}</b>",
        f"predicted: {esc('; '.join(e['predicted']) or '(none)')}",
        *([f'<span class="bad">missed: {esc("; ".join(e["missed"]))}</span>'] if e["missed"] else []),
        *([f'<span class="bad">added: {esc("; ".join(e["added"]))}</span>'] if e["added"] else [])], e["path"])
        for e in errors)
    return [
        ("summary", "Summary", f'<table id="ml-summary"><tr><th>mAP</th><th>micro F1</th><th>macro F1</th>'
         f'<th>subset accuracy</th><th>Hamming loss</th><th>images</th></tr><tr><td>{m["map"]:.4f}</td>'
         f'<td>{m["micro"]["f1"]:.4f}</td><td>{m["macro"]["f1"]:.4f}</td><td>{pct(m["subset_accuracy"])}</td>'
         f'<td>{m["hamming_loss"]:.4f}</td><td>{m["n"]}</td></tr></table><p class="sub">Decisions use the '
         f"per-label thresholds tuned on val at training; subset accuracy counts an image right only when every "
         f"label is.</p>"),
        ("per-label", "Per label", '<table id="per-label"><tr><th>label</th><th>AP</th><th>threshold</th>'
         '<th>precision</th><th>recall</th><th>F1</th><th>support</th><th>missed</th><th>added</th></tr>'
         + rows + "</table>"),
        ("pr", "Precision-recall curves", img_tag(pr, "precision-recall per label") if pr else
         '<p class="note">Needs a label both present and absent in this split.</p>'),
        ("gallery", "Error gallery", f'<div class="gallery" id="ml-errors">{tiles}</div>' if tiles else
         "<p>None: every label of every image was decided right.</p>"),
        ("unknown", "Unknown inputs", unknown_html(m.get("unknown"), thumbs)),
    ]
