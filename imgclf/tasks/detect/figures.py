"""The detection report's pictures: precision-recall curves per class (a
matplotlib figure drawn through evaluation/figures.py's setup, where labels
are never read as math text) and thumbnails with true and predicted boxes
drawn (PIL), both as bytes for the self-contained page."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imgclf.data.images import open_image
from imgclf.evaluation.figures import GREY, _plt, _png, _short

# Box styles in the gallery: true boxes dashed, predictions solid; the
# report's legend (report.py) shows the same colours.
STYLE = {"found": ("#1a7f37", "dashed"), "missed": ("#d62728", "dashed"), "correct": ("#1f77b4", "solid"),
         "wrong_class": ("#ff7f0e", "solid"), "false_positive": ("#7b2cbf", "solid")}
GALLERY_PX = 312  # a wide gallery tile's picture, longer side


def operating_point(curve: dict, threshold: float) -> tuple[float, float] | None:
    """(recall, precision) on the curve where detections reach `threshold`:
    the last recall point whose score is at or above it."""
    score = np.asarray(curve["score"])
    at = np.flatnonzero((score >= threshold) & (score > 0))
    return (curve["recall"][at[-1]], curve["precision"][at[-1]]) if len(at) else None


def pr_curves_png(curves: dict[str, dict], ap50: dict[str, float], thresholds: dict[str, float]) -> bytes:
    """Precision-recall per class at IoU 0.5 (the COCO evaluator's curves),
    each with a dot at its stored score threshold."""
    plt = _plt()
    many = len(curves) > 10
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    cmap = plt.get_cmap("tab10")
    for k, (name, c) in enumerate(curves.items()):
        colour = cmap(k % 10)
        ax.plot(c["recall"], c["precision"], color=colour, lw=0.8 if many else 1.8,
                label=None if many else f"{_short(name)}  {ap50.get(name, 0.0):.3f}")
        pt = operating_point(c, thresholds.get(name, 1.0))
        if pt is not None:
            ax.plot(*pt, "o", color=colour, ms=6, mec="white")
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
           title="Precision-recall per class at IoU 0.5 (dot: stored threshold)")
    if not curves:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", color=GREY)
    elif not many:
        ax.legend(fontsize=8, frameon=False, loc="lower left", title="class  AP@.5")
    return _png(fig)


def _dashed(draw: ImageDraw.ImageDraw, box: list[float], colour: str, width: int, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    for (a, b), (c, d) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        n = max(1, int(np.hypot(c - a, d - b) // dash))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            draw.line([(a + (c - a) * t0, b + (d - b) * t0), (a + (c - a) * t1, b + (d - b) * t1)], colour, width)


def boxes_thumb(path: str | Path, size: tuple[int, int], truth: list[tuple[list[float], str]],
                preds: list[tuple[list[float], str]], px: int = GALLERY_PX) -> bytes:
    """A JPEG thumbnail of the image (longer side `px`) with boxes drawn:
    truth and preds are (box xyxy in the image's pixels, STYLE key)."""
    img = open_image(path, draft_size=px)
    img.thumbnail((px, px), Image.Resampling.BILINEAR)
    s = img.width / max(1, size[0])
    draw = ImageDraw.Draw(img)
    for boxes, dashed in ((truth, True), (preds, False)):
        for box, kind in boxes:
            b = [v * s for v in box]
            colour = STYLE[kind][0]
            if dashed:
                _dashed(draw, b, colour, 2)
            else:
                draw.rectangle(b, outline=colour, width=2)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()
