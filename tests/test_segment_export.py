"""A segmentation run exported: one ONNX graph (the resize, the network and
the argmax inside) gated on pixel agreement with PyTorch on val images, its
answers through `imgclf predict` / `evaluate` / `imgclf.load` without torch,
.ort, INT8 behind the mIoU gate, and the web app drawing the label map over
a picture and a camera frame in Chromium. One short run on a few real
CamVid frames, built once for the module."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from PIL import Image

from imgclf.config import EvaluateConfig, ExportConfig, TrainConfig
from imgclf.data.images import open_image
from imgclf.deploy import export_segment
from imgclf.deploy.export import export
from imgclf.deploy.resize_graph import longer_side_model
from imgclf.errors import ConfigError, ExportError
from imgclf.tasks import load, task_of, verbs
from imgclf.tasks.segment.onnx_predictor import OnnxSegPredictor
from imgclf.tasks.segment.predictor import palette
from imgclf.tasks.segment.torch_predictor import TorchSegPredictor

from .browser import browser_page, chromium_path
from .conftest import ROOT
from .test_segment import CAMVID, CLASSES, VOID, _camvid_subset
from .test_web_export import StaticServer

pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/datasets/camvid")


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """Two epochs on 8 CamVid frames at 96 px (a frozen trunk): enough to
    answer several classes; its quality is not the point here."""
    tmp = tmp_path_factory.mktemp("segexport")
    data, run = _camvid_subset(tmp / "cv", 8, 4), tmp / "run"
    verbs("segment").train(TrainConfig(data=str(data), out=str(run), ignore_index=VOID, image_size=96, epochs=2,
                                       seed=0))
    return run


@pytest.fixture(scope="module")
def exported(seg_run):
    report = export(ExportConfig(str(seg_run), check_images=4))
    return seg_run / "model.onnx", report


@pytest.fixture(scope="module")
def images(seg_run) -> list[str]:
    return sorted(str(p) for p in (seg_run.parent / "cv" / "val").glob("*.jpg"))[:3]


def test_export_puts_the_resize_and_argmax_inside_and_matches_pytorch(exported, images):
    """uint8 photos of any size in, a uint8 label map at that size out; the
    gate passed (>= 99.9% of val pixels the class PyTorch gives) and says so."""
    path, r = exported
    g = onnx.load(str(path)).graph
    assert {"Resize", "ArgMax"} <= {n.op_type for n in g.node}
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in g.output] == [onnx.TensorProto.UINT8]
    assert r["task"] == "segment" and r["check_images"] == 4 and r["parity_pixels"] == 4 * 480 * 360
    assert r["parity_pixel_agreement"] >= 0.999 and r["parity_network_agreement"] >= 0.999
    pred = OnnxSegPredictor(path)
    assert pred.classes == CLASSES and pred.image_size == 96 and pred.metadata["ignore_index"] == VOID
    assert pred.metadata["label_resize"] == "nearest" and "nearest neighbour" in pred.metadata["output"]
    assert pred.metadata["palette"] == palette(len(CLASSES)).tolist()
    photo = np.asarray(open_image(images[0]))
    labels = pred.session.run(None, {"images": photo[None]})[0]
    assert labels.shape == (1, 360, 480) and labels.dtype == np.uint8 and labels.max() < len(CLASSES)
    # an odd size and aspect: the TF padding stays computed from the shape
    small = np.asarray(Image.fromarray(photo).resize((131, 47), Image.BILINEAR))
    torch_pred = TorchSegPredictor.from_run(path.parent, device="cpu")
    want = torch_pred.label_maps([torch_pred.prepare(small)[0]], [(131, 47)])[0]
    got = pred.session.run(None, {"images": small[None]})[0][0]
    assert got.shape == (47, 131) and (got == want).mean() >= 0.99


def test_exported_segmenter_predicts_and_evaluates_without_torch(exported, images, seg_run):
    """torch made unimportable: imgclf.load, `imgclf predict` and the server answer from
    the .onnx alone, the run's own masks (pixel for pixel up to the in-graph
    resize's rounding); `imgclf evaluate model.onnx DATA` gives the run's mIoU."""
    path, _ = exported
    want = load(seg_run).predict(images)
    assert isinstance(load(seg_run), TorchSegPredictor)
    data = seg_run.parent / "cv"
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        import imgclf
        got = imgclf.load({str(path)!r}).predict({images!r})
        import numpy as np
        np.save(sys.argv[1], np.stack([g["mask"] for g in got]))
        print("SHARES", json.dumps([g["classes"] for g in got]))
        from imgclf.cli import main
        assert main(["predict", {str(path)!r}, {images[0]!r}, "--format", "csv"]) == 0
        from fastapi.testclient import TestClient
        from imgclf.deploy.serve import ServeConfig, create_app
        with TestClient(create_app(ServeConfig({str(path)!r}))) as c:
            j = c.post("/v1/predict", files={{"file": ("a.jpg", open({images[0]!r}, "rb").read())}}).json()
        import base64, io
        from PIL import Image
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(j["predictions"][0]["mask_png"]))))
        print("SERVED_SAME", float((served == got[0]["mask"]).mean()))
        assert main(["evaluate", {str(path)!r}, {str(data)!r}, "--split", "val"]) == 0
        print("TORCH_FREE_OK", [m for m in ("torch", "torchvision", "timm") if sys.modules.get(m) is not None])
    """)
    masks = seg_run.parent / "masks.npy"
    before = (seg_run / "eval_val.json").read_bytes()
    p = subprocess.run([sys.executable, "-c", code, str(masks)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TORCH_FREE_OK []" in p.stdout and "path,class,pixel_share,error" in p.stdout
    assert float(p.stdout.split("SERVED_SAME ", 1)[1].split()[0]) == 1.0  # `imgclf serve model.onnx`, no torch
    got = np.load(masks)
    for g, w in zip(got, want):
        assert g.shape == w["mask"].shape == (360, 480)
        assert (g == w["mask"]).mean() >= 0.999
    shares = json.loads(p.stdout.split("SHARES ", 1)[1].splitlines()[0])
    assert shares[0].keys() == want[0]["classes"].keys()
    # `imgclf evaluate model.onnx DATA` (above, without torch): scored on onnxruntime, written beside the
    # file, not over the run's
    assert task_of(path) == "segment"
    ev = json.loads((path.parent / "model.onnx-eval" / "eval_val.json").read_text())
    assert (seg_run / "eval_val.json").read_bytes() == before
    ours = verbs("segment").evaluate(EvaluateConfig(run=str(seg_run), data=str(data), split="val", device="cpu",
                                                    report=False))
    assert ev["n"] == ours["n"] == 4 and abs(ev["miou"] - ours["miou"]) < 0.005
    assert (path.parent / "model.onnx-eval" / "report" / "index.html").exists()


def test_a_graph_that_disagrees_is_refused_and_not_written(seg_run, monkeypatch, tmp_path):
    """A graph that resizes to half the size the model was trained at gives
    other classes: the gate names the agreement and writes nothing."""
    monkeypatch.setattr(export_segment, "longer_side_model", lambda size: longer_side_model(size // 2))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"label maps differ from PyTorch's: [\d.]+% of \d+ pixels"):
        export(ExportConfig(str(seg_run), out=str(out), check_images=2))
    assert not out.exists()


def test_what_a_segmenter_cannot_take_says_why(seg_run):
    for fmt in ("tflite", "torchscript"):
        with pytest.raises(ConfigError, match=f"--format {fmt} is not available for a segmentation run"):
            export(ExportConfig(str(seg_run), format=fmt))
    with pytest.raises(ConfigError, match="--reject is for classifiers"):
        export(ExportConfig(str(seg_run), reject="0.9"))
    with pytest.raises(ConfigError, match="always takes images of any size"):
        export(ExportConfig(str(seg_run), any_size=True))


def test_ort_export_answers_as_the_onnx(seg_run, exported, images):
    r = export(ExportConfig(str(seg_run), format="ort", check_images=2))
    assert r["ort_parity_pixel_agreement"] >= 0.999
    ort_pred = load(seg_run / "model.ort")
    assert isinstance(ort_pred, OnnxSegPredictor)
    for a, b in zip(ort_pred.predict(images), load(exported[0]).predict(images)):
        assert (a["mask"] == b["mask"]).mean() >= 0.999


def test_int8_is_gated_on_miou(seg_run, exported, images, tmp_path):
    """INT8 (the trunk's convolutions) is written with its val mIoU beside
    fp32's; a gate tighter than the measured drop refuses it, --force writes it."""
    out = tmp_path / "m.int8.onnx"
    r = export(ExportConfig(str(seg_run), int8=True, max_drop=100, out=str(out), check_images=2, calib_images=4))
    assert out.exists() and OnnxSegPredictor(out).int8
    assert {"fp32_miou", "int8_miou", "miou_change_points", "int8_pixel_agreement_vs_fp32"} <= set(r)
    assert 0 < r["fp32_miou"] <= 1 and 0 <= r["int8_miou"] <= 1 and r["calib_images"] == 4
    # Calibrated at the training frames' size, it pads a portrait photo as fp32 does: the
    # size arithmetic (TF padding) stays float; quantized, it agreed on about 75% of pixels.
    portrait = np.asarray(open_image(images[0]).resize((300, 517)))[None]
    p8, p32 = (OnnxSegPredictor(f).outputs(portrait) for f in (out, seg_run / "model.onnx"))
    assert p8.shape == (1, 517, 300) and (p8 == p32).mean() >= 0.9
    below = -r["miou_change_points"] - 1  # a limit under the measured drop
    strict = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="INT8 mIoU drops by"):
        export(ExportConfig(str(seg_run), int8=True, max_drop=below, out=str(strict), check_images=2,
                            calib_images=4))
    assert not strict.exists()
    export(ExportConfig(str(seg_run), int8=True, max_drop=below, force=True, out=str(strict), check_images=2,
                        calib_images=4))
    assert strict.exists()


def test_web_export_overlays_the_label_map_on_pictures_and_camera_frames(seg_run, exported, images, tmp_path):
    """`--format web` on a segmentation run: a plain static server, Chromium;
    the page's label map is the graph's own (onnxruntime on the full-size
    photo), drawn in the class colours at half opacity over the picture, with
    the class shares listed; a camera frame (Chromium's fake device) is
    segmented and overlaid at its own size."""
    chromium_path()
    out = tmp_path / "web"
    export(ExportConfig(str(seg_run), format="web", out=str(out), check_images=2))
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "segment" and "run_path" not in meta
    photo = np.asarray(open_image(images[0]))
    want = OnnxSegPredictor(exported[0]).session.run(None, {"images": photo[None]})[0][0]
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
            got = page.evaluate("({w: imgclfLast.width, h: imgclfLast.height, labels: Array.from(imgclfLast.labels),"
                                " classes: imgclfLast.classes})")
            labels = np.array(got["labels"], np.uint8).reshape(got["h"], got["w"])
            assert labels.shape == (360, 480) and (labels == want).mean() >= 0.995
            assert [c["label"] for c in got["classes"]][0] == CLASSES[np.bincount(want.ravel()).argmax()]
            assert abs(sum(c["share"] for c in got["classes"]) - 1) < 1e-3
            drawn = np.array(page.evaluate("""() => {
                const c = document.getElementById('boxes');
                return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
            }""")[2], np.float32).reshape(360, 480, 4)[..., :3]
            blend = 0.5 * photo.astype(np.float32) + 0.5 * palette(len(CLASSES))[labels].astype(np.float32)
            assert np.abs(drawn - blend).mean() < 3  # the overlay, up to the browser's JPEG decode
            assert np.abs(drawn - photo).mean() > 10  # not the bare photo
            rows = page.evaluate("Array.from(document.querySelectorAll('#top li')).map((li) => li.textContent)")
            assert len(rows) == len(got["classes"]) and got["classes"][0]["label"] in rows[0]

            page.click("#camera-start")
            page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=20_000)
            page.click("#capture")
            page.wait_for_function("document.getElementById('status').textContent === 'done: camera frame'",
                                   timeout=60_000)
            frame = page.evaluate("[imgclfLast.width, imgclfLast.labels.length, "
                                  "document.getElementById('boxes').width, document.getElementById('video').videoWidth,"
                                  " imgclfLast.classes.reduce((s, c) => s + c.share, 0)]")
            assert frame[0] == frame[2] == frame[3] and frame[1] == frame[0] * page.evaluate("imgclfLast.height")
            assert abs(frame[4] - 1) < 1e-3
    finally:
        server.stop()
