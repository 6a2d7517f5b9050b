"""`imgclf evaluate` writes a self-contained HTML report a person can read;
temperature scaling is stored and used by predict; compare lines runs up."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import imgclf

from .browser import browser_page
from .conftest import DATASETS, need
from .conftest import imgclf as run_cli


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    out, _ = tiny_run
    p = run_cli("evaluate", out, "--tta", "flip")
    return out, p


def test_evaluate_writes_report_and_calibration(evaluated, tiny):
    out, p = evaluated
    assert (out / "report" / "index.html").exists() and (out / "report" / "eval.json").exists()
    assert "report:" in p.stdout and "calibration: T =" in p.stdout and "flip TTA" in p.stdout
    m = json.loads((out / "eval_val.json").read_text())
    t = m["calibration"]["temperature"]
    assert t > 0 and "ece" in m and m["tta_comparison"]["flip"]["accuracy"] >= 0.85
    # The temperature is stored in the run and predict uses it.
    rec = torch.load(out / "model.pt", weights_only=True)
    assert rec["temperature"] == pytest.approx(t)
    clf = imgclf.load(out)
    f = sorted((tiny / "val" / "dogs").iterdir())[0]
    calibrated = clf.predict_proba([f])[0]
    clf.temperature = 1.0
    raw = clf.predict_proba([f])[0]
    assert calibrated.argmax() == raw.argmax()
    if abs(t - 1) > 0.05:
        assert not np.allclose(calibrated, raw, atol=1e-4)


def test_report_renders_in_chromium(evaluated, tmp_path):
    out, _ = evaluated
    copy = tmp_path / "copied_report"
    shutil.copytree(out / "report", copy)  # self-contained: works from a copied folder, offline
    html = (copy / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    with browser_page() as page:
        page.goto((copy / "index.html").as_uri())
        page.wait_for_load_state("load")
        titles = page.eval_on_selector_all("h2", "els => els.map(e => e.innerText)")
        for section in ("Summary", "Per class", "Confusion matrix", "Error gallery", "Calibration", "Grad-CAM",
                        "Label-noise suspects", "Training curves", "Data map"):
            assert any(section in t for t in titles), (section, titles)
        widths = page.eval_on_selector_all("img:not(#map-card img)", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        assert len(widths) >= 8 and min(widths) > 0  # every figure and thumbnail loaded
        body = page.inner_text("body")
        assert "cats" in body and "dogs" in body and "accuracy" in body.lower()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        _hover_map(page, out)
    assert (tmp_path / "report.png").stat().st_size > 50_000


def _hover_map(page, run) -> None:
    """The data map: one point per drawn image, misclassified ones ringed, and
    hovering over a point shows that image's thumbnail and labels."""
    info = json.loads((run / "report" / "eval.json").read_text())
    dm = info["data_map"]
    assert page.locator("#data-map .pt").count() == dm["points"] >= 20
    # Every mistake is drawn (the cap keeps them) and marked.
    assert page.locator("#data-map .pt.wrong").count() == dm["wrong"] == info["errors"]["n_mistakes"]
    assert page.locator("#map-card").is_hidden()
    page.locator("#data-map").scroll_into_view_if_needed()
    for wrong in (True, False):
        # A point no other point covers (the pointer would reach the one on top).
        i = page.evaluate("""w => { for (const e of document.querySelectorAll('#data-map .pt')) {
            if (e.classList.contains('wrong') !== w) continue; const b = e.getBoundingClientRect();
            if (document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2) === e) return e.dataset.i; }
            return null }""", wrong)
        if i is None:
            assert not wrong or dm["wrong"] == 0
            continue
        page.hover(f'#data-map [data-i="{i}"]')
        card = page.locator("#map-card")
        card.wait_for(state="visible", timeout=5000)
        assert page.eval_on_selector("#map-card img", "e => e.complete && e.naturalWidth") > 0
        text = card.inner_text()
        assert ("predicted" in text or "training image" in text) and "/" in text  # labels and the path
        assert ("predicted correctly" in text or "training image" in text) != wrong


@pytest.mark.slow  # `make test-all`: keeps `make test` within ~10 minutes
def test_report_with_ten_classes(tmp_path, tiny):
    """10 classes made from real photos (cats, dogs, ants, bees, and grey,
    upside-down versions of them): every figure renders and the tables hold them."""
    hym = need(DATASETS / "hymenoptera")
    sources = {"cats": tiny / "train" / "cats", "dogs": tiny / "train" / "dogs",
               "ants": hym / "train" / "ants", "bees": hym / "train" / "bees"}
    variants = {"": lambda im: im, "_grey": ImageOps.grayscale, "_upside_down": ImageOps.flip}
    data = tmp_path / "ten"
    n = 0
    for name, src in sources.items():
        files = [f for f in sorted(src.iterdir()) if f.suffix.lower() in (".jpg", ".jpeg")][:10]
        for suffix, fn in variants.items():
            if n == 10:
                break
            d = data / f"{name}{suffix}"
            d.mkdir(parents=True)
            n += 1
            for f in files:
                im = Image.open(f).convert("RGB")
                im.thumbnail((160, 160))
                fn(im).convert("RGB").save(d / f.name)
    assert n == 10
    out = tmp_path / "run"
    run_cli("train", data, "--out", out, "--image-size", "128", "--no-flip-features", "--epochs", "40",
            "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-evaluate")
    run_cli("evaluate", out, "--no-gradcam")
    m = json.loads((out / "eval_test.json").read_text())
    assert len(m["per_class"]) == 10 and "top5_accuracy" in m
    with browser_page() as page:
        page.goto((out / "report" / "index.html").as_uri())
        widths = page.eval_on_selector_all("img:not(#map-card img)", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        assert min(widths) > 0
        rows = page.eval_on_selector_all("table", "els => els.map(e => e.rows.length)")
        assert max(rows) >= 11  # per-class table: header + 10 classes
        _hover_map(page, out)
        legend = page.inner_text(".legend")
        assert all(c in legend for c in ("cats", "ants_grey", "bees", "misclassified"))


def test_compare_runs_side_by_side(evaluated, tmp_path, tiny):
    out, _ = evaluated
    other = tmp_path / "other"
    run_cli("train", tiny, "--out", other, "--head-hidden", "32", "--epochs", "10")
    p = run_cli("compare", out, other)
    assert out.name in p.stdout and other.name in p.stdout and "acc" in p.stdout.lower()
    rows = json.loads(run_cli("compare", out, other, "--json").stdout)
    assert len(rows) == 2 and all(0.5 <= r["accuracy"] <= 1 for r in rows)
