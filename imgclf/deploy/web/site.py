"""The files of a web export: page, service worker, manifest, icons, model, runtime."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from imgclf.deploy.web import vendor
from imgclf.errors import ExportError
from imgclf.inference.onnx_predictor import FORMAT

STATIC = Path(__file__).resolve().parent / "static"
INTERPOLATIONS = ("bilinear", "bicubic")  # the Pillow filters deploy/resize_graph.py reproduces


def is_export(folder: Path) -> bool:
    """An earlier web export (which a new one may replace): its model.json says so."""
    try:
        return json.loads((folder / "model.json").read_text())["format"] == FORMAT and (folder / "sw.js").exists()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def require_runtime() -> Path:
    """ONNX Runtime Web's files, or an error that says how to get them."""
    path = vendor.vendored()
    if path is None:
        raise ExportError(f"ONNX Runtime Web {vendor.VERSION} is missing from {vendor.VENDOR} (it is fetched once, "
                          "at build time, not shipped in git)",
                          "run `make setup` or `python -m imgclf.deploy.web.vendor` (downloads it from "
                          "registry.npmjs.org and checks its sha512), then export again")
    return path


def check_preprocess(pp) -> None:
    if pp.interpolation not in INTERPOLATIONS:
        raise ExportError(f"the model resizes with interpolation={pp.interpolation!r}; the web model's graph "
                          f"reproduces Pillow's {' and '.join(INTERPOLATIONS)} only",
                          "export --format onnx and serve it with `imgclf serve`, or train with a bilinear model")


def icon(size: int) -> bytes:
    """A plain app icon (the manifest needs PNGs of 192 and 512 px to be installable)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (31, 111, 235))
    d = ImageDraw.Draw(im)
    u = size / 16
    d.rounded_rectangle((3 * u, 4 * u, 13 * u, 12 * u), radius=u, outline="white", width=max(2, int(u * 0.8)))
    d.polygon([(4.5 * u, 10.5 * u), (7.5 * u, 6.5 * u), (9.5 * u, 9 * u), (10.5 * u, 8 * u), (11.5 * u, 10.5 * u)],
              fill="white")
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def manifest(meta: dict) -> bytes:
    classes = meta["classes"]
    name = f"imgclf: {', '.join(classes[:4])}{'…' if len(classes) > 4 else ''}"
    return json.dumps({
        "name": name, "short_name": "imgclf", "description": f"Classifies images into {len(classes)} classes, "
        "on this device, offline", "start_url": "./", "scope": "./", "display": "standalone",
        "background_color": "#ffffff", "theme_color": "#1f6feb",
        "icons": [{"src": f"icon-{s}.png", "sizes": f"{s}x{s}", "type": "image/png", "purpose": "any"}
                  for s in (192, 512)],
    }, indent=2).encode()


def build(onnx_bytes: bytes, meta: dict) -> dict[str, bytes]:
    """Relative path -> content, for every file of the folder. `meta` is the
    ONNX model's own metadata, decoded (OnnxPredictor.metadata): model.json is
    what the page reads for labels and preprocessing."""
    runtime = require_runtime()
    files = {p.name: p.read_bytes() for p in sorted(STATIC.iterdir()) if p.is_file() and p.name != "sw.js"}
    files.update({f"ort/{p.name}": p.read_bytes() for p in sorted(runtime.iterdir()) if p.suffix in (".mjs", ".wasm")})
    files.update({"model.onnx": onnx_bytes, "model.json": json.dumps(meta, indent=2).encode(),
                  "manifest.webmanifest": manifest(meta), "icon-192.png": icon(192), "icon-512.png": icon(512)})
    # The service worker caches exactly these files; its cache name changes
    # with their content, so a re-export replaces what browsers hold.
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    urls = ["./"] + [f"./{rel}" for rel in sorted(files)]
    head = f"const VERSION = {json.dumps(h.hexdigest()[:16])};\nconst FILES = {json.dumps(urls, indent=1)};\n"
    files["sw.js"] = head.encode() + (STATIC / "sw.js").read_bytes()
    return files
