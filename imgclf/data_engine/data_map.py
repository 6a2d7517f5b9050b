"""A map of the data for the report: the backbone's embeddings of training
and evaluated images projected to 2-D with t-SNE (scikit-learn), coloured by
class, with misclassified images and label-noise suspects marked. Hovering
over a point shows its thumbnail (a small inline SVG and script; no CDN).

Points are capped at MAP_POINTS: every misclassified image and suspect, then
a seeded random sample of the rest. t-SNE (scikit-learn, installed with the
train extra; umap-learn would add numba) runs after a PCA to 50 dimensions;
its time and the page weight it adds are in docs/benchmarks.md ("Report: the
data map", bench/bench_map.py).
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

from imgclf.data.images import thumbnail

MAP_POINTS = 1000  # most points drawn (each carries a thumbnail of about 2 KB)
MAP_THUMB = 64  # thumbnail size on hover, pixels (long side)
SIZE = 640  # the plot's side, CSS pixels
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def script_json(obj) -> str:
    """JSON to put inside a <script> element of a page: "<", ">" and "&" as
    \\u003c, \\u003e and \\u0026 (still the same JSON), so no value (a class
    named "<!--<script>", a path holding "</script>") can end the element or
    put the HTML parser into its escaped-script states."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def map_section(clf, sc, suspects: dict | str | None, workers: int, bad) -> dict | str:
    """The report's data map of an evaluated split (evaluation/evaluate.py's
    Scored `sc`): points (capped), their features through the cache, t-SNE,
    thumbnails. A reason instead when there is too little to draw."""
    t0 = time.time()
    sus = {r["path"] for r in suspects["suspects"]} if isinstance(suspects, dict) else set()
    pred = sc.probs.argmax(1)
    eval_items = [(p, int(y), int(q)) for p, y, q in zip(sc.paths, sc.labels, pred)]
    train = sc.splits.train if sc.name != "train" else []
    points = choose_points(eval_items, train, sus)
    if len(points) < 3:
        return "Too few images for a map."
    feats, _, kept = clf.features_items(sc.splits.root, [(pt["path"], pt["true"]) for pt in points], workers=workers,
                                        bad=bad, progress=False)
    points = [points[int(k)] for k in kept]
    xy = project(feats["plain"])
    root = Path(sc.splits.root)
    thumbs = {}
    for pt in points:
        t = thumbnail(root / pt["path"], MAP_THUMB)
        thumbs[pt["path"]] = "data:image/jpeg;base64," + base64.b64encode(t).decode() if t else None
    return {"html": render_map(points, xy, clf.classes, thumbs), "points": len(points),
            "of": len(eval_items) + len(train), "wrong": sum(pt["wrong"] for pt in points),
            "suspects": sum(pt["suspect"] for pt in points), "seconds": round(time.time() - t0, 2)}


def choose_points(eval_items: list[tuple[str, int, int]], train_items: list[tuple[str, int]],
                  suspects: set[str], limit: int = MAP_POINTS, seed: int = 0) -> list[dict]:
    """eval_items: (path, true, predicted); train_items: (path, label). The
    points to draw: all mistakes and suspects, then a random sample of the rest."""
    pts = [{"path": p, "true": y, "pred": q, "split": "eval"} for p, y, q in eval_items]
    seen = {p for p, _, _ in eval_items}
    pts += [{"path": p, "true": y, "pred": None, "split": "train"} for p, y in train_items if p not in seen]
    for pt in pts:
        pt["wrong"] = pt["pred"] is not None and pt["pred"] != pt["true"]
        pt["suspect"] = pt["split"] == "train" and pt["path"] in suspects
    must = [k for k, pt in enumerate(pts) if pt["wrong"] or pt["suspect"]]
    rest = [k for k, pt in enumerate(pts) if not (pt["wrong"] or pt["suspect"])]
    rng = np.random.default_rng(seed)
    take = max(0, limit - len(must))
    if len(rest) > take:
        rest = sorted(rng.choice(rest, size=take, replace=False).tolist())
    return [pts[k] for k in sorted(must[:limit] + rest)]


def project(features: np.ndarray, seed: int = 0, threads: int = 1) -> np.ndarray:
    """t-SNE to 2-D, scaled into [0, 1]. PCA to 50 dimensions first (the usual
    practice: faster, and the neighbourhoods t-SNE keeps survive it)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, np.float32)
    n = len(x)
    if n < 3:
        return np.full((n, 2), 0.5)
    # One thread: on a busy 2-core machine OpenMP's second thread mostly waits,
    # and the two together were several times slower than one (bench/bench_map.py).
    with threadpool_limits(threads):
        if x.shape[1] > 50 and n > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500).fit_transform(x)
    y = y - y.min(0)
    return y / np.maximum(y.max(0), 1e-9)


def render_map(points: list[dict], xy: np.ndarray, classes: list[str], thumbs: dict[str, str | None]) -> str:
    """The map as HTML: an SVG of one circle per point (a ring: misclassified;
    a square: label-noise suspect), a legend, and a hover card with the
    point's thumbnail (thumbs: path -> data URI)."""
    e = html.escape
    pad, s = 12, SIZE - 24
    shapes, data = [], []
    for k, (pt, (x, y)) in enumerate(zip(points, xy)):
        cx, cy, col = pad + s * x, pad + s * (1 - y), PALETTE[pt["true"] % len(PALETTE)]
        cls = "pt" + (" wrong" if pt["wrong"] else "") + (" suspect" if pt["suspect"] else "")
        if pt["suspect"]:
            shapes.append(f'<rect class="{cls}" data-i="{k}" x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" '
                          f'fill="{col}"/>')
        else:
            shapes.append(f'<circle class="{cls}" data-i="{k}" cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if pt["wrong"] else 4}" '
                          f'fill="{col}"/>')
        data.append([pt["path"], classes[pt["true"]], classes[pt["pred"]] if pt["pred"] is not None else None,
                     pt["split"], thumbs.get(pt["path"])])
    # Marked points last, so they are drawn on top.
    shapes.sort(key=lambda t: ("wrong" in t) or ("suspect" in t))
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{e(c)}</span>'
                     for i, c in enumerate(classes))
    legend += ('<span class="key"><svg width="16" height="16"><circle cx="8" cy="8" r="6" fill="#fff" stroke="#000" '
               'stroke-width="2"/></svg>misclassified</span><span class="key"><svg width="14" height="14"><rect x="2" '
               'y="2" width="10" height="10" fill="#fff" stroke="#000" stroke-width="1.5"/></svg>label-noise suspect</span>')
    blob = script_json(data)
    return (f'<style>{MAP_CSS}</style><div class="map-wrap"><svg id="data-map" viewBox="0 0 {SIZE} {SIZE}" width="{SIZE}" height="{SIZE}" '
            f'role="img" aria-label="2-D map of the images">{"".join(shapes)}</svg>'
            f'<div id="map-card" hidden><img alt="" width="{MAP_THUMB}"><div class="c"></div></div></div>'
            f'<div class="legend">{legend}</div><script type="application/json" id="map-data">{blob}</script>'
            f"<script>{MAP_JS}</script>")


MAP_CSS = """
.map-wrap{position:relative;display:inline-block;border:1px solid #eceef1}
#data-map .pt{stroke:#fff;stroke-width:.8;cursor:pointer}#data-map .pt.wrong{stroke:#000;stroke-width:2}
#data-map .suspect{stroke:#000;stroke-width:1.5}#data-map .pt:hover{stroke:#000;stroke-width:3}
#map-card{position:absolute;pointer-events:none;background:#fff;border:1px solid #9aa4ae;border-radius:6px;
 padding:6px;font-size:12px;max-width:220px;box-shadow:0 2px 8px rgba(0,0,0,.15);z-index:3}
#map-card img{display:block;width:auto;max-width:100%;height:auto;margin-bottom:4px}#map-card .c{word-break:break-all}
.legend{margin:6px 0;font-size:13px}.legend .key{margin-right:14px;white-space:nowrap;display:inline-flex;align-items:center;gap:4px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:50%}
"""

# Hover: fill the card from the JSON block (path, true, predicted, split, thumbnail) and place it by the point.
MAP_JS = """(function(){var d=JSON.parse(document.getElementById('map-data').textContent),
svg=document.getElementById('data-map'),card=document.getElementById('map-card'),img=card.querySelector('img'),
c=card.querySelector('.c');function esc(s){return String(s).replace(/[&<>"]/g,function(x){return '&#'+x.charCodeAt(0)+';'})}
svg.addEventListener('mouseover',function(ev){var i=ev.target.getAttribute('data-i');if(i===null)return;var r=d[+i];
if(r[4]){img.src=r[4];img.hidden=false}else{img.hidden=true}
c.innerHTML='<b>'+esc(r[1])+'</b>'+(r[2]===null?' (training image)':r[2]===r[1]?' predicted correctly':
' predicted <b style="color:#b3261e">'+esc(r[2])+'</b>')+'<br>'+esc(r[0]);
var b=ev.target.getBoundingClientRect(),w=svg.getBoundingClientRect();card.hidden=false;
card.style.left=Math.min(b.left-w.left+12,w.width-230)+'px';card.style.top=(b.top-w.top+12)+'px'});
svg.addEventListener('mouseout',function(ev){if(ev.target.getAttribute('data-i')!==null)card.hidden=true})})();"""
