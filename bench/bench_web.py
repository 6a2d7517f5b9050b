"""`imgclf export --format web`, measured: the folder's size, the time to a
first prediction in headless Chromium, and the time per image in the page,
against imgclf's own Python path (onnxruntime) on the same images in the same run.

  .venv/bin/python bench/bench_web.py RUN            # exports RUN/web first if it is missing

The folder is served by Python's http.server on loopback (no network cost:
these are compute times). Per-image times are for picking a file in the page:
decode (the browser's) + the any-size graph, resize and model (ONNX Runtime Web,
wasm, 1 thread), after one warm-up image; the baseline is `imgclf.load(model.onnx)`
predicting the same files one at a time (Pillow decode and resize + onnxruntime).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from pathlib import Path

from common import DATASETS, ROOT, machine, table

sys.path.insert(0, str(ROOT))
from tests.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.test_web_export import LAST, StaticServer  # noqa: E402


def folder_table(web: Path) -> str:
    rows = []
    for f in sorted(p for p in web.rglob("*") if p.is_file()):
        data = f.read_bytes()
        rows.append({"file": str(f.relative_to(web)), "bytes": len(data), "gzip -9": len(gzip.compress(data, 9))})
    rows.sort(key=lambda r: -r["bytes"])
    rows.append({"file": "total", "bytes": sum(r["bytes"] for r in rows), "gzip -9": sum(r["gzip -9"] for r in rows)})
    for r in rows:
        r["MB"], r["gzip MB"] = f"{r['bytes'] / 1e6:.2f}", f"{r['gzip -9'] / 1e6:.2f}"
    return table(rows, ["file", "bytes", "MB", "gzip MB"])


def pick(page, path: Path) -> dict:
    page.set_input_files("#file", str(path))
    page.wait_for_function("(n) => document.getElementById('status').textContent === 'done: ' + n",
                           arg=path.name, timeout=120_000)
    return page.evaluate(LAST)


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values):.0f} (p90 {values[int(0.9 * (len(values) - 1))]:.0f})"


def browser_numbers(web: Path, groups: dict[str, list[Path]]) -> tuple[list[dict], dict]:
    from playwright.sync_api import sync_playwright

    server = StaticServer(web)
    loads, per_image = [], {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(server.url)
            page.wait_for_function("window.imgclfReadyAt !== undefined", timeout=120_000)
            first = pick(page, next(iter(groups.values()))[0])
            wall = (time.perf_counter() - t0) * 1000
            ready = page.evaluate("window.imgclfReadyAt")
            loads.append({"visit": "first (nothing cached)", "model ready ms": f"{ready:.0f}",
                          "first prediction ms": f"{first['ms']['total']:.0f}",
                          "time to first prediction ms": f"{wall:.0f}"})
            page.wait_for_function("document.body.dataset.offlineReady === '1'", timeout=120_000)
            for name, paths in groups.items():
                answers = [pick(page, p) for p in paths]
                per_image[name] = {k: [a["ms"][k] for a in answers] for k in ("total", "preprocess", "inference")}
            t0 = time.perf_counter()
            page.reload()
            page.wait_for_function("window.imgclfReadyAt !== undefined", timeout=120_000)
            first = pick(page, next(iter(groups.values()))[1])
            wall = (time.perf_counter() - t0) * 1000
            ready = page.evaluate("window.imgclfReadyAt")
            loads.append({"visit": "again (service worker cache)", "model ready ms": f"{ready:.0f}",
                          "first prediction ms": f"{first['ms']['total']:.0f}",
                          "time to first prediction ms": f"{wall:.0f}"})
            browser.close()
    finally:
        server.stop()
    return loads, per_image


def python_numbers(model: Path, paths: list[Path], threads: int | None) -> list[float]:
    import imgclf

    clf = imgclf.load(model, threads=threads)
    clf.predict([paths[0]])  # warm-up
    out = []
    for p in paths:
        t0 = time.perf_counter()
        clf.predict([p])
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a run directory (RUN/web and RUN/model.onnx are exported if missing)")
    ap.add_argument("--images", type=int, default=20, help="images per group")
    a = ap.parse_args()
    # The page runs the any-size graph (RUN/web/model.onnx); the Python baseline, the plain export.
    web, fixed = Path(a.run) / "web", Path(a.run) / "model.onnx"
    from tests.conftest import imgclf

    if not (web / "model.json").exists():
        imgclf("export", a.run, "--format", "web")
    if not fixed.exists():
        imgclf("export", a.run)
    groups = {
        "cats_and_dogs_filtered/validation (200x200)":
            sorted((DATASETS / "cats_and_dogs_filtered" / "validation" / "cats").iterdir())[:a.images],
        "dogs_vs_cats_2k_fullres (about 500x375; 1/2-scale JPEG decode when a side >= 448)":
            sorted((DATASETS / "dogs_vs_cats_2k_fullres" / "dogs").iterdir())[:a.images],
    }
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(folder_table(web), "\n")
    loads, per_image = browser_numbers(web, groups)
    print(table(loads, ["visit", "model ready ms", "first prediction ms", "time to first prediction ms"]), "\n")
    rows = []
    for name, paths in groups.items():
        b = per_image[name]
        rows.append({"images": name, "path": "page (decode + any-size graph, ORT Web wasm, 1 thread)",
                     "total ms": ms(b["total"]), "decode ms": ms(b["preprocess"]),
                     "resize+model ms": ms(b["inference"])})
        for threads in (1, None):
            rows.append({"images": name, "path": f"baseline: imgclf.load(model.onnx), {threads or 'default'} thread(s)",
                         "total ms": ms(python_numbers(fixed, paths, threads))})
    print(table(rows, ["images", "path", "total ms", "decode ms", "resize+model ms"]))


if __name__ == "__main__":
    main()
