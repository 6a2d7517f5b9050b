"""The detection report from a real short run (BCCD subset, the CLI):
precision-recall curves, the confusion matrix with background, a gallery of
the worst images with true and predicted boxes drawn, class names that look
like TeX kept as text, and a page that needs nothing from the network."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.tasks.detect.figures import STYLE, boxes_thumb
from imgclf.tasks.detect.formats import read_dataset
from tests.conftest import imgclf
from tests.test_detect_data import voc_subset

# WBC and Platelets renamed: "$x$" would render as an italic x, and
# "$\notacmd{$" would crash matplotlib, if labels were read as math text.
NAMES = {"WBC": "$x$", "Platelets": "$\\notacmd{$"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("detreport")
    voc = voc_subset(tmp / "voc", 16)
    for xml in (voc / "Annotations").glob("*.xml"):
        text = xml.read_text()
        for old, new in NAMES.items():
            text = text.replace(f"<name>{old}</name>", f"<name>{new}</name>")
        xml.write_text(text)
    out = tmp / "run"
    imgclf("train", voc, "--out", out, "--epochs", "1", "--image-size", "192", "--val-fraction", "0.2",
           "--test-fraction", "0.25")  # train ends with `evaluate` on the test split: eval_test.json, the report
    return voc, out


@pytest.fixture(scope="module")
def page(run) -> str:
    return (run[1] / "report" / "index.html").read_text()


def _images(html: str, cls: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in
            re.findall(rf'<img class="{cls}" alt="[^"]*" src="data:image/\w+;base64,([^"]+)"', html)]


def test_eval_json_and_confusion_matrix_with_background(run, page):
    voc, out = run
    m = json.loads((out / "eval_test.json").read_text())
    classes = sorted(["RBC", *NAMES.values()])
    assert set(m["ap_per_class"]) == set(classes) and 0 <= m["map"] <= m["map50"] <= 1
    cm = np.array(m["confusion"]["matrix"])
    assert m["confusion"]["labels"] == classes + ["background"] and cm.shape == (4, 4) and cm[3, 3] == 0
    # Each true box is counted once in its class's row: found, confused, or missed (background column).
    ds = read_dataset(voc)
    test = [ds.images[i] for i in range(len(ds.images)) if ds.images[i].path.name in
            {Path(p).name for p in json.loads((out / "splits.json").read_text())["files"]["test"]}]
    assert m["images"] == len(test) > 0
    assert cm[:3].sum(1).tolist() == np.bincount(np.concatenate([im.labels for im in test]), minlength=3).tolist()
    assert m["worst_images"] and all(w["missed"] + w["false_positives"] + w["wrong_class"] > 0
                                     for w in m["worst_images"])
    table = re.search(r'<table class="cm" id="confusion-table">(.*?)</table>', page).group(1)
    assert [int(v) for v in re.findall(r'<td class="n[^"]*">(\d+)</td>', table)] == cm.ravel().tolist()
    assert "<th>background</th>" in table and "<th class=n>background</th>" in table
    assert len(_images(page, "fig")) >= 1  # the matrix as a figure, beside the table


def test_pr_curves_and_tex_like_names_as_text(run, page):
    m = json.loads((run[1] / "eval_test.json").read_text())
    assert m["pr_curves"] and all(len(c["precision"]) == len(c["recall"]) == 101 for c in m["pr_curves"].values())
    (fig,) = _images(page, "fig pr-curves")
    assert fig.width > 300 and fig.height > 200
    assert '<a href="#pr-curves">' in page and "<td>$x$</td>" in page and "<td>$\\notacmd{$</td>" in page


def test_gallery_draws_true_and_predicted_boxes(run, page):
    """Each tile is an image with its true boxes drawn dashed in the found or
    missed colour: sampled along each box's top edge, those colours show."""
    voc, out = run
    m = json.loads((out / "eval_test.json").read_text())
    gallery = page[page.index('id="worst-gallery"'):]
    thumbs = _images(gallery, "")
    assert len(thumbs) == len(m["worst_images"]) > 0
    assert all(f"border:2px {style} {colour}" in page for colour, style in STYLE.values())  # the legend
    by_name = {im.path.name: im for im in read_dataset(voc).images}
    colours = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in (STYLE["found"][0], STYLE["missed"][0])])
    for thumb, w in zip(thumbs, m["worst_images"]):
        im = by_name[Path(w["path"]).name]
        plain = Image.open(io.BytesIO(boxes_thumb(im.path, (im.width, im.height), [], [])))  # nothing drawn
        drawn, bare = (_on_top_edges(t, im.boxes * (t.width / im.width), colours) for t in (thumb, plain))
        # Dashes cover half an edge, predictions drawn over some, JPEG blurs: well above what the bare image has.
        assert drawn > 0.15 and bare < 0.03, (w["path"], drawn, bare)


def _on_top_edges(thumb: Image.Image, boxes: np.ndarray, colours: np.ndarray) -> float:
    """The share of pixels along the boxes' top edges within reach of one of `colours`."""
    px = np.asarray(thumb.convert("RGB"), np.int32)
    rows = [px[min(int(round(b[1])), px.shape[0] - 1), int(b[0]) + 2:int(b[2]) - 1] for b in boxes]
    d = np.abs(np.concatenate(rows)[:, None, :] - colours[None]).sum(-1).min(1)
    return float((d < 90).mean())


def test_page_is_self_contained_and_renders_in_chromium(run, page):
    from tests.browser import browser_page

    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    with browser_page() as p:
        p.goto((run[1] / "report" / "index.html").as_uri())
        sizes = p.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
        assert len(sizes) >= 3 and all(sizes)
        assert "$x$" in p.locator("#confusion-table").inner_text()
