"""Where should an app's resize happen? Five ways to turn a photo of any size
into the model input, measured against imgclf's own Python path on real
held-out images with real trained runs.

  .venv/bin/python -m imgclf train ../shared/datasets/cats_dogs_tiny --out /tmp/web-run
  .venv/bin/python -m imgclf train ../shared/datasets/hymenoptera --out /tmp/web-run-hym
  .venv/bin/python bench/bench_web_resize.py /tmp/web-run /tmp/web-run-hym

  a   reference: Preprocess.load (Pillow: JPEG draft decode, shrink, resize
      with reducing_gap) -> the exported fixed-size ONNX model
  a'  Pillow's resize on the full-size decode (no draft, no reducing_gap): the
      same resize, other decode arithmetic; the noise floor
  b   Chromium: createImageBitmap + canvas drawImage, imageSmoothingQuality
      "high" (what a plain web page does), the policy's source rectangle
  b'  the same with the canvas default, "low"
  c   the resize inside the ONNX graph (deploy/resize_graph.py: Resize with
      antialias), fed the full-size decode: what the web export runs
  d   the same graph without antialias: a plain bilinear resize, the kind
      many phone image APIs do (e.g. Android's Bitmap.createScaledBitmap)

Per way: top-1 agreement with (a), accuracy, max and mean |p - p_ref|, and
the mean |input - input_ref| in levels. The model part is onnxruntime in
Python for every way (ONNX Runtime Web gives the same probabilities from the
same input; the last section checks that for (c) in Chromium and times it).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import DATASETS, ROOT, table

sys.path.insert(0, str(ROOT))
from tests.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.test_web_export import StaticServer  # noqa: E402

WAYS = ["a", "a'", "b", "b'", "c", "d"]

CANVAS = """async ([urls, pp, quality]) => {
  // Each URL -> the model input a plain page makes: decode, then one drawImage
  // of the policy's source rectangle into an S x S canvas.
  const s = pp.size, out = [];
  const draft = pp.resize === 'crop' ? Math.round(s / pp.crop_pct) : s;
  for (const u of urls) {
    const blob = await (await fetch(u)).blob();
    const bm = await createImageBitmap(blob, {colorSpaceConversion: 'none', imageOrientation: 'from-image',
                                              premultiplyAlpha: 'none'});
    const c = new OffscreenCanvas(s, s), ctx = c.getContext('2d', {willReadFrequently: true});
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = quality;
    ctx.fillStyle = pp.resize === 'pad' ? `rgb(${pp.pad_color.join(',')})` : '#fff';
    ctx.fillRect(0, 0, s, s);
    const w = bm.width, h = bm.height;
    if (pp.resize === 'crop') {
      const side = Math.min(w, h) * s / draft;
      ctx.drawImage(bm, (w - side) / 2, (h - side) / 2, side, side, 0, 0, s, s);
    } else if (pp.resize === 'pad') {
      const r = s / Math.max(w, h), nw = Math.max(1, Math.round(w * r)), nh = Math.max(1, Math.round(h * r));
      ctx.drawImage(bm, 0, 0, w, h, Math.floor((s - nw) / 2), Math.floor((s - nh) / 2), nw, nh);
    } else ctx.drawImage(bm, 0, 0, w, h, 0, 0, s, s);
    bm.close();
    const rgba = ctx.getImageData(0, 0, s, s).data;
    let str = '';
    for (let i = 0; i < rgba.length; i += 4) str += String.fromCharCode(rgba[i], rgba[i + 1], rgba[i + 2]);
    out.push(btoa(str));
  }
  return out;
}"""

ORT_WEB = """async ([urls, n, port]) => {
  // (c) in ONNX Runtime Web: the any-size graph on the browser's own decode,
  // against the fixed-size graph (fed the same pixels, resized by the former
  // JS port of Pillow's resize if given); times per image.
  const ort = await import('./ort/ort.wasm.min.mjs');
  const P = port ? await import('./preprocess.js') : null;
  ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;
  ort.env.wasm.numThreads = 1;
  const opts = {executionProviders: ['wasm'], graphOptimizationLevel: 'all'};
  const anySize = await ort.InferenceSession.create('./any.onnx', opts);
  const fixed = await ort.InferenceSession.create('./fixed.onnx', opts);
  const pp = await (await fetch('./pp.json')).json();
  const res = [];
  for (const u of urls.slice(0, n)) {
    const bm = await createImageBitmap(await (await fetch(u)).blob(),
      {colorSpaceConversion: 'none', imageOrientation: 'from-image', premultiplyAlpha: 'none'});
    const c = new OffscreenCanvas(bm.width, bm.height), ctx = c.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(bm, 0, 0);
    const rgba = ctx.getImageData(0, 0, bm.width, bm.height).data, rgb = new Uint8Array(bm.width * bm.height * 3);
    for (let i = 0, j = 0; j < rgb.length; i += 4, j += 3) {
      rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
    }
    const img = {width: bm.width, height: bm.height, data: rgb};
    bm.close();
    let t = performance.now();
    const a = await anySize.run({images: new ort.Tensor('uint8', img.data, [1, img.height, img.width, 3])});
    const tAny = performance.now() - t;
    t = performance.now();
    const x = P ? P.resizeImage(img, pp) : {data: new Uint8Array(pp.size * pp.size * 3)};
    const tPort = P ? performance.now() - t : null;
    t = performance.now();
    await fixed.run({images: new ort.Tensor('uint8', x.data, [1, pp.size, pp.size, 3])});
    const tFixed = performance.now() - t;
    res.push({probs: Array.from(a.probs.data), any: tAny, port: tPort, fixed: tFixed});
  }
  return res;
}"""


def held_out(run: Path, spec: str) -> list[tuple[Path, int]]:
    """(path, label) of a dataset folder, with the run's class order; `fullres`
    leaves out ids 0-99 (cats_dogs_tiny's training images)."""
    classes = json.loads((run / "splits.json").read_text())["classes"]
    root = DATASETS / spec.split("@")[0]
    items = []
    for y, c in enumerate(classes):
        for p in sorted((root / c).iterdir()):
            if spec.endswith("@fullres") and int(p.stem.split(".")[1]) < 100:
                continue
            items.append((p, y))
    return items


def fixed_onnx(run: Path) -> bytes:
    f = run / "model.onnx"
    if not f.exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "imgclf", "export", str(run), "--out", str(f)], check=True)
    return f.read_bytes()


def python_inputs(paths: list[Path], pp) -> dict[str, np.ndarray]:
    """The model inputs of a, a', c and d (uint8 (N, S, S, 3) each)."""
    import onnxruntime as ort
    from PIL import Image

    from imgclf.data.images import open_image
    from imgclf.data.preprocess import resize_image
    from imgclf.deploy.resize_graph import resize_model

    sess = {aa: ort.InferenceSession(resize_model(pp, aa).SerializeToString(), providers=["CPUExecutionProvider"])
            for aa in (True, False)}
    plain = Image.Image.resize

    def no_gap(self, size, resample=None, box=None, reducing_gap=None):
        return plain(self, size, resample, box, None)

    xs = {w: [] for w in ("a", "a'", "c", "d")}
    for p in paths:
        xs["a"].append(pp.load(p))
        full = open_image(p)  # full-size decode, as a browser or phone delivers it
        Image.Image.resize = no_gap
        try:
            xs["a'"].append(np.asarray(resize_image(full, pp)))
        finally:
            Image.Image.resize = plain
        arr = np.asarray(full)[None]
        xs["c"].append(sess[True].run(None, {"images": arr})[0][0])
        xs["d"].append(sess[False].run(None, {"images": arr})[0][0])
    return {k: np.stack(v) for k, v in xs.items()}


def serve_folder(tmp: Path, paths: list[Path], fixed: bytes, any_size: bytes, pp, port_js: Path | None) -> list[str]:
    """A folder for the page: images (linked), both models, ORT Web, the old JS port if given."""
    from imgclf.deploy.web import site

    if port_js:
        (tmp / "preprocess.js").write_bytes(port_js.read_bytes())
    (tmp / "ort").symlink_to(site.require_runtime(), target_is_directory=True)
    (tmp / "fixed.onnx").write_bytes(fixed)
    (tmp / "any.onnx").write_bytes(any_size)
    (tmp / "pp.json").write_text(json.dumps(pp.to_dict()))
    (tmp / "img").mkdir()
    urls = []
    for i, p in enumerate(paths):
        (tmp / "img" / f"{i}{p.suffix}").symlink_to(p)
        urls.append(f"./img/{i}{p.suffix}")
    return urls


def browser(tmp: Path, urls: list[str], pp, n_ortweb: int, port: bool) -> tuple[dict[str, np.ndarray], list[dict]]:
    from playwright.sync_api import sync_playwright

    server = StaticServer(tmp)
    s = pp.size
    out: dict[str, list] = {"b": [], "b'": []}
    try:
        with sync_playwright() as pw:
            br = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            page = br.new_page()
            page.goto(server.url + "pp.json")
            for way, quality in (("b", "high"), ("b'", "low")):
                for i in range(0, len(urls), 20):
                    for b64 in page.evaluate(CANVAS, [urls[i:i + 20], pp.to_dict(), quality]):
                        out[way].append(np.frombuffer(base64.b64decode(b64), np.uint8).reshape(s, s, 3))
            web = page.evaluate(ORT_WEB, [urls, n_ortweb, port]) if n_ortweb else []
            br.close()
    finally:
        server.stop()
    return {k: np.stack(v) for k, v in out.items()}, web


def probs(pred, x: np.ndarray) -> np.ndarray:
    return np.concatenate([pred.probs(x[i:i + 32]) for i in range(0, len(x), 32)])


def one_set(run: Path, spec: str, limit: int | None, n_ortweb: int, port_js: Path | None,
            tmp: Path) -> tuple[list[dict], dict]:
    from imgclf.deploy.resize_graph import with_resize
    from imgclf.inference.onnx_predictor import OnnxPredictor

    items = held_out(run, spec)
    if limit:
        items = items[::max(1, len(items) // limit)][:limit]
    paths, y = [p for p, _ in items], np.array([c for _, c in items])
    fixed = fixed_onnx(run)
    pred = OnnxPredictor(fixed)
    pp = pred.preprocess
    any_size = with_resize(fixed, pp).SerializeToString()
    t0 = time.time()
    xs = python_inputs(paths, pp)
    urls = serve_folder(tmp, paths, fixed, any_size, pp, port_js)
    bx, web = browser(tmp, urls, pp, n_ortweb, port_js is not None)
    xs.update(bx)
    p = {w: probs(pred, xs[w]) for w in WAYS}
    # The merged any-size graph answers as resize graph + fixed graph do (checked on a few images).
    merged = OnnxPredictor(any_size)
    from imgclf.data.images import open_image

    merged_diff = max(float(np.abs(merged.probs(np.asarray(open_image(q))[None])[0] - p["c"][i]).max())
                      for i, q in enumerate(paths[:5]))
    ref = p["a"]
    rows = []
    for w in WAYS:
        d = np.abs(p[w] - ref)
        acc, agree = (p[w].argmax(1) == y).mean(), (p[w].argmax(1) == ref.argmax(1)).mean()
        rows.append({"set": f"{spec} ({len(paths)})", "way": w, "top-1 as (a)": f"{agree:.2%}",
                     "flips": int((p[w].argmax(1) != ref.argmax(1)).sum()), "accuracy": f"{acc:.2%}",
                     "max |p-p_ref|": f"{d.max():.4f}", "mean |p-p_ref|": f"{d.max(1).mean():.5f}",
                     "mean |x-x_ref| levels": f"{np.abs(xs[w].astype(int) - xs['a']).mean():.2f}"})
    extra = {"merged_vs_two_stage_max_abs": merged_diff, "seconds": round(time.time() - t0, 1),
             "sizes": f"{min(min(open_image(q).size) for q in paths[:50])}-"
                      f"{max(max(open_image(q).size) for q in paths[:50])} px (first 50)"}
    if web:
        ort_web = np.array([r["probs"] for r in web])
        extra.update(ortweb_vs_python_c=float(np.abs(ort_web - p["c"][:len(web)]).max()),
                     ortweb_ms_any=np.median([r["any"] for r in web]),
                     ortweb_ms_fixed=np.median([r["fixed"] for r in web]),
                     ortweb_n=len(web))
        if port_js:
            extra["ms_js_port_resize"] = np.median([r["port"] for r in web])
    return rows, extra


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tiny_run", type=Path, help="a default run trained on cats_dogs_tiny")
    ap.add_argument("hym_run", type=Path, help="a default run trained on hymenoptera")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per set")
    ap.add_argument("--ortweb", type=int, default=10, help="images run in ONNX Runtime Web per set (0: none)")
    ap.add_argument("--port-js", type=Path, default=None,
                    help="the former JS port of Pillow's resize, to time it too: "
                         "git show a41d51b:imgclf/deploy/web/static/preprocess.js > /tmp/preprocess.js")
    a = ap.parse_args()
    sets = [(a.tiny_run, "cats_and_dogs_filtered/validation"), (a.tiny_run, "dogs_vs_cats_2k_fullres@fullres"),
            (a.hym_run, "hymenoptera/val")]
    rows = []
    for run, spec in sets:
        with tempfile.TemporaryDirectory(prefix="imgclf-bench-resize-") as tmp:
            r, extra = one_set(run, spec, a.limit, a.ortweb, a.port_js, Path(tmp))
        rows += r
        print(table(r, list(r[0])), "\n", json.dumps(extra, default=float), "\n", flush=True)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
