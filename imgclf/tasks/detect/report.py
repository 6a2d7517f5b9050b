"""The detection report in the shared page shell (evaluation/page.py),
self-contained: the metrics table (mAP, AP per class, AR, sizes), the
precision-recall curves per class, the confusion matrix with background at
the stored thresholds (figure and table), and a gallery of the images with
the most errors, true and predicted boxes drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data.images import BadImage
from imgclf.evaluation.figures import confusion_png
from imgclf.evaluation.page import esc, img_tag, num, render_page, tile
from imgclf.evaluation.page import write_report as write_page
from imgclf.runs import RunDir
from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.figures import STYLE, boxes_thumb, pr_curves_png
from imgclf.tasks.detect.metrics import confusion, worst_images
from imgclf.tasks.detect.predictor import DetPredictor

HEADLINE = (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map75", "mAP@.75"), ("ar100", "AR@100"),
            ("map_small", "AP small"), ("map_medium", "AP medium"), ("map_large", "AP large"))
LEGEND = (("found", "true box, found"), ("missed", "true box, missed"), ("correct", "prediction, right class"),
          ("wrong_class", "prediction, wrong class"), ("false_positive", "prediction, nothing there"))
CSS = (".legend span{display:inline-block;margin-right:14px;font-size:13px}"
       ".legend i{display:inline-block;width:18px;height:11px;margin-right:5px;vertical-align:middle}"
       "table.cm td.n{min-width:44px}table.cm td.diag{font-weight:600;background:#e8f1fb}")


def metrics_html(m: dict, thresholds: dict[str, float]) -> str:
    cards = "".join(f'<div class="card"><div class="v">{num(m.get(k))}</div><div class="k">{t}</div></div>'
                    for k, t in HEADLINE)
    rows = "".join(f"<tr><td>{esc(c)}</td><td class=n>{num(m['ap_per_class'][c])}</td>"
                   f"<td class=n>{num(m['ap50_per_class'][c])}</td><td class=n>{num(thresholds.get(c))}</td>"
                   f"<td class=n>{num(m.get('f1', {}).get(c))}</td></tr>" for c in m["ap_per_class"])
    return (f'<div class="cards">{cards}</div><table><tr><th>class</th><th class=n>AP@[.5:.95]</th>'
            f"<th class=n>AP@.5</th><th class=n>threshold</th><th class=n>F1 here</th></tr>{rows}</table>")


def pr_html(m: dict) -> str:
    png = pr_curves_png(m.get("pr_curves", {}), m["ap50_per_class"], m.get("thresholds_in_use", {}))
    return (img_tag(png, "precision-recall curves per class", cls="fig pr-curves")
            + '<p class="sub">The COCO evaluator\'s interpolated precision at IoU 0.5 over its 101 recall points '
              "(at most 100 detections an image); the dot is where the stored threshold puts each class.</p>")


def confusion_html(m: dict) -> str:
    c = m["confusion"]
    labels, cm = c["labels"], np.asarray(c["matrix"])
    head = "".join(f"<th class=n>{esc(x)}</th>" for x in labels)
    rows = "".join(f"<tr><th>{esc(labels[i])}</th>" + "".join(
        f'<td class="n{" diag" if i == j and i < len(labels) - 1 else ""}">{int(v)}</td>' for j, v in enumerate(row))
        + "</tr>" for i, row in enumerate(cm))
    return (f'<p>Boxes at or above their class\'s stored threshold, matched to the truth at IoU &ge; {c["iou"]:g} '
            "greedily by score: first to a true box of the same class, then to one of any class (a wrong class). "
            f"Row <b>{esc(labels[-1])}</b>: detections with no true box (false positives); column "
            f"<b>{esc(labels[-1])}</b>: true boxes no detection found (missed).</p>"
            f'<div class="row">{img_tag(confusion_png(cm, labels, normalize=False, unit="boxes"), "confusion matrix")}'
            f'<table class="cm" id="confusion-table"><tr><th>truth \\ predicted</th>{head}</tr>{rows}</table></div>')


def legend_html() -> str:
    items = "".join(f'<span><i style="border:2px {STYLE[k][1]} {STYLE[k][0]}"></i>{esc(t)}</span>'
                    for k, t in LEGEND)
    return f'<div class="legend">{items}</div>'


def _thumb_boxes(ds: DetDataset, i: int, p: dict) -> tuple[list, list]:
    im = ds.images[i]
    truth = [(b, "found" if f else "missed") for b, f in zip(im.boxes.tolist(), p["found"].tolist())]
    kinds = ["false_positive" if g < 0 else "correct" if im.labels[g] == c else "wrong_class"
             for g, c in zip(p["match"].tolist(), p["labels"].tolist())]
    return truth, list(zip(np.asarray(p["boxes"]).reshape(-1, 4).tolist(), kinds))


def gallery_html(ds: DetDataset, per_image: list[dict]) -> str:
    worst = worst_images(per_image)
    if not worst:
        return '<p class="note">No image has a missed object, a false positive or a wrong class at the thresholds.</p>'
    tiles = []
    for i in worst:
        im, p = ds.images[i], per_image[i]
        truth, preds = _thumb_boxes(ds, i, p)
        try:
            thumb = boxes_thumb(im.path, (im.width, im.height), truth, preds)
        except BadImage:
            thumb = None
        wrong = [f"{ds.classes[im.labels[g]]} as {ds.classes[c]}" for g, c in zip(p["match"].tolist(),
                 p["labels"].tolist()) if g >= 0 and im.labels[g] != c]
        lines = [f"<b>{p['missed']}</b> missed of {len(im.boxes)}, <b>{p['false_positives']}</b> false positive(s), "
                 f"<b>{p['wrong_class']}</b> wrong class"] + ([esc(", ".join(wrong[:4]))] if wrong else [])
        tiles.append(tile(thumb, lines, str(im.path), wide=True))
    return (f"<p>The {len(worst)} image(s) with the most errors at the stored thresholds.</p>{legend_html()}"
            f'<div class="gallery" id="worst-gallery">{"".join(tiles)}</div>')


def write_report(run: RunDir, pred: DetPredictor, ds: DetDataset, preds: list[dict], m: dict, split: str,
                 per_image: list[dict] | None = None) -> Path:
    """RUN/report/index.html and eval.json for a detection evaluation.
    per_image: metrics.confusion's matches (computed here when not given)."""
    if per_image is None:
        per_image = confusion(ds, preds, [m["thresholds_in_use"][c] for c in ds.classes])[1]
    sections = [("metrics", "Metrics", metrics_html(m, m.get("thresholds_in_use", {}))),
                ("pr-curves", "Precision-recall", pr_html(m))]
    if "confusion" in m:
        sections.append(("confusion", "Confusion matrix", confusion_html(m)))
    sections.append(("worst", "Worst images", gallery_html(ds, per_image)))
    page = render_page(f"Detection report: {run.path.name}", [f"{len(ds.images)} {split} images, "
                       f"{len(ds.classes)} classes, {esc(pred.arch)}"], sections, css=CSS)
    return write_page(run, page, m)
