"""RUN/report/index.html: one self-contained page that answers "how good is
it, where does it fail, and can I trust its probabilities?".

Everything is inline (figures as base64 PNG, thumbnails as base64 JPEG, CSS in
a <style> block, the data map's few lines of script in a <script> block, no
CDN), so the page opens offline and from a copied folder. RUN/report/eval.json holds the same numbers for machines.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.data.images import thumbnail
from imgclf.evaluation.figures import confusion_png, curves_png, reliability_png, roc_pr_png
from imgclf.evaluation.gradcam import gradcam_images
from imgclf.evaluation.metrics import most_confused_pairs, roc_pr_curves
from imgclf.io import atomic_write_text, write_json


@dataclass
class Page:
    """Everything the page's sections read (and eval.json records)."""

    metrics: dict
    meta: dict  # run, model, data, strategy, created, version
    calibration: dict | None
    tta: dict | None
    curves: dict
    pairs: list[dict]
    errors: dict
    figs: dict[str, bytes]
    thumbs: dict[str, bytes | None] = field(default_factory=dict)
    gradcam: list[dict] | str | None = None
    suspects: dict | str | None = None
    unknown: dict | None = None  # evaluate --unknown DIR: the open-set section
    data_map: dict | str | None = None  # data_engine/data_map.py: {"html", "points", ...}, or why not


GALLERY = 16  # most confident mistakes shown
CLOSE_CALLS = 8  # least confident correct predictions shown
GRADCAM_EACH = 4  # Grad-CAM: this many correct and this many wrong
THUMB = 150  # thumbnail size, pixels (long side)


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _img(data: bytes, alt: str, cls: str = "fig", mime: str = "image/png") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{_b64(data, mime)}">'


def _jpeg(img, quality: int = 82) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _e(s) -> str:
    return html.escape(str(s))


# ------------------------------------------------------------------ data

def error_cases(probs: np.ndarray, labels: np.ndarray, paths: list[str], classes: list[str]) -> dict:
    """The most confident mistakes and the closest correct calls."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
    right = np.flatnonzero(pred == labels)
    right = right[np.argsort(conf[right], kind="stable")]

    def row(i):
        return {"path": paths[i], "true": classes[labels[i]], "predicted": classes[pred[i]], "pred_idx": int(pred[i]),
                "probability": float(conf[i]), "p_true": float(probs[i, labels[i]])}

    return {"mistakes": [row(i) for i in wrong[:GALLERY]], "n_mistakes": int(len(wrong)),
            "close_calls": [row(i) for i in right[:CLOSE_CALLS]]}


def gradcam_samples(probs: np.ndarray, labels: np.ndarray, paths: list[str], classes: list[str],
                    seed: int = 0) -> list[dict]:
    """GRADCAM_EACH wrong (the most confident mistakes) and GRADCAM_EACH correct
    (random, spread over the classes) predictions."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = list(wrong[np.argsort(-conf[wrong], kind="stable")][:GRADCAM_EACH])
    rng = np.random.default_rng(seed)
    right = []
    by_class = [list(rng.permutation(np.flatnonzero((pred == labels) & (labels == c)))) for c in range(len(classes))]
    for c in rng.permutation(len(classes)).tolist() * GRADCAM_EACH:  # round-robin over classes
        if len(right) >= GRADCAM_EACH:
            break
        if by_class[c]:
            right.append(by_class[c].pop())
    return [{"path": paths[i], "true": classes[labels[i]], "predicted": classes[pred[i]], "pred_idx": int(pred[i]),
             "probability": float(conf[i]), "correct": bool(pred[i] == labels[i])} for i in right + wrong]


# ------------------------------------------------------------------ page

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:34px 0 10px;padding-top:10px;border-top:1px solid #e3e6ea}
h3{font-size:16px;margin:18px 0 8px}
.sub{color:#59636e;margin:0 0 12px}
nav{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #e3e6ea;z-index:2;font-size:14px}
nav a{margin-right:14px;color:#0b61c4;text-decoration:none}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #e3e6ea;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:26px;font-weight:600}.card .k{color:#59636e;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.bar{background-repeat:no-repeat;background-size:var(--w) 70%;background-position:left center;
 background-image:linear-gradient(#cfe3fb,#cfe3fb)}
tr.low td{background-color:#fff4f2}
.scroll{max-height:560px;overflow:auto;display:inline-block;border:1px solid #eceef1}
.fig{max-width:100%;height:auto;border:1px solid #eceef1;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.tile{width:164px;border:1px solid #e3e6ea;border-radius:6px;padding:6px;font-size:12.5px;background:#fff}
.tile.wide{width:326px}
.tile img{display:block;max-width:100%;margin:0 auto 4px;border-radius:3px}
.tile .p{color:#59636e;word-break:break-all;font-size:11px}
.bad{color:#b3261e;font-weight:600}.good{color:#1a7f37;font-weight:600}
.note{background:#f3f5f7;border-left:3px solid #9aa4ae;padding:6px 12px;margin:8px 0;font-size:14px}
ul.glance{margin:6px 0 0 0;padding-left:20px}
tr.hl td{font-weight:600;background:#fff7e0}
"""


def _tile(thumb: bytes | None, lines: list[str], path: str, wide: bool = False) -> str:
    img = _img(thumb, path, cls="", mime="image/jpeg") if thumb else '<div class="p">(unreadable)</div>'
    return (f'<div class="tile{" wide" if wide else ""}">{img}' + "".join(f"<div>{ln}</div>" for ln in lines)
            + f'<div class="p" title="{_e(path)}">{_e(path)}</div></div>')


def _summary(m: dict, meta: dict) -> str:
    cards = [("accuracy", _pct(m["accuracy"])), ("balanced accuracy", _pct(m["balanced_accuracy"])),
             ("macro F1", _f(m["macro"]["f1"])), ("images", f"{m['n']:,}")]
    if "top5_accuracy" in m:
        cards.insert(2, ("top-5 accuracy", _pct(m["top5_accuracy"])))
    if m.get("ece") is not None:
        cards.append(("calibration error (ECE)", _pct(m["ece"])))
    out = ['<div class="cards">'] + [f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>'
                                     for k, v in cards] + ["</div>"]
    rows = [("model", meta["model"]), ("strategy", meta.get("strategy") or "n/a"), ("data", meta["data"]),
            ("split", f"{m['split']} ({m['n']:,} images{', ' + str(m['skipped']) + ' unreadable skipped' if m.get('skipped') else ''})"),
            ("test-time augmentation", m.get("tta") or "none"), ("temperature", _f(m.get("temperature"), 3)),
            ("log loss", _f(m.get("log_loss"), 4))]
    out.append('<table><tr><th></th><th class="n">precision</th><th class="n">recall</th><th class="n">F1</th></tr>')
    for avg in ("macro", "weighted"):
        a = m[avg]
        out.append(f'<tr><td>{avg} average</td><td class="n">{_f(a["precision"])}</td><td class="n">{_f(a["recall"])}</td>'
                   f'<td class="n">{_f(a["f1"])}</td></tr>')
    out.append("</table><table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>")
    return "".join(out)


def _glance(m: dict, cal: dict | None, errors: dict, suspects: dict | None) -> str:
    """Three plain sentences: how good, where it fails, can the probabilities be trusted."""
    pcs = m["per_class"]
    worst = min(pcs, key=lambda c: (pcs[c]["f1"], c))
    items = [f"<b>How good:</b> {_pct(m['accuracy'])} of {m['n']:,} {_e(m['split'])} images right "
             f"(balanced accuracy {_pct(m['balanced_accuracy'])}, macro F1 {_f(m['macro']['f1'])})."]
    cw = pcs[worst].get("confused_with")
    items.append(f"<b>Where it fails:</b> weakest class <b>{_e(worst)}</b> (F1 {_f(pcs[worst]['f1'])}, recall "
                 f"{_f(pcs[worst]['recall'])})" + (f", most often taken for <b>{_e(cw)}</b>" if cw else "")
                 + f"; {errors['n_mistakes']} mistakes in all.")
    if cal:
        items.append(f"<b>Probabilities:</b> expected calibration error {_pct(cal['ece_before'], 2)} at T = 1, "
                     f"{_pct(cal['ece_after'], 2)} with the temperature fitted in training (T = {cal['temperature']:.2f}, "
                     f"stored in the run, so <code>predict</code> returns calibrated probabilities).")
    elif m.get("ece") is not None:
        items.append(f"<b>Probabilities:</b> expected calibration error {_pct(m['ece'], 2)} (T = {_f(m.get('temperature'), 2)}).")
    if suspects and suspects.get("suspects"):
        items.append(f"<b>Labels:</b> {suspects['below_threshold']} training image(s) look mislabelled; see "
                     f'<a href="#suspects">label-noise suspects</a>.')
    return '<ul class="glance">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _per_class(m: dict, curves: dict) -> str:
    classes = m["classes"]
    pcs = m["per_class"]
    cm = np.asarray(m["confusion_matrix"])
    order = list(classes)
    many = len(classes) > 10
    if many:  # the classes that need attention first
        order.sort(key=lambda c: (pcs[c]["f1"], c))
    auc = {c: v["roc_auc"] for c, v in curves.get("per_class", {}).items()}
    show_auc = bool(auc) and not curves.get("positive")
    head = ('<tr><th>class</th><th class="n">precision</th><th class="n">recall</th><th class="n">F1</th>'
            '<th class="n">support</th>' + ('<th class="n">ROC AUC</th>' if show_auc else "") +
            "<th>most confused with</th></tr>")
    rows = []
    for c in order:
        p = pcs[c]
        i = classes.index(c)
        cw = p.get("confused_with")
        cwtxt = f"{_e(cw)} ({int(cm[i, classes.index(cw)])} of {p['support']})" if cw else "&mdash;"
        low = p["f1"] < m["macro"]["f1"] - 0.1
        cells = "".join(f'<td class="n bar" style="--w:{100 * p[k]:.0f}%">{_f(p[k])}</td>' for k in ("precision", "recall", "f1"))
        rows.append(f'<tr class="{"low" if low else ""}"><td>{_e(c)}</td>{cells}<td class="n">{p["support"]}</td>'
                    + (f'<td class="n">{_f(auc.get(c))}</td>' if show_auc else "") + f"<td>{cwtxt}</td></tr>")
    note = '<p class="sub">Sorted by F1, weakest first. Shaded rows: F1 more than 0.1 below the macro average.</p>' if many else ""
    return note + f'<div class="scroll"><table id="per-class-table">{head}{"".join(rows)}</table></div>'


def _pairs(pairs: list[dict]) -> str:
    if not pairs:
        return "<p>No confusions: every image was classified correctly.</p>"
    rows = "".join(f'<tr><td>{_e(p["true"])}</td><td>{_e(p["predicted"])}</td><td class="n">{p["count"]}</td>'
                   f'<td class="n">{_pct(p["rate"])}</td></tr>' for p in pairs)
    return ('<table id="confused-pairs"><tr><th>true class</th><th>predicted as</th><th class="n">images</th>'
            f'<th class="n">share of the true class</th></tr>{rows}</table>')


def _tta(tta: dict | None) -> str:
    if not tta:
        return ("<p>Not used. <code>imgclf evaluate RUN --tta flip</code> averages each prediction with that of the "
                "mirrored image and shows the difference here.</p>")
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{_pct(v["accuracy"], 2)}</td><td class="n">{_pct(v["balanced_accuracy"], 2)}</td>'
                   f'<td class="n">{_f(v["macro_f1"])}</td><td class="n">{_f(v["log_loss"], 4)}</td><td class="n">{_pct(v["ece"], 2)}</td></tr>'
                   for k, v in (("without TTA", tta["plain"]), ("flip TTA (reported above)", tta["flip"])))
    return ('<table id="tta-table"><tr><th></th><th class="n">accuracy</th><th class="n">balanced acc.</th><th class="n">macro F1</th>'
            f'<th class="n">log loss</th><th class="n">ECE</th></tr>{rows}</table>'
            f'<p>Flip TTA changed {tta["changed"]} prediction(s): {tta["fixed"]} fixed, {tta["broken"]} broken. '
            "It costs one extra backbone pass per image.</p>")


def _calibration(cal: dict | None, m: dict, rel_png: bytes | None) -> str:
    if not cal or cal["temperature"] == 1.0:
        out = '<p class="note">Temperature scaling: not fitted (T = 1); the validation split was too small.</p>'
    else:
        out = (f"<p>One temperature T divides the logits before the softmax; <code>imgclf train</code> fits it on "
               f"the validation split by minimising the log loss, and it never changes which class wins. "
               f"<b>T = {cal['temperature']:.3f}</b> is stored in <code>model.pt</code>: <code>imgclf predict</code>, "
               f"<code>imgclf.load()</code>, the server and the exports return calibrated probabilities. "
               f"{'T &gt; 1: the model was over-confident.' if cal['temperature'] > 1.05 else 'T &lt; 1: the model was under-confident (usual after training with label smoothing).' if cal['temperature'] < 0.95 else 'T is close to 1: the model was already well calibrated.'}</p>"
               f'<table id="calibration-table"><tr><th>on the {_e(m["split"])} split</th><th class="n">ECE</th><th class="n">log loss</th></tr>'
               f'<tr><td>before (T = 1)</td><td class="n">{_pct(cal["ece_before"], 2)}</td><td class="n">{_f(cal["nll_before"], 4)}</td></tr>'
               f'<tr><td>after (T = {cal["temperature"]:.3f})</td><td class="n">{_pct(cal["ece_after"], 2)}</td><td class="n">{_f(cal["nll_after"], 4)}</td></tr></table>')
        if cal.get("cross_fitted"):
            out += ('<p class="note">This is the split T was fitted on. To keep "after" honest, each image here is scored with a T fitted on the other four fifths '
                    "of the split (5-fold cross-fitting); the stored T uses all of it.</p>")
    out += ("<p>ECE: the images are binned by the model's confidence (its top probability); in each bin, the gap "
            "between confidence and actual accuracy, averaged with the bins' sizes as weights. 0 is perfect.</p>")
    if rel_png:
        out += _img(rel_png, "reliability diagram")
    return out


def render_html(page: Page) -> str:
    m, meta = page.metrics, page.meta
    title = f"imgclf report: {Path(meta['run']).name}"
    sections = [
        ("summary", "Summary", _glance(m, page.calibration, page.errors, page.suspects) + _summary(m, meta)),
        ("per-class", "Per class", _per_class(m, page.curves)),
        ("confusion", "Confusion matrix",
         '<p class="sub">Rows: true class; columns: predicted class.</p><div class="row">'
         + _img(page.figs["cm_counts"], "confusion matrix (counts)", cls="fig cm")
         + _img(page.figs["cm_norm"], "confusion matrix (row-normalised)", cls="fig cm") + "</div>"
         + "<h3>Most confused pairs</h3>" + _pairs(page.pairs)),
        ("training", "Training curves",
         _img(page.figs["curves"], "training curves") if page.figs.get("curves")
         else '<p class="note">No history.csv in this run.</p>'),
        ("roc", "ROC and precision-recall",
         _img(page.figs["roc_pr"], "ROC and precision-recall curves") if page.figs.get("roc_pr")
         else '<p class="note">Needs at least one class both present and absent in this split.</p>'),
        ("calibration", "Calibration", _calibration(page.calibration, m, page.figs.get("reliability"))),
        ("tta", "Test-time augmentation", _tta(page.tta)),
        ("gallery", "Error gallery", _gallery(page)),
        ("gradcam", "Grad-CAM", _gradcam_html(page)),
        ("suspects", "Label-noise suspects", _suspects_html(page)),
        ("unknown", "Unknown inputs", _unknown_html(page)),
        ("map", "Data map", _map_html(page)),
    ]
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{_e(t)}</h2>{c}</section>' for k, t, c in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_e(title)}</title><style>{CSS}</style></head><body><main>'
            f'<h1>{_e(title)}</h1><p class="sub">{_e(meta["model"])} &middot; {_e(m["split"])} split of {_e(meta["data"])} '
            f'&middot; {_e(meta["created"])} &middot; run <code>{_e(meta["run"])}</code></p><nav>{nav}</nav>{body}'
            f'<p class="sub" style="margin-top:40px">Written by imgclf {_e(meta["version"])}; the numbers are also in '
            f"<code>eval.json</code> next to this page.</p></main></body></html>")


def _gallery(page: Page) -> str:
    e, thumbs = page.errors, page.thumbs
    out = [f"<h3>Most confident mistakes ({min(len(e['mistakes']), GALLERY)} of {e['n_mistakes']})</h3>"]
    if e["mistakes"]:
        out.append('<div class="gallery" id="mistakes">' + "".join(
            _tile(thumbs.get(r["path"]), [f'true: <b>{_e(r["true"])}</b>',
                                          f'predicted: <span class="bad">{_e(r["predicted"])}</span> {r["probability"]:.2f}'],
                  r["path"]) for r in e["mistakes"]) + "</div>")
    else:
        out.append("<p>None: every image in this split was classified correctly.</p>")
    if e["close_calls"]:
        out.append("<h3>Closest correct calls (lowest confidence)</h3>")
        out.append('<div class="gallery" id="close-calls">' + "".join(
            _tile(thumbs.get(r["path"]), [f'true: <b>{_e(r["true"])}</b>',
                                          f'predicted: <span class="good">{_e(r["predicted"])}</span> {r["probability"]:.2f}'],
                  r["path"]) for r in e["close_calls"]) + "</div>")
    return "".join(out)


def _unknown_html(page: Page) -> str:
    u = page.unknown
    if not u:
        return ('<p class="note">Pass a folder of images from none of the classes to see how well the model '
                'answers "unknown": <code>imgclf evaluate RUN --unknown DIR</code>.</p>')
    hl = ' class="hl"'
    rows = "".join(f"<tr{hl if r['stored'] else ''}><td>{r['threshold']:.2f}</td>"
                   f"<td>{_pct(r['known_kept'])}</td><td>{_pct(r['known_correct'])}</td>"
                   f"<td>{_pct(r['unknown_rejected'])}</td></tr>" for r in u["tradeoff"])
    tiles = "".join(_tile(page.thumbs.get(d["path"]), [f"unknown {d['unknown']:.2f}"], d["path"])
                    for d in u["most_familiar_unknowns"])
    caveat = (" These known images are the validation split, which set the score's scale, so their kept share "
              "is close to the threshold by construction; a test split gives the honest figure."
              if u.get("split") == "val" else "")
    return (f'<p>{u["n_known"]} known images of this split against {u["n_unknown"]} images of '
            f'<code>{_e(u["folder"])}</code>. Score: {_e(u["method"])}. AUROC <b>{_f(u["auroc"], 4)}</b>. '
            f'Rejection is {"at " + format(u["reject"], "g") if u["reject"] is not None else "off"} in this model '
            f'(<code>--reject</code> at train, predict or serve time changes it).{_e(caveat)}</p>'
            f'<table id="unknown-tradeoff"><tr><th>threshold</th><th>known kept</th><th>known kept and correct</th>'
            f'<th>unknown rejected</th></tr>{rows}</table>'
            f'<h3>Unknown images that look most familiar</h3><div class="gallery">{tiles}</div>')


def _not_shown(section) -> str | None:
    """A note in place of a section that was skipped (None) or not possible (a reason)."""
    if isinstance(section, str):
        return f'<p class="note">{_e(section)}</p>'
    return None if section else '<p class="note">Skipped.</p>'


def _gradcam_html(page: Page) -> str:
    g = page.gradcam
    if _not_shown(g):
        return _not_shown(g)
    tiles = "".join(_tile(s["png"], [
        ('<span class="good">correct</span>' if s["correct"] else '<span class="bad">wrong</span>')
        + f': true <b>{_e(s["true"])}</b>, predicted <b>{_e(s["predicted"])}</b> {s["probability"]:.2f}'],
        s["path"], wide=True) for s in g)
    return (f'<p class="sub">Left: the image as the model sees it; right: Grad-CAM for the predicted class at layer '
            f'<code>{_e(g[0]["layer"])}</code> (red: the regions that raised that class\'s score most). '
            f"{GRADCAM_EACH} random correct and up to {GRADCAM_EACH} most confident wrong predictions.</p>"
            f'<div class="gallery" id="gradcam-gallery">{tiles}</div>')


def _suspects_html(page: Page) -> str:
    s = page.suspects
    if _not_shown(s):
        return _not_shown(s)
    intro = (f"<p>Training images whose given label is unlikely according to models that never trained on them "
             f"({_e(s['method'])}; out-of-fold accuracy {_pct(s['out_of_fold_accuracy'])} on {s['scored']:,} images). "
             f"{s['below_threshold']} image(s) get less than {s['threshold']:.0%} for their own label; the lowest are shown. "
             f"Check them and fix or remove the wrong ones, then train again.</p>")
    if not s["suspects"]:
        return intro + "<p>None found.</p>"
    tiles = "".join(_tile(page.thumbs.get(r["path"]), [
        f'given: <span class="bad">{_e(r["given"])}</span> {r["p_given"]:.2f}',
        f'looks like: <b>{_e(r["likely"])}</b> {r["p_likely"]:.2f}'], r["path"]) for r in s["suspects"])
    return intro + f'<div class="gallery" id="suspects-gallery">{tiles}</div>'


def _map_html(page: Page) -> str:
    m = page.data_map
    if _not_shown(m):
        return _not_shown(m)
    return (f"<p>Each point is an image: the backbone's pooled features of {m['points']:,} images "
            f"({m['of']:,} in the training and evaluated splits: every misclassified image and label-noise suspect, "
            f"and a random sample of the rest) placed by t-SNE, so that images the model sees as alike lie close. "
            f"Colour: the given label. A black ring: misclassified ({m['wrong']}); a square: label-noise suspect "
            f"({m['suspects']}). Hover over a point to see the image. Islands of one colour inside another's are "
            f"worth a look: mislabelled images, or a kind of picture the model mixes up.</p>" + m["html"])


# ------------------------------------------------------------------ entry point

def build_report(run, clf, sc, metrics: dict, workers: int = 1, bad=None, suspects=None,
                 gradcam: bool = True, data_map=None, printer=print) -> Path:
    """Write RUN/report/index.html and RUN/report/eval.json for an evaluated
    split (`sc`, evaluate.Scored); returns the page's path. The data engine's
    sections come from above this layer (data_engine.REPORT_SECTIONS), None
    leaves them out: suspects(clf, splits, workers, bad) -> dict | str and
    data_map(clf, sc, suspects, workers, bad) -> dict | str."""

    t0 = time.time()
    page = _analyse(run, clf, sc, metrics)
    t_figs = time.time() - t0
    root = Path(sc.splits.root)
    for r in page.errors["mistakes"] + page.errors["close_calls"]:
        page.thumbs.setdefault(r["path"], thumbnail(root / r["path"], THUMB))
    page.unknown = metrics.get("unknown")
    for d in (page.unknown or {}).get("most_familiar_unknowns", []):
        page.thumbs.setdefault(d["path"], thumbnail(Path(d["path"]), THUMB))
    t1 = time.time()
    if gradcam:
        page.gradcam = _gradcam_tiles(clf, str(root), gradcam_samples(sc.probs, sc.labels, sc.paths, clf.classes))
    t_gc, t2 = time.time() - t1, time.time()
    if suspects:
        page.suspects = suspects(clf, sc.splits, workers, bad)
        for r in page.suspects["suspects"] if isinstance(page.suspects, dict) else []:
            page.thumbs.setdefault(r["path"], thumbnail(Path(sc.splits.root) / r["path"], THUMB))
    t_sus, t3 = time.time() - t2, time.time()
    if data_map:
        page.data_map = data_map(clf, sc, page.suspects, workers, bad)
    t_map = time.time() - t3
    page.meta.update(created=time.strftime("%Y-%m-%d %H:%M"), version=__version__)
    path = run.report_page
    atomic_write_text(path, render_html(page))
    seconds = {"figures": round(t_figs, 2), "gradcam": round(t_gc, 2), "label_noise": round(t_sus, 2),
               "data_map": round(t_map, 2), "total": round(time.time() - t0, 2)}
    _write_eval_json(run.report_json, page, seconds)
    return path


def _analyse(run, clf, sc, metrics: dict) -> Page:
    """Curves, confused pairs, error cases and figures of the evaluated split."""
    classes, summary, history = clf.classes, run.summary(), run.history()
    cal = metrics.get("calibration")
    page = Page(metrics=metrics, calibration=cal, tta=metrics.get("tta_comparison"),
                curves=roc_pr_curves(sc.labels, sc.probs, classes),
                pairs=most_confused_pairs(metrics["confusion_matrix"], classes, k=10),
                errors=error_cases(sc.probs, sc.labels, sc.paths, classes),
                meta={"run": str(run), "model": clf.arch, "data": str(sc.splits.root), "strategy": summary.get("strategy")},
                figs={"cm_counts": confusion_png(metrics["confusion_matrix"], classes, normalize=False),
                      "cm_norm": confusion_png(metrics["confusion_matrix"], classes, normalize=True)})
    if history:
        page.figs["curves"] = curves_png(history, (summary.get("best") or {}).get("epoch"))
    if page.curves["per_class"]:
        page.figs["roc_pr"] = roc_pr_png(page.curves, classes)
    if cal:
        page.figs["reliability"] = reliability_png(cal["reliability_before"], cal["reliability_after"], cal["temperature"])
    return page


def _gradcam_tiles(clf, root: str, samples: list[dict]) -> list[dict] | str:
    try:
        out = []
        for s in gradcam_images(clf, root, samples):
            cam, seen = s.pop("image"), s.pop("input")
            cam.thumbnail((160, 160))
            seen.thumbnail((160, 160))
            out.append({**s, "png": _side_by_side(seen, cam)})
        return out
    except ValueError as e:  # not a CNN
        return f"Grad-CAM not available for this model: {e}"


def _write_eval_json(path: Path, page: Page, seconds: dict) -> None:
    gc = page.gradcam
    cal = {k: v for k, v in page.calibration.items()} if page.calibration else None
    write_json(path, {**page.metrics, "meta": page.meta, "curves": page.curves, "confused_pairs": page.pairs,
                      "errors": page.errors, "calibration": cal, "tta_comparison": page.tta,
                      "gradcam": [{k: v for k, v in s.items() if k != "png"} for s in gc] if isinstance(gc, list) else gc,
                      "label_noise": page.suspects, "report_seconds": seconds,
                      "data_map": {k: v for k, v in page.data_map.items() if k != "html"}
                      if isinstance(page.data_map, dict) else page.data_map})


def _side_by_side(left, cam_img) -> bytes:
    """The model's input and its Grad-CAM overlay next to each other, one JPEG."""
    from PIL import Image

    h = cam_img.height
    canvas = Image.new("RGB", (left.width + 4 + cam_img.width, h), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(cam_img, (left.width + 4, 0))
    return _jpeg(canvas)
