"""`imgclf export --format web`: the static folder, served by a plain static
server on loopback, classifies real images in headless Chromium with the same
labels and probabilities (within 1e-3) as `imgclf predict`, from the same
model input bytes, and keeps working with the server gone and the network off."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from .browser import browser_page, chromium_path
from .conftest import DATASETS, ROOT, imgclf, need

PROB_ATOL = 1e-3
# The unknown-input score is a share of validation images (steps of 1/100 for
# this run); a float-level difference in a kNN distance moves it by one step,
# as between PyTorch and ONNX (tests/test_open_set.py).
UNKNOWN_ATOL = 0.011


@pytest.fixture(scope="module")
def web(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("web") / "site"
    p = imgclf("export", run, "--format", "web", "--out", out, "--json")
    return out, json.loads(p.stdout[p.stdout.index("{"):])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class StaticServer:
    """python -m http.server, in a thread: what anyone would host the folder with."""

    def __init__(self, folder: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(_Quiet, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


def test_web_folder(web):
    """One command writes the page, manifest, service worker, model and the runtime."""
    out, report = web
    files = report["files"]
    for f in ("index.html", "app.js", "classifier.js", "preprocess.js", "jpeg.js", "sw.js", "manifest.webmanifest",
              "model.onnx", "model.json", "icon-192.png", "icon-512.png", "ort/ort.wasm.min.mjs",
              "ort/ort-wasm-simd-threaded.mjs", "ort/ort-wasm-simd-threaded.wasm"):
        assert (out / f).is_file() and (out / f).stat().st_size == files[f], f
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["cats", "dogs"] and meta["preprocess"]["size"] == 208 and "run_path" not in meta
    assert report["max_abs_diff"] <= 1e-4  # the ONNX model itself was checked against PyTorch
    sw = (out / "sw.js").read_text()
    assert all(f'"./{f}"' in sw for f in files if f != "sw.js")
    # Nothing in the page reaches outside the folder.
    for f in ("index.html", "app.js", "classifier.js", "preprocess.js", "sw.js"):
        assert "http://" not in (out / f).read_text() and "https://" not in (out / f).read_text(), f


def test_web_refuses_a_folder_that_is_not_an_export(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    p = imgclf("export", tiny_run[0], "--format", "web", "--out", tmp_path, check=False)
    assert p.returncode != 0 and "not an earlier export" in p.stderr and (tmp_path / "notes.txt").exists()


def real_images(tmp: Path) -> list[Path]:
    """Validation photos: six 200x200 from cats_dogs_tiny, odd sizes from the
    full-resolution sets (some big enough for Pillow's JPEG draft scaling), one
    JPEG that stands on its side by EXIF orientation and one transparent PNG."""
    from PIL import Image

    tiny, full = DATASETS / "cats_dogs_tiny" / "val", DATASETS / "dogs_vs_cats_2k_fullres"
    hym = DATASETS / "hymenoptera"
    paths = [*sorted(need(tiny / "cats").iterdir())[:3], *sorted(need(tiny / "dogs").iterdir())[:3],
             need(full / "dogs" / "dog.1.jpg"),  # 327x499
             need(full / "cats" / "cat.10.jpg"),  # 489x499: decoded at 1/2 scale by Pillow
             need(hym / "val" / "ants" / "desert_ant.jpg"),  # 812x642: 1/2
             need(hym / "train" / "ants" / "Nepenthes_rafflesiana_ant.jpg")]  # 1488x1984: 1/4
    src = Image.open(paths[7])
    exif = src.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    src.save(tmp / "rotated.jpg", quality=90, exif=exif.tobytes())
    rgba = Image.open(paths[6]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(tmp / "transparent.png")
    return paths + [tmp / "rotated.jpg", tmp / "transparent.png"]


LAST = """() => { const a = window.imgclfLast; let s = '';
  for (const b of a.input.data) s += String.fromCharCode(b);
  return {label: a.label, probs: a.probs, top: a.top, unknown: a.unknown ?? null, exact: a.exact,
          input: btoa(s), ms: a.ms}; }"""


def classify_in_page(page, path: Path) -> dict:
    """Pick the file with the page's own file input and read its answer."""
    page.set_input_files("#file", str(path))
    page.wait_for_function("(n) => document.getElementById('status').textContent === 'done: ' + n",
                           arg=path.name, timeout=30_000)
    return page.evaluate(LAST)


def predict_cli(model: Path, paths: list[Path]) -> dict[str, dict]:
    p = imgclf("predict", model, *paths, "--format", "json", "--top-k", "2")
    return {Path(r["path"]).name: r for r in json.loads(p.stdout[p.stdout.index("["):])}


DROP = """([name, b64]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
  document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true})); }"""


def check_answers(got: dict, want: dict, inputs: dict) -> None:
    """Same model input (within 1 level; in practice identical), same label,
    probabilities within PROB_ATOL."""
    for name, g in got.items():
        x_js = np.frombuffer(base64.b64decode(g["input"]), np.uint8).astype(int)
        diff = int(np.abs(x_js - inputs[name].reshape(-1)).max())
        assert diff <= 1, f"{name}: the page's model input differs from Python's by up to {diff} levels"
        assert g["label"] == want[name]["label"], (name, g["top"], want[name]["top"])
        p_py = {t["label"]: t["score"] for t in want[name]["top"]}
        p_js = {t["label"]: t["score"] for t in g["top"]}
        assert p_js.keys() == p_py.keys() and all(abs(p_js[c] - p_py[c]) <= PROB_ATOL for c in p_py), (name, p_js, p_py)
        assert g["exact"] and (g["unknown"] is None) == ("unknown" not in want[name]), name
        if g["unknown"] is not None:  # the unknown-input score: a share of validation images, from the same graph
            assert abs(g["unknown"] - want[name]["unknown"]) <= UNKNOWN_ATOL, (name, g["unknown"], want[name]["unknown"])


def test_browser_matches_predict_and_works_offline(web, tmp_path):
    """The headline test: a plain static server, Chromium, real photos; the page
    says what `imgclf predict` says; then the server goes away, the network is
    cut, the page reloads from its service worker and still classifies."""
    from imgclf.data.preprocess import Preprocess

    chromium_path()
    out, _ = web
    paths = real_images(tmp_path)
    want = predict_cli(out / "model.onnx", paths)
    pp = Preprocess.from_dict(json.loads((out / "model.json").read_text())["preprocess"])
    inputs = {p.name: pp.load(p).astype(int) for p in paths}
    server = StaticServer(out)
    fake_camera = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    try:
        with browser_page(extra_args=fake_camera) as page:
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')",
                                   timeout=60_000)
            assert "cats, dogs" in page.inner_text("#model-info")
            got = {p.name: classify_in_page(page, p) for p in paths[:-1]}
            # Drag and drop, the other way in.
            page.evaluate(DROP, [paths[-1].name, base64.b64encode(paths[-1].read_bytes()).decode()])
            page.wait_for_function("(n) => document.getElementById('status').textContent === 'done: ' + n",
                                   arg=paths[-1].name, timeout=30_000)
            got[paths[-1].name] = page.evaluate(LAST)
            check_answers(got, want, inputs)
            shown = page.locator("#top li")
            assert shown.count() == 2 and page.inner_text("#label") == want[paths[-1].name]["label"]
            assert page.locator("#top li .cls").first.inner_text() == want[paths[-1].name]["label"]

            # The camera (Chromium's fake device): a frame goes through the same resize and model.
            page.click("#camera-start")
            page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20_000)
            page.click("#capture")
            page.wait_for_function("document.getElementById('status').textContent === 'done: camera frame'",
                                   timeout=30_000)
            cam = page.evaluate(LAST)
            assert cam["label"] in ("cats", "dogs") and abs(sum(t["score"] for t in cam["top"]) - 1) < 1e-4
            page.click("#camera-stop")

            # Installable: manifest and service worker as Chromium judges them.
            page.wait_for_function("document.body.dataset.offlineReady === '1'", timeout=60_000)
            errors = page.context.new_cdp_session(page).send("Page.getInstallabilityErrors")["installabilityErrors"]
            assert [e for e in errors if e["errorId"] != "in-incognito"] == []  # Playwright's contexts are incognito
            assert all(u.startswith(server.url) or u.startswith(("blob:", "data:")) for u in requests), requests

            # Offline: no server, no network; reload and classify again.
            server.stop()
            page.context.set_offline(True)
            page.reload()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')",
                                   timeout=60_000)
            again = {p.name: classify_in_page(page, p) for p in (paths[0], paths[9])}
            check_answers(again, want, inputs)
    finally:
        server.stop()


PORT = """async (cases) => {
  // Each case: input file, expected file, what to do. Returns, per case, how
  // many bytes differ from Pillow's (and the largest difference).
  const P = await import('./preprocess.js'), J = await import('./jpeg.js');
  const load = async (u) => new Uint8Array(await (await fetch(u)).arrayBuffer());
  const out = [];
  for (const c of cases) {
    const input = await load(c.input), want = await load(c.want);
    let got;
    if (c.jpeg) got = J.decodeJpegScaled(input, c.jpeg);
    else {
      const img = {width: c.width, height: c.height, data: input};
      got = c.pp === 'shrink' ? P.shrink(img, 224) : P.resizeImage(img, c.pp);
    }
    if (!got || got.data.length !== want.length) { out.push([-1, -1]); continue; }
    let n = 0, max = 0;
    for (let i = 0; i < want.length; i++) {
      const d = Math.abs(got.data[i] - want[i]);
      if (d) { n++; max = Math.max(max, d); }
    }
    out.push([n, max]);
  }
  return out;
}"""


def port_cases(folder: Path) -> list[dict]:
    """Inputs and Pillow's outputs as raw files under `folder`, described for PORT."""
    from PIL import Image

    from imgclf.data.images import open_image, shrink
    from imgclf.data.preprocess import Preprocess, resize_image

    photo = need(DATASETS / "hymenoptera" / "val" / "ants" / "desert_ant.jpg")
    imgs = [open_image(need(DATASETS / "cats_dogs_tiny" / "val" / "cats" / "cat.2003.jpg")),
            open_image(need(DATASETS / "dogs_vs_cats_2k_fullres" / "dogs" / "dog.1.jpg")), open_image(photo)]
    pps = [Preprocess(), Preprocess(crop_pct=0.875), Preprocess(size=64, resize="squash", interpolation="bicubic"),
           Preprocess(size=96, resize="pad", pad_color=(10, 200, 30)), Preprocess(size=160, interpolation="bicubic")]
    big = imgs[2].resize((1200, 900))
    todo = [(im, pp) for im in imgs for pp in pps]
    todo += [(imgs[2].resize((3000, 40)), Preprocess()),  # the centre-square box path
             (big, Preprocess(size=48, resize="squash")),  # reduce((8, 6)) before resampling
             (big, "shrink")]
    cases = []
    for i, (im, pp) in enumerate(todo):
        (folder / f"in{i}").write_bytes(np.asarray(im).tobytes())
        out = shrink(im, 224) if pp == "shrink" else resize_image(im, pp)
        (folder / f"want{i}").write_bytes(np.asarray(out).tobytes())
        cases.append({"input": f"../data/in{i}", "want": f"../data/want{i}", "width": im.width, "height": im.height,
                      "pp": pp if pp == "shrink" else pp.to_dict(), "what": f"{im.size} {pp}"})
    src = Image.open(photo)
    variants = {"grayscale": {}, "progressive": {"progressive": True}, "4:2:2": {"subsampling": 1},
                "4:4:4 progressive": {"subsampling": 0, "progressive": True}, "restarts": {"restart_marker_blocks": 3}}
    for name, kw in variants.items():
        f = folder / f"{len(cases)}.jpg"
        (src.convert("L") if name == "grayscale" else src).save(f, "JPEG", quality=85, **kw)
        for s, draft in ((2, 300), (4, 160), (8, 80)):
            im = Image.open(f)
            im.draft(im.mode, (draft, draft))
            assert im.size[0] == -(-src.width // s)  # Pillow does decode at 1/s
            (folder / f"want{len(cases)}").write_bytes(np.asarray(im.convert("RGB")).tobytes())
            cases.append({"input": f"../data/{f.name}", "want": f"../data/want{len(cases)}", "jpeg": s,
                          "what": f"{name} JPEG at 1/{s}"})
    return cases


def test_preprocess_port_matches_pillow(web, tmp_path):
    """preprocess.js and jpeg.js against Pillow itself, beyond what the tiny
    model uses: every resize policy, bicubic, integer reduce (reducing_gap and
    shrink), the extreme-aspect box path, and JPEG draft decoding at 1/2, 1/4
    and 1/8 of grayscale, progressive, 4:2:2, 4:4:4 and restart-marker files:
    byte for byte."""
    chromium_path()
    (tmp_path / "data").mkdir()
    (tmp_path / "web").symlink_to(web[0].resolve(), target_is_directory=True)
    cases = port_cases(tmp_path / "data")
    # The README's "in your own page" snippet, as written, in a page beside the folder.
    readme = (ROOT / "README.md").read_text()
    snippet = readme[readme.index("In your own page"):].split("```html\n", 1)[1].split("```", 1)[0]
    (tmp_path / "own.html").write_text(f"<!doctype html><title>mine</title>\n{snippet}")
    cat = need(DATASETS / "cats_dogs_tiny" / "val" / "cats" / "cat.2004.jpg")
    server = StaticServer(tmp_path)
    try:
        with browser_page() as page:
            page.goto(server.url + "web/model.json")
            result = page.evaluate(PORT, cases)
            page.goto(server.url + "own.html")
            page.wait_for_function("document.getElementById('pick').onchange !== null", timeout=60_000)
            with page.expect_console_message(timeout=30_000) as message:
                page.set_input_files("#pick", str(cat))
            label, score = message.value.args[0].json_value(), message.value.args[1].json_value()
    finally:
        server.stop()
    wrong = [(c["what"], n, mx) for c, (n, mx) in zip(cases, result) if n != 0]
    assert not wrong, f"(case, bytes that differ from Pillow, largest difference): {wrong}"
    assert label == "cats" and 0.5 < score <= 1, (label, score)


def test_runtime_fetch_is_checked_and_its_absence_explained(tmp_path, monkeypatch):
    """ONNX Runtime Web comes from npm at build time: a tarball that does not
    match the registry's sha512 is refused, and without the files the export
    says how to get them (before any model is loaded)."""
    from imgclf.deploy.web import site, vendor
    from imgclf.errors import ExportError

    with pytest.raises(RuntimeError, match="refusing"):
        vendor.check_integrity(b"not the onnxruntime-web tarball")
    assert vendor.vendored() is not None  # `make setup` fetched it
    monkeypatch.setattr(vendor, "VENDOR", tmp_path / "vendor")
    monkeypatch.setattr(vendor, "STAMP", tmp_path / "vendor" / "stamp")
    with pytest.raises(ExportError) as e:
        site.require_runtime()
    assert "make setup" in str(e.value) and "imgclf.deploy.web.vendor" in str(e.value)
