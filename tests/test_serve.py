"""`imgclf serve`: every endpoint, the API key, micro-batching, and each bad
input with its status code, against a real exported model (FastAPI TestClient)."""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_export import export_once, val_images

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def onnx_path(tiny_run, tmp_path_factory) -> Path:
    return export_once(tiny_run, tmp_path_factory)[0]


@pytest.fixture(scope="module")
def client(onnx_path):
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    cfg = ServeConfig(str(onnx_path), api_key=KEY, max_body_mb=2.0, max_files=4, max_pixels=400_000)
    with TestClient(create_app(cfg), headers={"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def imgs(tiny) -> dict[str, list[bytes]]:
    return {c: [p.read_bytes() for p in ps] for c, ps in val_images(tiny, 3).items()}


def error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert e["code"] == code and e["message"], e
    return e


def png(w: int, h: int, noise: bool = False) -> bytes:
    a = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_predict_multipart(client, imgs):
    files = [("file", (f"cat{i}.jpg", b, "image/jpeg")) for i, b in enumerate(imgs["cats"][:2])]
    files.append(("other", ("dog.jpg", imgs["dogs"][0], "application/octet-stream")))  # any field name, any type
    r = client.post("/v1/predict", files=files, data={"top_k": "1"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == ["cat0.jpg", "cat1.jpg", "dog.jpg"]
    assert [p["label"] for p in preds] == ["cats", "cats", "dogs"]
    assert all(len(p["top"]) == 1 and 0.5 < p["score"] <= 1 for p in preds)


def test_predict_json_base64(client, imgs):
    b64 = [base64.b64encode(imgs["dogs"][1]).decode(), "data:image/jpeg;base64," + base64.b64encode(imgs["cats"][2]).decode()]
    r = client.post("/v1/predict?top_k=2", json={"images": b64})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["dogs", "cats"]
    assert all(len(p["top"]) == 2 and abs(sum(t["score"] for t in p["top"]) - 1) < 1e-4 for p in preds)


def test_model_health_metrics_docs(client):
    m = client.get("/v1/model").json()
    assert m["classes"] == ["cats", "dogs"] and m["input_size"] == 208 and m["format"] == "onnx"
    assert m["metrics"]["accuracy"] >= 0.8 and m["versions"]["imgclf"] and m["versions"]["onnxruntime"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/model" in spec["paths"]
    text = client.get("/metrics").text
    for name in ("imgclf_requests_total", "imgclf_request_duration_seconds_bucket", "imgclf_batch_size_bucket",
                 "imgclf_errors_total", "imgclf_images_total"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    assert 'imgclf_requests_total{method="GET",path="/v1/model",status="200"}' in text


def test_page_and_local_assets(client):
    html = client.get("/")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert "/static/app.js" in html.text and "http" not in html.text.replace("http-equiv", "")  # no CDN
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    error(client.get("/static/..%2Fserve.py"), 404, "not_found")
    error(client.get("/static/secrets.txt"), 404, "not_found")


def test_api_key(client, imgs):
    from fastapi.testclient import TestClient

    anon = TestClient(client.app)  # same running app, no default key header
    error(anon.post("/v1/predict", files={"file": ("a.jpg", imgs["cats"][0])}), 401, "missing_api_key")
    error(anon.post("/v1/predict", files={"file": ("a.jpg", imgs["cats"][0])}, headers={"X-API-Key": "nope"}),
          401, "wrong_api_key")
    error(anon.get("/v1/model", headers={"Authorization": "Bearer nope"}), 401, "wrong_api_key")
    r = anon.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert anon.get("/healthz").status_code == 200  # probes stay open


def test_bad_inputs_then_still_right(client, imgs, monkeypatch, tmp_path):
    # Nothing may be spooled to a temp file: point tempfile at an empty folder and check it stays empty.
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    cat = imgs["cats"][0]
    post = client.post

    e = error(post("/v1/predict", files={"file": ("cv.pdf", b"%PDF-1.4 not an image at all")}), 422, "bad_image")
    assert "not an image" in e["message"] and e["images"][0]["filename"] == "cv.pdf"
    e = error(post("/v1/predict", files={"file": ("x.jpg", b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)}), 422, "bad_image")
    assert "cat.jpg" not in e["message"]
    e = error(post("/v1/predict", files={"file": ("half.jpg", cat[:len(cat) // 2])}), 422, "bad_image")
    assert "truncated" in e["message"]
    # one bad file among good ones: the whole request is refused, naming the bad one
    e = error(post("/v1/predict", files=[("file", ("ok.jpg", cat)), ("file", ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 9))]),
              422, "bad_image")
    assert [x["index"] for x in e["images"]] == [1]
    e = error(post("/v1/predict", files={"file": ("big.png", png(1000, 1000))}), 413, "image_too_large")
    assert "1000x1000" in e["message"]
    e = error(post("/v1/predict", files={"file": ("huge.png", png(900, 900, noise=True))}), 413, "body_too_large")
    error(post("/v1/predict", content=(b"x" * 65536 for _ in range(40)),  # chunked: no Content-Length
               headers={"Content-Type": "application/json"}), 413, "body_too_large")
    e = error(post("/v1/predict", files=[("file", (f"{i}.jpg", cat)) for i in range(5)]), 413, "too_many_files")
    assert "4" in e["message"]
    error(post("/v1/predict", json={"images": [base64.b64encode(cat).decode()] * 5}), 413, "too_many_files")
    error(post("/v1/predict", content=b"", headers={"Content-Type": "application/json"}), 400, "empty_request")
    error(post("/v1/predict", files=[("top_k", (None, "2"))]), 400, "empty_request")  # multipart, no file part
    error(post("/v1/predict", json={"images": []}), 400, "empty_request")
    error(post("/v1/predict", json={"images": ["@@not base64@@"]}), 400, "bad_base64")
    error(post("/v1/predict", content=b"{oops", headers={"Content-Type": "application/json"}), 400, "bad_json")
    error(post("/v1/predict", content=cat, headers={"Content-Type": "image/jpeg"}), 415, "unsupported_media_type")
    error(post("/v1/predict?top_k=0", files={"file": ("a.jpg", cat)}), 400, "bad_top_k")
    error(client.get("/v1/nothing"), 404, "not_found")
    error(client.get("/v1/predict"), 405, "method_not_allowed")
    assert list(spool.iterdir()) == []

    # ...and the server still answers, correctly.
    assert client.get("/readyz").status_code == 200
    r = post("/v1/predict", files=[("file", ("c.jpg", cat)), ("file", ("d.jpg", imgs["dogs"][2]))])
    assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == ["cats", "dogs"]
    m = client.get("/metrics").text
    assert 'imgclf_errors_total{code="bad_image"} 4.0' in m and 'imgclf_errors_total{code="too_many_files"} 2.0' in m


def test_micro_batching():
    """Images from concurrent requests share one model call, up to max_batch."""
    from imgclf.deploy.serve.batching import Batcher
    from imgclf.deploy.serve.metrics import Metrics

    calls: list[int] = []

    def model(x):
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2].astype(np.float32)

    async def main():
        b = Batcher(model, max_batch=4, wait_s=0.05, metrics=Metrics())
        b.start()
        xs = [np.full((2, 2, 3), i, np.uint8) for i in range(6)]
        outs = await asyncio.gather(*(b([x]) for x in xs))  # six "requests" at once
        late = await b([xs[0]])  # alone: waits wait_s, then runs a batch of one
        await b.stop()
        return outs, late, b.metrics

    outs, late, metrics = asyncio.run(main())
    assert calls == [4, 2, 1]
    assert [int(o[0][0]) for o in outs] == list(range(6))  # each request gets its own row back
    text = metrics.render().decode()
    assert "imgclf_images_total 7.0" in text and "imgclf_batch_size_count 3.0" in text


def test_internal_errors_are_json_500s_and_counted(onnx_path, imgs, caplog):
    """A failure inside the model (here: the model function raising, as a
    broken runtime would) is a JSON 500, counted in the metrics, logged once;
    the server keeps answering."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(str(onnx_path)))) as c:
        st = c.app.state.imgclf
        good = st.batcher.fn

        def broken(x):
            raise RuntimeError("onnxruntime failed")

        st.batcher.fn = broken
        error(c.post("/v1/predict", files={"file": ("a.jpg", imgs["cats"][0])}), 500, "internal")
        st.batcher.fn = good
        assert c.post("/v1/predict", files={"file": ("a.jpg", imgs["cats"][0])}).status_code == 200
        m = c.get("/metrics").text
    assert 'imgclf_requests_total{method="POST",path="/v1/predict",status="500"} 1.0' in m
    assert 'imgclf_errors_total{code="internal"} 1.0' in m
    assert "onnxruntime failed" in caplog.text


def test_metrics_need_the_key_unless_public(onnx_path):
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(str(onnx_path), api_key=KEY))) as c:
        error(c.get("/metrics"), 401, "missing_api_key")
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
    with TestClient(create_app(ServeConfig(str(onnx_path), api_key=KEY, public_metrics=True))) as c:
        assert c.get("/metrics").status_code == 200


def test_small_http_refusals(client, imgs):
    """Compressed bodies, giant boundaries and thousand-digit numbers get the
    right code and a message that quotes nothing from the server's internals."""
    import gzip
    import json

    cat = imgs["cats"][0]
    body = json.dumps({"images": [base64.b64encode(cat).decode()]}).encode()
    for coding, data in (("gzip", gzip.compress(body)), ("deflate", body)):
        e = error(client.post("/v1/predict", content=data, headers={"Content-Type": "application/json",
                                                                     "Content-Encoding": coding}),
                  415, "unsupported_content_encoding")
        assert "Content-Encoding" in e["message"]
    boundary = "b" * 300  # python-multipart refuses over 256: once a 500 and a logged traceback
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n").encode() \
        + cat + f"\r\n--{boundary}--\r\n".encode()
    error(client.post("/v1/predict", content=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}),
          400, "bad_multipart")
    big = b'{"images": ["%s"], "top_k": %s}' % (base64.b64encode(cat), b"9" * 5000)
    r = client.post("/v1/predict", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 2, r.text[:300]  # all classes
    wrapped = base64.encodebytes(cat).decode()  # 76-character lines, as `base64` without -w0 writes them
    assert "line breaks" in error(client.post("/v1/predict", json={"images": [wrapped]}), 400, "bad_base64")["message"]
    neg = client.post("/v1/predict", content=big.replace(b": 9", b": -9"), headers={"Content-Type": "application/json"})
    assert "set_int_max_str_digits" not in error(neg, 400, "bad_top_k")["message"]


def test_api_key_is_compared_as_raw_bytes(onnx_path):
    """A non-ASCII key works when the client sends its UTF-8 bytes (Starlette
    decodes headers as latin-1, so comparing str never matched)."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    key = "clé-ü-ключ"
    with TestClient(create_app(ServeConfig(str(onnx_path), api_key=key))) as c:
        assert c.get("/v1/model", headers={"X-API-Key": key.encode()}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": b"Bearer " + key.encode()}).status_code == 200
        error(c.get("/v1/model", headers={"X-API-Key": "cle-u-kljuch"}), 401, "wrong_api_key")


@pytest.mark.parametrize("given, env, fails", [
    ("", {}, "empty"), ("   ", {}, "empty"), (None, {"IMGCLF_API_KEY": ""}, "empty"),
    (" key ", {}, "surrounding spaces"), ("ke\ny", {}, "control"), (None, {"IMGCLF_API_KEY": "ok-key"}, None)])
def test_api_keys_that_could_never_work_are_refused(given, env, fails, capsys):
    from imgclf.deploy.serve import checked_api_key
    from imgclf.errors import ConfigError

    if fails is None:
        assert checked_api_key(given, env) == "ok-key" and "warning" not in capsys.readouterr().err
        return
    with pytest.raises(ConfigError, match=fails):
        checked_api_key(given, env)


def test_api_key_on_the_command_line_is_warned_about(caplog):
    from imgclf.deploy.serve import checked_api_key

    with caplog.at_level("WARNING", logger="imgclf"):
        assert checked_api_key("k3y", {}) == "k3y"
        assert checked_api_key(None, {"IMGCLF_API_KEY": "k3y"}) == "k3y"
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # the environment variable is not warned about
    assert "IMGCLF_API_KEY" in caplog.records[0].getMessage()


def test_no_server_paths_in_answers(tiny_run, tmp_path, imgs):
    """/v1/similar neighbours and the reasons it is unavailable never show an
    absolute server path or an exception string."""
    import json
    import shutil

    from fastapi.testclient import TestClient

    from imgclf.data_engine.similar import SimilarityIndex
    from imgclf.deploy.serve import ServeConfig, create_app

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    query = {"images": [base64.b64encode(imgs["cats"][0]).decode()]}
    with TestClient(create_app(ServeConfig(str(run)))) as c:  # builds RUN/similar.npz
        assert c.post("/v1/similar?k=2", json=query).status_code == 200
    index = SimilarityIndex.load(run / "similar.npz")  # as a run trained from a CSV of absolute paths has it
    root = json.loads((run / "splits.json").read_text())["root"]
    index.paths = [f"{root}/{p}" for p in index.paths]
    (run / "similar.npz").write_bytes(index.to_bytes())
    with TestClient(create_app(ServeConfig(str(run)))) as c:
        nbs = c.post("/v1/similar?k=5", json=query).json()["results"][0]["neighbours"]
        assert all(not n["path"].startswith("/") and n["path"].endswith(".jpg") for n in nbs), nbs
    splits = json.loads((run / "splits.json").read_text())
    splits["root"] = str(tmp_path / "moved-away")  # the training images are gone: no index can be built
    (run / "splits.json").write_text(json.dumps(splits))
    (run / "similar.npz").unlink()
    with TestClient(create_app(ServeConfig(str(run)))) as c:
        why = c.get("/v1/model").json()["similar"]["why_not"]
        e = error(c.post("/v1/similar", json=query), 404, "similar_unavailable")
        assert c.post("/v1/predict", json=query).status_code == 200  # predictions still work
    for text in (why, e["message"]):
        assert str(tmp_path) not in text and "/work" not in text and "Errno" not in text, text


def _crafted_onnx(path: Path, classes, fail_at_run: bool = False, width="2") -> Path:
    """A small hand-made graph with imgclf's metadata: (N, 8, 8, 3) uint8 ->
    'probs' (N, 2), or a Reshape that cannot run; `width` is the declared
    output width ("2", or a symbolic name)."""
    import json

    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0)]
    if fail_at_run:
        nodes.append(helper.make_node("Reshape", ["m", "bad_shape"], ["probs"]))
    else:
        nodes += [helper.make_node("Slice", ["m", "starts", "ends", "slice_axes"], ["s"]),
                  helper.make_node("Softmax", ["s"], ["probs"], axis=1)]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("bad_shape", TensorProto.INT64, [2], [1, 5]),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [2]),
             helper.make_tensor("slice_axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "crafted", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", 8, 8, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                             ["n", int(width) if width.isdigit() else width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = {"format": "imgclf-onnx-1", "classes": json.dumps(classes), "arch": "crafted",
            "preprocess": json.dumps({"size": 8, "resize": "squash", "crop_pct": 1.0, "mean": [0.5] * 3,
                                      "std": [0.5] * 3, "interpolation": "bilinear", "pad_color": [0, 0, 0]})}
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("classes, fail_at_run, width, why", [
    (["a", "b", "c", "d", "e"], False, "2", "scores 2 classes but its metadata names 5"),
    ([], False, "2", "non-empty list"),
    (["a", "b"], True, "2", "fails on a blank")])
def test_crafted_onnx_is_refused_never_served(tmp_path, classes, fail_at_run, width, why):
    """Once: 5 names on a 2-output graph were served mislabelled, classes=[]
    was an IndexError, and a graph failing at run time was 'ready' and then a
    500 on every request. Now the load in the background fails: the app says
    so on /readyz and every /v1 route (503 load_failed, the reason without
    server paths) while /healthz still answers; `imgclf serve` stops with the
    reason (no restart would fix the file)."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    from .conftest import imgclf
    from .servers import free_port

    model = _crafted_onnx(tmp_path / "m.onnx", classes, fail_at_run, width)
    with TestClient(create_app(ServeConfig(str(model)))) as c:
        assert c.get("/healthz").status_code == 200
        e = error(c.get("/readyz"), 503, "load_failed")
        assert why in e["message"] and "m.onnx" in e["message"] and str(tmp_path) not in e["message"], e
        error(c.post("/v1/predict", json={"images": ["aGVsbG8="]}), 503, "load_failed")
    p = imgclf("serve", model, "--port", str(free_port()), check=False, timeout=120)
    assert p.returncode == 2 and "m.onnx" in p.stderr and why in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "imgclf serve:" not in p.stdout  # no banner: it is printed once the model is ready


def test_crafted_onnx_baseline_loads(tmp_path):
    """The same hand-made graph with matching metadata loads and answers: the refusals above are about the defects."""
    from imgclf.inference.load import load

    pred = load(str(_crafted_onnx(tmp_path / "ok.onnx", ["a", "b"])))
    pred.self_check()
    assert pred.classes == ["a", "b"]


def test_junk_tflite_and_external_data_onnx_messages(tmp_path, onnx_path):
    """A file with the TFL3 identifier and junk after it is named without a
    raw struct error; an ONNX whose weights live in a missing external file
    carries onnxruntime's reason."""
    import onnx

    from imgclf.errors import ModelFileError
    from imgclf.inference.litert_predictor import read_metadata

    pytest.importorskip("ai_edge_litert")
    with pytest.raises(ModelFileError) as e:
        read_metadata(b"\x10\x00\x00\x00TFL3" + b"\xff" * 40, "junk.tflite")
    msg = str(e.value)  # once: "... (error: unpack_from requires a buffer of at least 1094795585 bytes ...)"
    assert "junk.tflite" in msg and "unpack" not in msg and "error:" not in msg and "damaged" in msg, msg
    model = onnx.load(str(onnx_path))
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    (tmp_path / "ext.onnx.data").unlink()
    from imgclf.inference.load import load

    with pytest.raises(ModelFileError) as e:
        load(str(ext))
    assert "ext.onnx" in str(e.value) and "ext.onnx.data" in str(e.value), str(e.value)


def test_similar_is_off_on_an_open_address_without_a_key(tiny_run):
    """/v1/similar returns training images: served on 0.0.0.0 without an API
    key it is off unless asked for, and says how to turn it on."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(str(tiny_run[0]), host="0.0.0.0"))) as c:
        e = error(c.post("/v1/similar", json={"images": ["aGVsbG8="]}), 404, "similar_unavailable")
        assert "--api-key" in e["message"] and "--similar" in e["message"]
        assert c.get("/v1/model").json()["similar"]["available"] is False
    from imgclf.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", str(tiny_run[0]), "--no-similar", "--similar-per-minute", "0"])
    cfg = config_from_args(args.cls, args)  # the flags as the command line gives them
    assert cfg.similar is False and cfg.similar_per_minute == 0
    with TestClient(create_app(cfg)) as c:  # on loopback, where it would otherwise be on
        assert "--no-similar" in c.get("/v1/model").json()["similar"]["why_not"]
        e = error(c.post("/v1/similar", json={"images": ["aGVsbG8="]}), 404, "similar_unavailable")
        assert "--no-similar" in e["message"]


def _png_of_mode(mode: str, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_decode_budget_counts_bytes_by_mode(onnx_path):
    """The decode budget counts what decoding costs in bytes for each mode
    (imgclf.data.images.decode_cost), not pixels: a 9 MP 8-bit greyscale PNG
    and a 9 MP RGBA PNG have the same pixel count, but two greyscale decodes
    fit where one RGBA decode does, while a greyscale and an RGBA one do not
    (503 busy with Retry-After once the wait is over); an image that alone
    costs more than the whole budget is a 413 naming it."""
    from fastapi.testclient import TestClient

    from imgclf.deploy.serve import ServeConfig, create_app
    from imgclf.deploy.serve.parsing import ApiError, DecodeBudget, header_cost

    grey, rgba, deep = (_png_of_mode(m, 3000, 3000) for m in ("L", "RGBA", "I;16"))
    cfg = ServeConfig(str(onnx_path), max_pixels=10_000_000)
    with TestClient(create_app(cfg)) as c:
        draft = c.app.state.imgclf.predictor.preprocess.draft_size
        costs = {name: header_cost(data, draft, cfg.max_pixels) for name, data in (("L", grey), ("RGBA", rgba), ("I;16", deep))}
        assert costs["L"] < costs["I;16"] < costs["RGBA"] and 2 * costs["L"] <= costs["RGBA"], costs
        assert c.post("/v1/predict", files={"file": ("rgba.png", rgba)}).status_code == 200  # fits the default

    budget = DecodeBudget(costs["RGBA"], wait_s=0.2)
    with budget.hold(costs["L"]), budget.hold(costs["L"]):  # two greyscale decodes at once
        assert budget.used == 2 * costs["L"]
    with budget.hold(costs["L"]), pytest.raises(ApiError) as e, budget.hold(costs["RGBA"]):
        pass
    assert e.value.status == 503 and e.value.code == "busy" and e.value.headers["Retry-After"] == "1"
    assert budget.used == 0

    mb = (costs["L"] + costs["RGBA"]) / 2 / 2**20  # room for the greyscale image, not for the RGBA one
    with TestClient(create_app(ServeConfig(str(onnx_path), max_pixels=10_000_000, decode_budget_mb=mb))) as c:
        r = c.post("/v1/predict", files={"file": ("grey.png", grey)})
        assert r.status_code == 200 and r.json()["predictions"][0]["filename"] == "grey.png"
        e = error(c.post("/v1/predict", files={"file": ("rgba.png", rgba)}), 413, "image_too_large")
        assert "rgba.png" in e["message"] and "--decode-budget-mb" in e["message"], e
        assert c.get("/v1/model").json()["limits"]["decode_budget_bytes"] == int(mb * 2**20)


def test_token_buckets_per_address():
    """--similar-per-minute 6 --similar-burst 3: three at once, then one every
    10 s, counted for each address on its own; 0 means no limit."""
    from imgclf.deploy.serve.ratelimit import TokenBuckets, retry_after

    b = TokenBuckets(per_minute=6, burst=3)
    assert [b.take("a", now=0.0) for _ in range(3)] == [0, 0, 0]
    assert b.take("a", now=0.0) == pytest.approx(10.0) and retry_after(b.take("a", now=1.0)) == "9"
    assert b.take("b", now=1.0) == 0  # another address has its own bucket
    assert b.take("a", now=10.0) == 0 and b.take("a", now=10.0) > 0
    assert [b.take("a", now=1000.0) == 0 for _ in range(4)] == [True, True, True, False]  # refilled to the burst
    small = TokenBuckets(per_minute=60, burst=1, max_clients=2)
    for addr in ("x", "y", "z"):
        small.take(addr, now=0.0)
    assert list(small.buckets) == ["y", "z"]  # the least recently seen address is forgotten first
    assert all(TokenBuckets(0, 1).take("a") == 0 for _ in range(100))
