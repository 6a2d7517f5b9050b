"""A detection run deployed: `imgclf export` (the letterbox and NMS inside one
ONNX graph, gated against PyTorch on val images), the exported file predicted
and served without torch, a real server that answers boxes and refuses bad
input, and Chromium drawing the boxes. One short run on a BCCD subset, built
once for the module."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import onnx
import pytest

from imgclf.config import ExportConfig
from imgclf.data.images import open_image
from imgclf.deploy.export import export
from imgclf.errors import ConfigError, ExportError
from imgclf.tasks import load
from imgclf.tasks.detect import export as det_export
from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
from imgclf.tasks.detect.torch_predictor import TorchDetPredictor

from .browser import browser_page, chromium_path
from .conftest import ROOT
from .servers import running_server
from .test_detect_data import voc_subset
from .test_serve_fuzz import _fuzz, _post_json, _post_multipart, _schemathesis, json_bodies, multipart_bodies
from .test_web_export import StaticServer


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A detection run of one epoch on 16 BCCD images at 192 px (enough to
    answer boxes; its quality is not the point here)."""
    from imgclf.cli import main

    tmp = tmp_path_factory.mktemp("detdeploy")
    data = voc_subset(tmp / "bccd", 16)
    run = tmp / "run"
    assert main(["train", str(data), "--out", str(run), "--epochs", "1", "--image-size", "192",
                 "--no-evaluate"]) == 0
    return run


@pytest.fixture(scope="module")
def exported(det_run):
    report = export(ExportConfig(str(det_run), check_images=4))
    return det_run / "model.onnx", report


@pytest.fixture(scope="module")
def images(det_run) -> list[str]:
    return sorted(str(p) for p in (det_run.parent / "bccd" / "JPEGImages").glob("*.jpg"))[:3]


def test_export_puts_letterbox_and_nms_inside_and_matches_pytorch(exported, images):
    """The graph holds the resize and NonMaxSuppression, takes uint8 photos of
    any size, and its detections are PyTorch's: the export's gate passed
    (every detection matched, IoU >= 0.99, scores within 1e-4), and on whole
    photos its boxes land in the photo's own pixels where PyTorch's do."""
    path, r = exported
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Resize", "NonMaxSuppression", "TopK"} <= ops
    assert r["task"] == "detect" and r["parity_detections"] > 0
    assert r["parity_matched"] == r["parity_detections"] and r["parity_missing"] == r["parity_extra"] == 0
    assert r["parity_min_iou"] >= 0.99 and r["parity_max_score_diff"] <= 1e-4
    pred = OnnxDetPredictor(path)
    assert pred.metadata["task"] == "detect" and pred.classes == ["Platelets", "RBC", "WBC"]
    assert len(pred.metadata["thresholds"]) == 3 and pred.metadata["preprocess"]["resize"] == "pad"
    torch_pred = TorchDetPredictor.from_run(path.parent, device="cpu")
    img = open_image(images[0])
    boxes, scores, labels, selected = pred.session.run(None, {"images": np.asarray(img)[None]})
    ref = torch_pred.detect([images[0]], conf=0.1)[0]
    keep = scores[0] >= 0.1
    m = det_export.match((ref["boxes_xyxy"], ref["scores"], ref["labels"]),
                         (boxes[0][keep], scores[0][keep], labels[0][keep]), 0.02, 0.9, 0.1)
    assert m["reference"] > 0 and m["matched"] >= 0.9 * m["reference"], m
    assert boxes[0][keep][:, 2].max() <= img.width and boxes[0][keep][:, 3].max() <= img.height
    assert boxes[0][keep][:, 2].max() > 256  # the photo's pixels, not the 192 px letterbox's
    thr = np.asarray(pred.metadata["thresholds"])
    assert np.array_equal(selected[0], (scores[0] > 0) & (scores[0] >= thr[labels[0]]))


def test_a_graph_that_disagrees_is_refused_and_not_written(det_run, monkeypatch, tmp_path):
    """A graph whose postprocess differs from the model's own (candidates cut
    at 0.3 instead of 0.05) is caught by the gate, which names the figures;
    nothing is written."""
    monkeypatch.setattr(det_export, "CANDIDATE", 0.3)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"detections differ from PyTorch's: \d+ of \d+ detections matched"):
        export(ExportConfig(str(det_run), out=str(out), check_images=4))
    assert not out.exists()


def test_formats_a_detector_cannot_take_say_why(det_run):
    for fmt in ("tflite", "torchscript"):
        with pytest.raises(ConfigError, match=f"--format {fmt} is not available for a detection run"):
            export(ExportConfig(str(det_run), format=fmt))


def test_ort_export_answers_as_the_onnx(det_run, exported, images):
    r = export(ExportConfig(str(det_run), format="ort", check_images=4))
    assert r["ort_parity_matched"] == r["ort_parity_detections"] > 0
    ort_pred, onnx_pred = load(det_run / "model.ort"), load(exported[0])
    assert isinstance(ort_pred, OnnxDetPredictor)
    assert ort_pred.predict(images, conf=0.1) == onnx_pred.predict(images, conf=0.1)


def test_int8_is_gated_on_map(det_run, tmp_path):
    """INT8 (the trunk's convolutions) is written with its val mAP@.5 beside
    fp32's; a gate tighter than the measured drop refuses it."""
    out = tmp_path / "m.int8.onnx"
    r = export(ExportConfig(str(det_run), int8=True, max_drop=100, out=str(out), check_images=4, calib_images=8))
    assert out.exists() and {"fp32_map50", "int8_map50", "calib_images"} <= set(r)
    assert OnnxDetPredictor(out).int8
    drop = r["fp32_map50"] - r["int8_map50"]
    if drop > 0.0005:
        strict = tmp_path / "strict.onnx"
        with pytest.raises(ExportError, match="INT8 mAP@.5 drops"):
            export(ExportConfig(str(det_run), int8=True, max_drop=drop * 100 / 2, out=str(strict), check_images=4,
                                calib_images=8))
        assert not strict.exists()


def test_exported_detector_predicts_and_serves_without_torch(exported, images, det_run):
    """torch made unimportable: imgclf.tasks.load, `imgclf predict` and the app
    answer boxes from the .onnx alone, the same as PyTorch's run directory."""
    path, _ = exported
    want = load(det_run).predict(images, conf=0.2)  # the run directory: PyTorch
    assert isinstance(load(det_run), TorchDetPredictor) and any(w["boxes"] for w in want)
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        from imgclf.tasks import load
        got = load({str(path)!r}).predict({images!r}, conf=0.2)
        print("ANSWERS", json.dumps(got))
        from imgclf.cli import main
        assert main(["predict", {str(path)!r}, {images[0]!r}, "--format", "csv", "--conf", "0.2"]) == 0
        from fastapi.testclient import TestClient
        from imgclf.deploy.serve import ServeConfig, create_app
        with TestClient(create_app(ServeConfig({str(path)!r}))) as c:
            j = c.post("/v1/predict", files={{"file": ("a.jpg", open({images[0]!r}, "rb").read())}}).json()
            assert j["predictions"][0]["width"] == 640 and "boxes" in j["predictions"][0], j
        print("TORCH_FREE_OK", [m for m in ("torch", "torchvision", "timm") if sys.modules.get(m) is not None])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TORCH_FREE_OK []" in p.stdout
    got = json.loads(p.stdout.split("ANSWERS ", 1)[1].splitlines()[0])
    for g, w in zip(got, want):
        assert [b["label"] for b in g["boxes"]] == [b["label"] for b in w["boxes"]]
        assert np.allclose([b["box"] for b in g["boxes"]], [b["box"] for b in w["boxes"]], atol=0.15)
    assert "path,label,score,x1,y1,x2,y2" in p.stdout


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("detserve") / "server.log"
    with running_server(exported[0], log, "--max-files", "4", "--body-timeout-s", "2", torch_free=True) as (url, proc):
        yield url, proc, log
    assert "Traceback" not in log.read_text()


def test_real_server_answers_boxes_and_refuses_bad_input(server, exported, images):
    url = server[0]
    want = OnnxDetPredictor(exported[0]).predict(images[:2])
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/v1/model").json()["task"] == "detect"
        r = c.post("/v1/predict", files=[("file", ("a.jpg", open(images[0], "rb").read())),
                                         ("file", ("b.jpg", open(images[1], "rb").read()))])
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["filename"] for p in preds] == ["a.jpg", "b.jpg"]
        for p, w in zip(preds, want):
            assert (p["width"], p["height"]) == (w["width"], w["height"]) == (640, 480)
            assert p["boxes"] == w["boxes"]
            assert all(0 <= b["box"][0] < b["box"][2] <= 640 and 0 <= b["box"][1] < b["box"][3] <= 480
                       for b in p["boxes"])
        j = c.post("/v1/predict", json={"images": [base64.b64encode(open(images[0], "rb").read()).decode()]})
        assert j.json()["predictions"][0]["boxes"] == want[0]["boxes"]
        bad = c.post("/v1/predict", files={"file": ("x.jpg", b"not an image at all")})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_image"
        many = c.post("/v1/predict", files=[("file", (f"{i}.jpg", b"\xff\xd8\xff")) for i in range(5)])
        assert many.status_code == 413
        assert c.post("/v1/predict", content=b"", headers={"Content-Type": "application/json"}).status_code == 400
        assert c.post("/v1/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        schema = c.get("/openapi.json").json()["components"]["schemas"]
        assert {"Detections", "Detection", "Box", "Predictions"} <= set(schema)


def test_schemathesis_on_the_detector(server):
    _schemathesis(server[0], 50)


def test_hostile_bodies_on_the_detector(server):
    _fuzz(server, multipart_bodies(), _post_multipart, 30)
    _fuzz(server, json_bodies(), _post_json, 30)


def test_page_draws_the_boxes(server, images):
    """Chromium: the served page draws each answered box on the picture; the
    canvas's pixels where a box's edge runs are the class's colour."""
    chromium_path()
    url = server[0]
    with httpx.Client(base_url=url, timeout=60) as c:
        answer = c.post("/v1/predict", files={"file": ("a.jpg", open(images[0], "rb").read())}).json()["predictions"][0]
    assert answer["boxes"]
    with browser_page() as page:
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.locator("#model-info", has_text="3 classes").wait_for()
        page.set_input_files("#file", [images[0]])
        card = page.locator("#results .card[data-drawn='true']").first
        card.wait_for(timeout=30_000)
        assert card.get_attribute("data-boxes") == str(len(answer["boxes"]))
        b = answer["boxes"][0]
        colour = page.evaluate("""(b) => {
            const c = document.querySelector('#results canvas.boxes');
            const x = Math.round((b.box[0] + b.box[2]) / 2), y = Math.round(b.box[1]);
            const px = c.getContext('2d').getImageData(x, y, 1, 1).data;
            return [c.width, c.height, Array.from(px.slice(0, 3))];
        }""", b)
        assert colour[:2] == [640, 480]
        palette = {"Platelets": (0xe6, 0x19, 0x4b), "RBC": (0x3c, 0xb4, 0x4b), "WBC": (0x43, 0x63, 0xd8)}
        # An edge of the best box (or of an overlapping box drawn after it): a class's colour, not the photo's.
        assert min(np.abs(np.array(colour[2]) - p).max() for p in palette.values()) <= 40, colour
        assert not errors


def test_web_export_draws_the_boxes_on_pictures_and_camera_frames(det_run, exported, images, tmp_path):
    """`--format web` on a detection run: a plain static server, Chromium; the
    page's boxes are the graph's own (onnxruntime on the full-size photo, its
    `selected` rows) and are drawn on the picture; a camera frame (Chromium's
    fake device) goes through the same graph and is drawn at its own size."""
    chromium_path()
    out = tmp_path / "web"
    export(ExportConfig(str(det_run), format="web", out=str(out)))
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "detect" and "run_path" not in meta
    sess = OnnxDetPredictor(exported[0]).session
    b, s, lab, sel = sess.run(None, {"images": np.asarray(open_image(images[0]))[None]})
    want = [(meta["classes"][int(c)], float(sc), bx.tolist()) for bx, sc, c, on in zip(b[0], s[0], lab[0], sel[0]) if on]
    assert want, "the check photo should have answered boxes"
    server = StaticServer(out)
    try:
        with browser_page(extra_args=("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")) as page:
            page.goto(server.url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')",
                                   timeout=60_000)
            page.set_input_files("#file", [images[0]])
            name = images[0].rsplit("/", 1)[1]
            page.wait_for_function("(n) => document.getElementById('status').textContent === 'done: ' + n",
                                   arg=name, timeout=60_000)
            got = page.evaluate("window.imgclfLast")
            assert [g["label"] for g in got["boxes"]] == [w[0] for w in want]
            assert np.allclose([g["box"] for g in got["boxes"]], [w[2] for w in want], atol=1.0)
            assert np.allclose([g["score"] for g in got["boxes"]], [w[1] for w in want], atol=1e-3)
            assert page.evaluate("document.body.dataset.drawn") == str(len(want))
            edge = page.evaluate("""(b) => {
                const c = document.getElementById('boxes');
                const px = c.getContext('2d').getImageData(Math.round((b[0] + b[2]) / 2), Math.round(b[1]), 1, 1).data;
                return [c.width, c.height, Array.from(px.slice(0, 3))];
            }""", want[0][2])
            assert edge[:2] == [640, 480]
            palette = [(0xe6, 0x19, 0x4b), (0x3c, 0xb4, 0x4b), (0x43, 0x63, 0xd8)]
            assert min(np.abs(np.array(edge[2]) - p).max() for p in palette) <= 40, edge

            page.click("#camera-start")
            page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20_000)
            page.click("#capture")
            page.wait_for_function("document.getElementById('status').textContent === 'done: camera frame'",
                                   timeout=60_000)
            frame = page.evaluate("[window.imgclfLast.width, window.imgclfLast.height, "
                                  "document.getElementById('boxes').width, document.body.dataset.drawn]")
            assert frame[0] == frame[2] == page.evaluate("document.getElementById('video').videoWidth")
            assert frame[3] == str(len(page.evaluate("window.imgclfLast.boxes")))
    finally:
        server.stop()
