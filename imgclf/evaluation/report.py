"""RUN/report/index.html for a single-label split: one self-contained page
that answers "how good is it, where does it fail, and can I trust its
probabilities?". Its sections are drawn in the shared skeleton (page.py);
the data map adds a few lines of script. RUN/report/eval.json holds the same
numbers for machines.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf._version import __version__
from imgclf.data.images import thumbnail
from imgclf.evaluation.figures import confusion_png, curves_png, reliability_png, roc_pr_png
from imgclf.evaluation.gradcam import gradcam_images
from imgclf.evaluation.kinds import GALLERY, error_cases
from imgclf.evaluation.metrics import most_confused_pairs, roc_pr_curves
from imgclf.evaluation.page import (
    THUMB,
    esc,
    img_tag,
    num,
    pct,
    render_page,
    tile,
    unknown_html,
    write_report,
)


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
    data_map: dict | str | None = None  # evaluation/data_map.py: {"html", "points", ...}, or why not


GRADCAM_EACH = 4  # Grad-CAM: this many correct and this many wrong


def _jpeg(img, quality: int = 82) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


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

def _summary(m: dict, meta: dict) -> str:
    cards = [("accuracy", pct(m["accuracy"])), ("balanced accuracy", pct(m["balanced_accuracy"])),
             ("macro F1", num(m["macro"]["f1"])), ("images", f"{m['n']:,}")]
    if "top5_accuracy" in m:
        cards.insert(2, ("top-5 accuracy", pct(m["top5_accuracy"])))
    if m.get("ece") is not None:
        cards.append(("calibration error (ECE)", pct(m["ece"])))
    out = ['<div class="cards">'] + [f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>'
                                     for k, v in cards] + ["</div>"]
    rows = [("model", meta["model"]), ("strategy", meta.get("strategy") or "n/a"), ("data", meta["data"]),
            ("split", f"{m['split']} ({m['n']:,} images{', ' + str(m['skipped']) + ' unreadable skipped' if m.get('skipped') else ''})"),
            ("test-time augmentation", m.get("tta") or "none"), ("temperature", num(m.get("temperature"), 3)),
            ("log loss", num(m.get("log_loss"), 4))]
    out.append('<table><tr><th></th><th class="n">precision</th><th class="n">recall</th><th class="n">F1</th></tr>')
    for avg in ("macro", "weighted"):
        a = m[avg]
        out.append(f'<tr><td>{avg} average</td><td class="n">{num(a["precision"])}</td><td class="n">{num(a["recall"])}</td>'
                   f'<td class="n">{num(a["f1"])}</td></tr>')
    out.append("</table><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>")
    return "".join(out)


def _glance(m: dict, cal: dict | None, errors: dict, suspects: dict | None) -> str:
    """Three plain sentences: how good, where it fails, can the probabilities be trusted."""
    pcs = m["per_class"]
    worst = min(pcs, key=lambda c: (pcs[c]["f1"], c))
    items = [f"<b>How good:</b> {pct(m['accuracy'])} of {m['n']:,} {esc(m['split'])} images right "
             f"(balanced accuracy {pct(m['balanced_accuracy'])}, macro F1 {num(m['macro']['f1'])})."]
    cw = pcs[worst].get("confused_with")
    items.append(f"<b>Where it fails:</b> weakest class <b>{esc(worst)}</b> (F1 {num(pcs[worst]['f1'])}, recall "
                 f"{num(pcs[worst]['recall'])})" + (f", most often taken for <b>{esc(cw)}</b>" if cw else "")
                 + f"; {errors['n_mistakes']} mistakes in all.")
    if cal:
        items.append(f"<b>Probabilities:</b> expected calibration error {pct(cal['ece_before'], 2)} at T = 1, "
                     f"{pct(cal['ece_after'], 2)} with the temperature fitted in training (T = {cal['temperature']:.2f}, "
                     f"stored in the run, so <code>predict</code> returns calibrated probabilities).")
    elif m.get("ece") is not None:
        items.append(f"<b>Probabilities:</b> expected calibration error {pct(m['ece'], 2)} (T = {num(m.get('temperature'), 2)}).")
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
        cwtxt = f"{esc(cw)} ({int(cm[i, classes.index(cw)])} of {p['support']})" if cw else "&mdash;"
        low = p["f1"] < m["macro"]["f1"] - 0.1
        cells = "".join(f'<td class="n bar" style="--w:{100 * p[k]:.0f}%">{num(p[k])}</td>' for k in ("precision", "recall", "f1"))
        rows.append(f'<tr class="{"low" if low else ""}"><td>{esc(c)}</td>{cells}<td class="n">{p["support"]}</td>'
                    + (f'<td class="n">{num(auc.get(c))}</td>' if show_auc else "") + f"<td>{cwtxt}</td></tr>")
    note = '<p class="sub">Sorted by F1, weakest first. Shaded rows: F1 more than 0.1 below the macro average.</p>' if many else ""
    return note + f'<div class="scroll"><table id="per-class-table">{head}{"".join(rows)}</table></div>'


def _pairs(pairs: list[dict]) -> str:
    if not pairs:
        return "<p>No confusions: every image was classified correctly.</p>"
    rows = "".join(f'<tr><td>{esc(p["true"])}</td><td>{esc(p["predicted"])}</td><td class="n">{p["count"]}</td>'
                   f'<td class="n">{pct(p["rate"])}</td></tr>' for p in pairs)
    return ('<table id="confused-pairs"><tr><th>true class</th><th>predicted as</th><th class="n">images</th>'
            f'<th class="n">share of the true class</th></tr>{rows}</table>')


def _tta(tta: dict | None) -> str:
    if not tta:
        return ("<p>Not used. <code>imgclf evaluate RUN --tta flip</code> averages each prediction with that of the "
                "mirrored image and shows the difference here.</p>")
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="n">{pct(v["accuracy"], 2)}</td><td class="n">{pct(v["balanced_accuracy"], 2)}</td>'
                   f'<td class="n">{num(v["macro_f1"])}</td><td class="n">{num(v["log_loss"], 4)}</td><td class="n">{pct(v["ece"], 2)}</td></tr>'
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
               f'<table id="calibration-table"><tr><th>on the {esc(m["split"])} split</th><th class="n">ECE</th><th class="n">log loss</th></tr>'
               f'<tr><td>before (T = 1)</td><td class="n">{pct(cal["ece_before"], 2)}</td><td class="n">{num(cal["nll_before"], 4)}</td></tr>'
               f'<tr><td>after (T = {cal["temperature"]:.3f})</td><td class="n">{pct(cal["ece_after"], 2)}</td><td class="n">{num(cal["nll_after"], 4)}</td></tr></table>')
        if cal.get("cross_fitted"):
            out += ('<p class="note">This is the split T was fitted on. To keep "after" honest, each image here is scored with a T fitted on the other four fifths '
                    "of the split (5-fold cross-fitting); the stored T uses all of it.</p>")
    out += ("<p>ECE: the images are binned by the model's confidence (its top probability); in each bin, the gap "
            "between confidence and actual accuracy, averaged with the bins' sizes as weights. 0 is perfect.</p>")
    if rel_png:
        out += img_tag(rel_png, "reliability diagram")
    return out


def render_html(page: Page) -> str:

    m, meta = page.metrics, page.meta
    title = f"imgclf report: {Path(meta['run']).name}"
    sections = [
        ("summary", "Summary", _glance(m, page.calibration, page.errors, page.suspects) + _summary(m, meta)),
        ("per-class", "Per class", _per_class(m, page.curves)),
        ("confusion", "Confusion matrix",
         '<p class="sub">Rows: true class; columns: predicted class.</p><div class="row">'
         + img_tag(page.figs["cm_counts"], "confusion matrix (counts)", cls="fig cm")
         + img_tag(page.figs["cm_norm"], "confusion matrix (row-normalised)", cls="fig cm") + "</div>"
         + "<h3>Most confused pairs</h3>" + _pairs(page.pairs)),
        ("training", "Training curves",
         img_tag(page.figs["curves"], "training curves") if page.figs.get("curves")
         else '<p class="note">No history.csv in this run.</p>'),
        ("roc", "ROC and precision-recall",
         img_tag(page.figs["roc_pr"], "ROC and precision-recall curves") if page.figs.get("roc_pr")
         else '<p class="note">Needs at least one class both present and absent in this split.</p>'),
        ("calibration", "Calibration", _calibration(page.calibration, m, page.figs.get("reliability"))),
        ("tta", "Test-time augmentation", _tta(page.tta)),
        ("gallery", "Error gallery", _gallery(page)),
        ("gradcam", "Grad-CAM", _gradcam_html(page)),
        ("suspects", "Label-noise suspects", _suspects_html(page)),
        ("unknown", "Unknown inputs", unknown_html(page.unknown, page.thumbs)),
        ("map", "Data map", _map_html(page)),
    ]
    subtitle = [esc(meta["model"]), f'{esc(m["split"])} split of {esc(meta["data"])}', esc(meta["created"]),
                f'run <code>{esc(meta["run"])}</code>']
    return render_page(title, subtitle, sections)


def _gallery(page: Page) -> str:
    e, thumbs = page.errors, page.thumbs
    out = [f"<h3>Most confident mistakes ({min(len(e['mistakes']), GALLERY)} of {e['n_mistakes']})</h3>"]
    if e["mistakes"]:
        out.append('<div class="gallery" id="mistakes">' + "".join(
            tile(thumbs.get(r["path"]), [f'true: <b>{esc(r["true"])}</b>',
                                          f'predicted: <span class="bad">{esc(r["predicted"])}</span> {r["probability"]:.2f}'],
                  r["path"]) for r in e["mistakes"]) + "</div>")
    else:
        out.append("<p>None: every image in this split was classified correctly.</p>")
    if e["close_calls"]:
        out.append("<h3>Closest correct calls (lowest confidence)</h3>")
        out.append('<div class="gallery" id="close-calls">' + "".join(
            tile(thumbs.get(r["path"]), [f'true: <b>{esc(r["true"])}</b>',
                                          f'predicted: <span class="good">{esc(r["predicted"])}</span> {r["probability"]:.2f}'],
                  r["path"]) for r in e["close_calls"]) + "</div>")
    return "".join(out)


def _not_shown(section) -> str | None:
    """A note in place of a section that was skipped (None) or not possible (a reason)."""
    if isinstance(section, str):
        return f'<p class="note">{esc(section)}</p>'
    return None if section else '<p class="note">Skipped.</p>'


def _gradcam_html(page: Page) -> str:
    g = page.gradcam
    if _not_shown(g):
        return _not_shown(g)
    tiles = "".join(tile(s["png"], [
        ('<span class="good">correct</span>' if s["correct"] else '<span class="bad">wrong</span>')
        + f': true <b>{esc(s["true"])}</b>, predicted <b>{esc(s["predicted"])}</b> {s["probability"]:.2f}'],
        s["path"], wide=True) for s in g)
    return (f'<p class="sub">Left: the image as the model sees it; right: Grad-CAM for the predicted class at layer '
            f'<code>{esc(g[0]["layer"])}</code> (red: the regions that raised that class\'s score most). '
            f"{GRADCAM_EACH} random correct and up to {GRADCAM_EACH} most confident wrong predictions.</p>"
            f'<div class="gallery" id="gradcam-gallery">{tiles}</div>')


def _suspects_html(page: Page) -> str:
    s = page.suspects
    if _not_shown(s):
        return _not_shown(s)
    intro = (f"<p>Training images whose given label is unlikely according to models that never trained on them "
             f"({esc(s['method'])}; out-of-fold accuracy {pct(s['out_of_fold_accuracy'])} on {s['scored']:,} images). "
             f"{s['below_threshold']} image(s) get less than {s['threshold']:.0%} for their own label; the lowest are shown. "
             f"Check them and fix or remove the wrong ones, then train again.</p>")
    if not s["suspects"]:
        return intro + "<p>None found.</p>"
    tiles = "".join(tile(page.thumbs.get(r["path"]), [
        f'given: <span class="bad">{esc(r["given"])}</span> {r["p_given"]:.2f}',
        f'looks like: <b>{esc(r["likely"])}</b> {r["p_likely"]:.2f}'], r["path"]) for r in s["suspects"])
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


def build_report(run, clf, sc, metrics: dict, kind, workers: int = 1, bad=None, suspects=None,
                 gradcam: bool = True, data_map=None) -> Path:
    """Write RUN/report/index.html and RUN/report/eval.json for an evaluated
    split (`sc`, kinds.Scored; `kind`, single_label.SingleLabel); returns the page's path.
    The data engine's sections come from above this layer
    (data_engine.REPORT_SECTIONS); None leaves them out:
    suspects(clf, splits, workers, bad) -> dict | str and
    data_map(clf, sc, suspects, workers, bad) -> dict | str."""
    t0 = time.time()
    page = _analyse(run, clf, sc, metrics, kind)
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
            page.thumbs.setdefault(r["path"], thumbnail(root / r["path"], THUMB))
    t_sus, t3 = time.time() - t2, time.time()
    if data_map:
        page.data_map = data_map(clf, sc, page.suspects, workers, bad)
    t_map = time.time() - t3
    page.meta.update(created=time.strftime("%Y-%m-%d %H:%M"), version=__version__)
    html = render_html(page)
    seconds = {"figures": round(t_figs, 2), "gradcam": round(t_gc, 2), "label_noise": round(t_sus, 2),
               "data_map": round(t_map, 2), "total": round(time.time() - t0, 2)}
    return write_report(run, html, _eval_json(page, seconds))


def _analyse(run, clf, sc, metrics: dict, kind) -> Page:
    """Curves, confused pairs, error cases and figures of the evaluated split."""
    classes, summary, history = clf.classes, run.summary(), run.history()
    cal = metrics.get("calibration")
    page = Page(metrics=metrics, calibration=cal, tta=metrics.get("tta_comparison"),
                curves=roc_pr_curves(sc.labels, sc.probs, classes),
                pairs=most_confused_pairs(metrics["confusion_matrix"], classes, k=10),
                errors=error_cases(kind, clf, sc),
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


def _eval_json(page: Page, seconds: dict) -> dict:
    gc = page.gradcam
    cal = {k: v for k, v in page.calibration.items()} if page.calibration else None
    return {**page.metrics, "meta": page.meta, "curves": page.curves, "confused_pairs": page.pairs,
            "errors": page.errors, "calibration": cal, "tta_comparison": page.tta,
            "gradcam": [{k: v for k, v in s.items() if k != "png"} for s in gc] if isinstance(gc, list) else gc,
            "label_noise": page.suspects, "report_seconds": seconds,
            "data_map": {k: v for k, v in page.data_map.items() if k != "html"}
            if isinstance(page.data_map, dict) else page.data_map}


def _side_by_side(left, cam_img) -> bytes:
    """The model's input and its Grad-CAM overlay next to each other, one JPEG."""
    from PIL import Image

    h = cam_img.height
    canvas = Image.new("RGB", (left.width + 4 + cam_img.width, h), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(cam_img, (left.width + 4, 0))
    return _jpeg(canvas)
