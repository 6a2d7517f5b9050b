"""`imgclf serve` for a semantic segmentation run, on a real uvicorn: the
label map comes back as a PNG at the image's own size with only the model's
class ids, the shares are the map's, bad input gets the errors a classifier's
server gives, Schemathesis and the Hypothesis generators hold the answers to
the schema, a 12 MP photo stays in bounded memory, and Chromium lays the
mask over pictures and camera frames. One tiny run on CamVid frames, built
once for the module."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from imgclf.tasks import load
from imgclf.tasks.segment.torch_predictor import MAX_LOGIT_BYTES, logit_size

from .browser import browser_page, chromium_path
from .servers import memory_mb, running_server
from .test_segment import CAMVID, CLASSES, _camvid_subset
from .test_serve_fuzz import _fuzz, _post_json, _post_multipart, _schemathesis, json_bodies, multipart_bodies

pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/datasets/camvid")
MAX_PIXELS = 13_000_000  # a 12 MP photo is served; a 16 MP one is refused


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """One epoch on 8 CamVid frames at 96 px: enough to answer label maps
    (their quality is test_segment.py's business)."""
    from imgclf.cli import main

    tmp = tmp_path_factory.mktemp("segserve")
    data, run = _camvid_subset(tmp / "cv", 8, 4), tmp / "run"
    assert main(["train", str(data), "--out", str(run), "--ignore-index", "11", "--image-size", "96",
                 "--epochs", "1", "--no-evaluate"]) == 0
    return run


@pytest.fixture(scope="module")
def images(seg_run, tmp_path_factory) -> list[str]:
    """Two CamVid frames (480x360) and one re-encoded at an odd size and aspect (PNG, 217x301)."""
    frames = sorted(str(p) for p in (seg_run.parent / "cv" / "val").glob("*.jpg"))[:2]
    odd = tmp_path_factory.mktemp("odd") / "portrait.png"
    Image.open(frames[0]).resize((217, 301)).save(odd)
    return [*frames, str(odd)]


@pytest.fixture(scope="module")
def server(seg_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("segserve-log") / "server.log"
    with running_server(seg_run, log, "--max-files", "4", "--max-pixels", str(MAX_PIXELS),
                        "--body-timeout-s", "2") as (url, proc):
        yield url, proc, log
    assert "Traceback" not in log.read_text()


def _mask(answer: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["mask_png"], validate=True)))


def test_real_server_answers_a_full_size_label_map_and_its_class_shares(server, seg_run, images):
    url = server[0]
    want = load(seg_run, device="cpu").predict(images)
    with httpx.Client(base_url=url, timeout=60) as c:
        model = c.get("/v1/model").json()
        assert model["task"] == "segment" and model["classes"] == CLASSES and model["resize"] == "longer_side"
        r = c.post("/v1/predict", files=[("file", (f"{i}{p[-4:]}", open(p, "rb").read())) for i, p in enumerate(images)])
        assert r.status_code == 200, r.text
        j = r.json()
        assert [e["name"] for e in j["legend"]] == CLASSES == model["classes"] and j["model_ms"] > 0
        for p, path, w in zip(j["predictions"], images, want):
            mask = _mask(p)
            assert mask.format == "PNG" and mask.mode == "P"
            assert mask.size == Image.open(path).size == (p["width"], p["height"])
            ids = np.asarray(mask)
            assert set(np.unique(ids)) <= set(range(len(CLASSES)))
            # The PNG's palette is the legend's colours: viewers and the page show what the legend says.
            pal = np.array(mask.getpalette()[:3 * len(CLASSES)]).reshape(-1, 3)
            assert ["#" + bytes(int(v) for v in rgb).hex() for rgb in pal] == [e["color"] for e in j["legend"]]
            counts = np.bincount(ids.ravel(), minlength=len(CLASSES))
            assert p["classes"] == {c: round(n / ids.size, 6) for c, n in zip(CLASSES, counts) if n}
            assert abs(sum(p["classes"].values()) - 1) < 1e-4
            assert (ids == w["mask"]).mean() > 0.999  # what `imgclf predict` answers for the same image
        assert [p["filename"] for p in j["predictions"]] == ["0.jpg", "1.jpg", "2.png"]
        b64 = c.post("/v1/predict", json={"images": [base64.b64encode(open(images[2], "rb").read()).decode()]})
        assert np.array_equal(np.asarray(_mask(b64.json()["predictions"][0])), np.asarray(_mask(j["predictions"][2])))
        sim = c.post("/v1/similar", files={"file": ("a.jpg", open(images[0], "rb").read())})
        assert sim.status_code == 404 and sim.json()["error"]["code"] == "similar_unavailable"
        assert "not for this task (segment)" in sim.json()["error"]["message"]
        assert "not for this task" in model["similar"]["why_not"]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_gets_the_errors_a_classifier_gives(server, images):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        bad = c.post("/v1/predict", files={"file": ("x.jpg", b"not an image at all")})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_image"
        assert bad.json()["error"]["images"][0]["filename"] == "x.jpg"
        big = c.post("/v1/predict", files={"file": ("big.png", _png(4000, 4000))})
        assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_large"
        assert "4000x4000" in big.json()["error"]["message"]
        many = c.post("/v1/predict", files=[("file", (f"{i}.jpg", open(images[0], "rb").read())) for i in range(5)])
        assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_files"
        assert c.post("/v1/predict", content=b"", headers={"Content-Type": "application/json"}).status_code == 400
        assert c.post("/v1/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        assert c.post("/v1/predict?top_k=0", files={"file": ("a.jpg", open(images[0], "rb").read())}).status_code == 400
        assert c.post("/v1/predict", files={"file": ("a.jpg", open(images[0], "rb").read())}).status_code == 200
        strip = c.post("/v1/predict", files={"file": ("strip.png", _png(1, 2000))})  # odd shapes: answered, never a 500
        assert strip.status_code == 200 and _mask(strip.json()["predictions"][0]).size == (1, 2000)


@pytest.mark.parametrize("w,h,classes", [(4000, 3000, 11), (1, 39_000_000, 11), (39_000_000, 1, 11),
                                         (2, 6_000_000, 150)])
def test_logits_stay_within_their_budget_at_any_shape(w, h, classes):
    """Logits are resized to the image only within MAX_LOGIT_BYTES, whatever
    its aspect: a thin strip must not escape the budget by rounding its
    narrow side up to one pixel; the aspect is kept where both sides allow."""
    lh, lw = logit_size(w, h, classes)
    assert 4 * classes * lh * lw <= MAX_LOGIT_BYTES and 1 <= lh <= h and 1 <= lw <= w
    if min(w, h) > 100:
        assert abs(lw / lh - w / h) < 0.01
    assert logit_size(480, 360, 11) == (360, 480)  # a CamVid frame: logits at its own size


def test_a_12_megapixel_photo_is_answered_in_bounded_memory(server, images, tmp_path):
    """The label map of a 4000x3000 photo, at that size: the logits are not
    resized to 12 MP (11 classes: 530 MB of floats); the server's peak
    memory grows by far less."""
    url, proc, _ = server
    photo = tmp_path / "big.jpg"
    Image.open(images[0]).resize((4000, 3000), Image.BILINEAR).save(photo, quality=90)
    before = memory_mb(proc.pid)["VmHWM"]
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/predict", files={"file": ("big.jpg", photo.read_bytes())})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert _mask(p).size == (4000, 3000) and abs(sum(p["classes"].values()) - 1) < 1e-4
    assert memory_mb(proc.pid)["VmHWM"] - before < 300


def test_schemathesis_on_the_segmenter(server):
    _schemathesis(server[0], 50)


def test_hostile_bodies_on_the_segmenter(server):
    _fuzz(server, multipart_bodies(), _post_multipart, 30)
    _fuzz(server, json_bodies(), _post_json, 30)


def _overlay_check(page, answer: dict, photo: np.ndarray, legend: list[dict]) -> None:
    """Pixels of the card's canvas: half the photo, half the colour of the class the label map gives there."""
    ids = np.asarray(_mask(answer))
    h, w = ids.shape
    points = [(int(x), int(y)) for x, y in zip(np.linspace(5, w - 6, 7), np.linspace(5, h - 6, 7))]
    got = page.evaluate("""(pts) => {
        const c = document.querySelector('#results canvas.mask');
        const ctx = c.getContext('2d');
        return [c.width, c.height, pts.map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)))];
    }""", points)
    assert got[:2] == [w, h]
    colours = {e["id"]: np.array(list(bytes.fromhex(e["color"][1:])), float) for e in legend}
    for (x, y), px in zip(points, got[2]):
        want = 0.5 * photo[y, x] + 0.5 * colours[int(ids[y, x])]
        assert np.abs(np.array(px) - want).max() <= 8, ((x, y), px, want)


def test_page_overlays_the_mask_on_pictures_and_camera_frames(server, images):
    """Chromium: the served page lays the label map (the legend's colours, at
    half opacity) over the picture and lists each class's share; a camera
    frame (Chromium's fake device) is answered and drawn the same way."""
    chromium_path()
    url = server[0]
    with httpx.Client(base_url=url, timeout=60) as c:
        j = c.post("/v1/predict", files={"file": ("a.png", open(images[2], "rb").read())}).json()
    answer, legend = j["predictions"][0], j["legend"]
    fake_camera = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    with browser_page(extra_args=fake_camera) as page:
        errors, console = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: console.append(m.text))
        page.goto(url + "/")
        page.locator("#model-info", has_text="11 classes").wait_for()
        page.set_input_files("#file", [images[2]])
        card = page.locator("#results .card[data-drawn='true']").first
        card.wait_for(timeout=30_000)
        assert card.get_attribute("data-classes") == str(len(answer["classes"]))
        shares = card.locator(".bar.share")
        assert shares.count() == len(answer["classes"])
        best = max(answer["classes"], key=answer["classes"].get)
        assert shares.first.locator(".cls").inner_text() == best
        _overlay_check(page, answer, np.asarray(Image.open(images[2]).convert("RGB"), float), legend)

        page.click("#camera-start")
        page.locator("#camera:not([hidden])").wait_for(timeout=20_000)
        page.locator("#video").evaluate("v => new Promise((ok) => v.videoWidth ? ok() : v.addEventListener("
                                        "'loadeddata', () => ok(), {once: true}))")
        size = page.locator("#video").evaluate("v => [v.videoWidth, v.videoHeight]")
        page.click("#capture")
        frame = page.locator("#results .card[data-drawn='true']").nth(1)
        frame.wait_for(timeout=30_000)
        first = page.locator("#results .card").first  # the newest card comes first
        assert first.locator(".name").inner_text() == "camera frame.jpg"
        assert first.locator("canvas.mask").evaluate("c => [c.width, c.height]") == size
        assert first.locator(".bar.share").count() >= 1
        page.click("#camera-stop")
        assert not errors, errors
    assert not [m for m in console if "Content Security Policy" in m], console
