"""`imgclf serve RUN` starting up, on a real uvicorn process: /healthz answers
as soon as the port opens while the model loads in the background; /v1/predict
works while the similarity index is still being built; /v1/similar is rate
limited per client address.

The run is served as a fresh machine would serve it: a copy of the tiny run
without its saved similarity index, and a feature cache that holds the
exported backbone but no training image's features, so start-up really has
to load torch and the model, then embed a third of its training images."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from .servers import running_server
from .test_export import val_images


@pytest.fixture(scope="module")
def cat(tiny) -> bytes:
    return val_images(tiny, 1)["cats"][0].read_bytes()


@pytest.fixture(scope="module")
def cold(tiny_run, tmp_path_factory, cache_dir):
    """(run copy without similar.npz, a feature cache with the backbone export only)."""
    d = tmp_path_factory.mktemp("cold")
    run = d / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("similar.*", "*.onnx"))
    splits = json.loads((run / "splits.json").read_text())
    splits["train"] = splits["train"][::3]  # 67 images to embed: enough to watch, cheap enough to wait for
    (run / "splits.json").write_text(json.dumps(splits))
    cache = d / "cache"
    cache.mkdir()
    if (cache_dir / "onnx").is_dir():  # the exported backbone: without it the warm-up would export it again
        shutil.copytree(cache_dir / "onnx", cache / "onnx")
    return run, cache


@pytest.fixture(scope="module")
def server(cold, tmp_path_factory):
    run, cache = cold
    log = tmp_path_factory.mktemp("startup") / "server.log"
    args = ("--similar-per-minute", "6", "--similar-burst", "3")
    with running_server(run, log, *args, wait_for="/healthz", env={"IMGCLF_CACHE_DIR": str(cache)}) as (url, _):
        yield url, log


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    e = r.json()["error"]
    assert e["code"] == code and e["message"], e
    return e


def _until(fn, timeout: float = 120.0, every: float = 0.05):
    """Calls fn until it returns something true; that value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out := fn():
            return out
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


def test_healthz_answers_while_the_model_loads_and_predict_before_the_index(server, cat):
    """Once the whole start-up (torch, the model, the warm-up, the index of
    every training image) ran before uvicorn listened: a liveness probe got
    no answer and restarted a healthy pod."""
    url, log = server
    with httpx.Client(base_url=url, timeout=10) as c:
        h, r = c.get("/healthz"), c.get("/readyz")  # the port has just opened
        assert h.status_code == 200 and h.json() == {"status": "ok"}
        e = _error(r, 503, "not_ready")
        assert e["waiting_for"] and e["waiting_for"] in e["message"] and r.headers["retry-after"]
        _error(c.post("/v1/predict", files={"file": ("a.jpg", cat)}), 503, "not_ready")

        slowest = []

        def ready():
            t = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            slowest.append(time.perf_counter() - t)
            return c.get("/readyz").status_code == 200

        _until(ready)
        # Every probe answered (within the client's 10 s) while the model loaded. Not timed here: the
        # import of torch holds the GIL for up to a second or two on a loaded machine (docs/security.md).
        assert len(slowest) >= 5, slowest

        # the model is ready, the similarity index of 67 uncached images is not: predictions already work
        assert c.get("/readyz").json()["similar"] == "building"
        e = _error(c.post("/v1/similar", files={"file": ("a.jpg", cat)}), 503, "similar_not_ready")
        p = c.post("/v1/predict", files={"file": ("a.jpg", cat)})
        assert p.status_code == 200 and p.json()["predictions"][0]["label"] == "cats", p.text
        assert c.get("/v1/model").json()["similar"]["available"] is False

        _until(lambda: c.get("/readyz").json()["similar"] == "ready")
        r = c.post("/v1/similar?k=3", files={"file": ("a.jpg", cat)})
        assert r.status_code == 200 and len(r.json()["results"][0]["neighbours"]) == 3
    assert "imgclf serve:" in log.read_text()  # the banner, printed once the model was ready


def test_similar_is_rate_limited_per_client_and_predict_is_not(server, cat):
    """--similar-per-minute 6 --similar-burst 3: a burst of 6 from one address
    gets 3 answers and then 429 with Retry-After; predictions from that address
    and /v1/similar from another one still answer."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        _until(lambda: c.get("/readyz").json().get("similar") == "ready")
        codes, last = [], None
        for _ in range(6):
            last = c.post("/v1/similar?k=1", files={"file": ("a.jpg", cat)})
            codes.append(last.status_code)
        assert codes.count(200) <= 3 and codes[-1] == 429, codes  # the first test may have spent a token
        e = _error(last, 429, "rate_limited")
        assert "--similar-per-minute" in e["message"] and 1 <= int(last.headers["retry-after"]) <= 10
        assert all(c.post("/v1/predict", files={"file": ("a.jpg", cat)}).status_code == 200 for _ in range(5))
    other = httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:
        assert other.post("/v1/similar?k=1", files={"file": ("a.jpg", cat)}).status_code == 200
