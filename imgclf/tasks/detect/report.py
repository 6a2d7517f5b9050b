"""The detection report: the metrics table (mAP, AP per class, AR, sizes)
in the shared page shell (evaluation/page.py), self-contained."""

from __future__ import annotations

from pathlib import Path

from imgclf.evaluation.page import esc, num, render_page
from imgclf.evaluation.page import write_report as write_page
from imgclf.runs import RunDir
from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.predictor import DetPredictor

HEADLINE = (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map75", "mAP@.75"), ("ar100", "AR@100"),
            ("map_small", "AP small"), ("map_medium", "AP medium"), ("map_large", "AP large"))


def metrics_html(m: dict, thresholds: dict[str, float]) -> str:
    cards = "".join(f'<div class="card"><div class="v">{num(m.get(k))}</div><div class="k">{t}</div></div>'
                    for k, t in HEADLINE)
    rows = "".join(f"<tr><td>{esc(c)}</td><td class=n>{num(m['ap_per_class'][c])}</td>"
                   f"<td class=n>{num(m['ap50_per_class'][c])}</td><td class=n>{num(thresholds.get(c))}</td>"
                   f"<td class=n>{num(m.get('f1', {}).get(c))}</td></tr>" for c in m["ap_per_class"])
    return (f'<div class="cards">{cards}</div><table><tr><th>class</th><th class=n>AP@[.5:.95]</th>'
            f"<th class=n>AP@.5</th><th class=n>threshold</th><th class=n>F1 here</th></tr>{rows}</table>")


def write_report(run: RunDir, pred: DetPredictor, ds: DetDataset, preds: list[dict], m: dict, split: str) -> Path:
    """RUN/report/index.html and eval.json for a detection evaluation."""
    sections = [("metrics", "Metrics", metrics_html(m, m.get("thresholds_in_use", {})))]
    page = render_page(f"Detection report: {run.path.name}", [f"{len(ds.images)} {split} images, "
                       f"{len(ds.classes)} classes, {pred.arch}"], sections)
    return write_page(run, page, m)
