"""The report's skeleton, the same for every kind of label: the page shell
(head, title, sticky navigation, footer), its CSS, the HTML pieces every kind's
sections are made of (figure, tile, numbers), and writing the page with its
eval.json.

Everything is inline (figures as base64 PNG, thumbnails as base64 JPEG, CSS in
a <style> block, no CDN), so the page opens offline and from a copied folder.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from imgclf._version import __version__
from imgclf.io import atomic_write_text, write_json
from imgclf.runs import RunDir

THUMB = 150  # gallery thumbnails: the longer side, pixels

Section = tuple[str, str, str]  # (anchor id, title, HTML body)

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


def esc(s) -> str:
    return html.escape(str(s))


def pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def img_tag(data: bytes, alt: str, cls: str = "fig", mime: str = "image/png") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{data_uri(data, mime)}">'


def tile(thumb: bytes | None, lines: list[str], path: str, wide: bool = False) -> str:
    """One image of a gallery: its thumbnail, a few lines of HTML, its path."""
    img = img_tag(thumb, path, cls="", mime="image/jpeg") if thumb else '<div class="p">(unreadable)</div>'
    return (f'<div class="tile{" wide" if wide else ""}">{img}' + "".join(f"<div>{ln}</div>" for ln in lines)
            + f'<div class="p" title="{esc(path)}">{esc(path)}</div></div>')


def unknown_html(u: dict | None, thumbs: dict[str, bytes | None]) -> str:
    """The "Unknown inputs" section (evaluate --unknown DIR), for every kind."""
    if not u:
        return ('<p class="note">Pass a folder of images from none of the classes to see how well the model '
                'answers "unknown": <code>imgclf evaluate RUN --unknown DIR</code>.</p>')
    hl = ' class="hl"'
    rows = "".join(f"<tr{hl if r['stored'] else ''}><td>{r['threshold']:.2f}</td>"
                   f"<td>{pct(r['known_kept'])}</td><td>{pct(r['known_correct'])}</td>"
                   f"<td>{pct(r['unknown_rejected'])}</td></tr>" for r in u["tradeoff"])
    tiles = "".join(tile(thumbs.get(d["path"]), [f"unknown {d['unknown']:.2f}"], d["path"])
                    for d in u["most_familiar_unknowns"])
    caveat = (" These known images are the validation split, which set the score's scale, so their kept share "
              "is close to the threshold by construction; a test split gives the honest figure."
              if u.get("split") == "val" else "")
    return (f'<p>{u["n_known"]} known images of this split against {u["n_unknown"]} images of '
            f'<code>{esc(u["folder"])}</code>. Score: {esc(u["method"])}. AUROC <b>{num(u["auroc"], 4)}</b>. '
            f'Rejection is {"at " + format(u["reject"], "g") if u["reject"] is not None else "off"} in this model '
            f'(<code>--reject</code> at train, predict or serve time changes it).{esc(caveat)}</p>'
            f'<table id="unknown-tradeoff"><tr><th>threshold</th><th>known kept</th><th>known kept and correct</th>'
            f'<th>unknown rejected</th></tr>{rows}</table>'
            f'<h3>Unknown images that look most familiar</h3><div class="gallery">{tiles}</div>')


def render_page(title: str, subtitle: list[str], sections: list[Section], css: str = "") -> str:
    """The whole page: head, title, a line about the run, navigation, the sections, the footer.
    `subtitle` parts are HTML (escaped by the caller)."""
    nav = "".join(f'<a href="#{k}">{esc(t)}</a>' for k, t, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{esc(t)}</h2>{c}</section>' for k, t, c in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{esc(title)}</title><style>{CSS}{css}</style>'
            f'</head><body><main><h1>{esc(title)}</h1><p class="sub">{" &middot; ".join(subtitle)}</p>'
            f'<nav>{nav}</nav>{body}<p class="sub" style="margin-top:40px">Written by imgclf {esc(__version__)}; '
            f"the numbers are also in <code>eval.json</code> next to this page.</p></main></body></html>")


def write_report(run: RunDir, page_html: str, numbers: dict) -> Path:
    """RUN/report/index.html and RUN/report/eval.json; returns the page's path."""
    atomic_write_text(run.report_page, page_html)
    write_json(run.report_json, numbers)
    return run.report_page
