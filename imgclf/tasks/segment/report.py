"""The segmentation report page on the shared shell (imgclf.evaluation.page):
the headline numbers, the IoU per class with each class's pixel share, the
confusion matrix (rows: truth, as shares of the row), and the worst images
by mIoU with the prediction and the truth overlaid side by side.
Self-contained: every picture is inline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from imgclf.data.images import open_image
from imgclf.evaluation.page import esc, img_tag, num, pct, render_page, write_report
from imgclf.runs import RunDir
from imgclf.tasks.segment.data import SegDataset, load_mask
from imgclf.tasks.segment.predictor import SegPredictor, overlay, palette, resize_mask

WORST = 8  # images in the gallery
WIDTH = 320  # their width, pixels


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _iou_table(m: dict) -> str:
    cm = np.asarray(m["confusion_matrix"], np.float64)
    share = cm.sum(1) / max(1.0, cm.sum())
    cols = palette(len(m["iou_per_class"]))
    rows = "".join(
        f'<tr><td><span style="display:inline-block;width:12px;height:12px;background:rgb{tuple(int(v) for v in c)}">'
        f'</span> {esc(name)}</td><td class="n bar" style="--w:{100 * (v or 0):.0f}%">{num(v)}</td>'
        f'<td class="n">{pct(s, 2)}</td></tr>'
        for (name, v), s, c in zip(m["iou_per_class"].items(), share, cols))
    return f'<table id="iou"><tr><th>class</th><th class="n">IoU</th><th class="n">pixels</th></tr>{rows}</table>'


def _confusion(m: dict) -> str:
    names = list(m["iou_per_class"])
    cm = np.asarray(m["confusion_matrix"], np.float64)
    rs = cm / np.maximum(1.0, cm.sum(1, keepdims=True))
    head = "".join(f'<th class="n">{esc(n[:6])}</th>' for n in names)
    body = "".join(f"<tr><th>{esc(n)}</th>" + "".join(f'<td class="n">{100 * v:.0f}</td>' for v in r) + "</tr>"
                   for n, r in zip(names, rs))
    return f'<div class="scroll"><table><tr><th>truth \\ predicted (% of row)</th>{head}</tr>{body}</table></div>'


def _gallery(pred: SegPredictor, ds: SegDataset, worst: list[tuple[float, int]]) -> str:
    k, tiles = len(ds.classes), []
    for miou, i in worst[:WORST]:
        it = ds.items[i]
        img = open_image(it.image)
        truth = load_mask(ds, it)
        p = pred.predict(str(it.image))[0]["mask"]
        h = round(img.height * WIDTH / img.width)
        small = img.resize((WIDTH, h))
        pics = [overlay(small, resize_mask(x, (WIDTH, h)), k) for x in (p, truth)]
        both = img_tag(_jpeg(pics[0]), "prediction", "", "image/jpeg") + img_tag(_jpeg(pics[1]), "truth", "", "image/jpeg")
        tiles.append(f'<div class="tile" style="width:{2 * WIDTH + 20}px"><div class="row">{both}</div>'
                     f'<div>mIoU {num(miou)} (left: prediction, right: truth)</div><div class="p">{esc(it.image)}</div></div>')
    return f'<div class="gallery">{"".join(tiles)}</div>'


def write_seg_report(run: RunDir, pred: SegPredictor, ds: SegDataset, m: dict, split: str) -> Path:
    cards = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>' for k, v in (
        ("mIoU", num(m["miou"])), ("pixel accuracy", pct(m["pixel_accuracy"])),
        ("mean class accuracy", pct(m["mean_class_accuracy"])), ("images", m["n"])))
    sections = [("summary", "Summary", f'<div class="cards">{cards}</div><p class="note">Void pixels (value '
                 f'{ds.ignore_index}) are not scored. IoU per class is over every pixel of the split.</p>'),
                ("iou", "IoU per class", _iou_table(m)),
                ("confusion", "Confusion matrix", _confusion(m)),
                ("worst", "Worst images", _gallery(pred, ds, m.get("per_image_miou", [])))]
    page = render_page(f"Segmentation report: {run.path.name}", [esc(f"split {split}"), esc(str(ds.root))], sections)
    return write_report(run, page, {k: v for k, v in m.items() if k != "per_image_miou"})
