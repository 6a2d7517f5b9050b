"""The HTTP API against its own OpenAPI schema (Schemathesis, every check) and
against hand-written hostile generators (Hypothesis), on a real uvicorn
process. Bounded here; the `slow` variants (make test-all) run 10x longer.

Asserted for every response: no 5xx, a JSON error body for every 4xx, each
answer within a stated time, and the server's memory within a stated bound."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ROOT
from .servers import memory_mb, served_tiny_onnx

EXAMPLES = 60  # hand-written generators, per test, in `make test`
SCHEMA_EXAMPLES = 100  # Schemathesis examples per operation, in `make test`
MAX_SECONDS = 5.0  # any single answer
MAX_GROWTH_MB = 300  # resident memory growth over a whole fuzzing test


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    with served_tiny_onnx(tiny_run, tmp_path_factory, "fuzz", "--body-timeout-s", "2") as (url, proc, log):
        yield url, proc, log
    assert "Traceback" not in log.read_text()


def _schemathesis(url: str, examples: int) -> None:
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
           "run", url + "/openapi.json", "--checks", "all", "--max-examples", str(examples), "--seed", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0 and "No issues found" in p.stdout, p.stdout[-6000:]


def test_schemathesis_every_check(server):
    _schemathesis(server[0], SCHEMA_EXAMPLES)


@pytest.mark.slow
def test_schemathesis_every_check_long(server):
    _schemathesis(server[0], 10 * SCHEMA_EXAMPLES)


# --- hand-written hostile generators ------------------------------------------------

token = st.text(st.characters(codec="ascii", exclude_characters="\r\n\"\\"), min_size=0, max_size=12)
header_line = st.tuples(st.sampled_from(["Content-Disposition", "Content-Type", "X-Junk", "content-disposition"]),
                        st.sampled_from(['form-data; name="file"; filename="a.jpg"', 'form-data; name="top_k"',
                                         "form-data", 'form-data; name="file"; filename=', "image/png", ""]) | token)
part = st.tuples(st.lists(header_line, max_size=3),
                 st.binary(max_size=64) | st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"1", b"-1"]))


@st.composite
def multipart_bodies(draw):
    boundary = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20))
    parts = draw(st.lists(part, max_size=30))
    out = b""
    for headers, data in parts:
        out += f"--{boundary}\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\n" + data + b"\r\n"
    if draw(st.booleans()):
        out += f"--{boundary}--\r\n".encode()
    cut = draw(st.integers(0, len(out)))
    ctype = draw(st.sampled_from(["multipart/form-data; boundary=" + boundary, "multipart/form-data",
                                  "MULTIPART/FORM-DATA; BOUNDARY=" + boundary, "multipart/form-data; boundary=",
                                  "multipart/form-data; boundary=" + boundary + "x"]))
    return ctype, out[:cut] if draw(st.booleans()) else out


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                           max_leaves=20)


@st.composite
def json_bodies(draw):
    doc = draw(st.fixed_dictionaries({}, optional={"images": json_values | st.lists(st.text(max_size=40), max_size=20),
                                                   "image": json_values, "top_k": json_values}))
    raw = json.dumps(doc).encode()
    if draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]  # truncated JSON
    if draw(st.integers(0, 9)) == 0:
        raw = b"[" * draw(st.integers(1000, 50_000))  # deep nesting
    return raw


def _check(r: httpx.Response, seconds: float) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert seconds < MAX_SECONDS
    if r.status_code >= 400:
        e = r.json()["error"]
        assert e["code"] and e["message"]


def _fuzz(server, strategy, send, examples: int) -> None:
    url, proc, _ = server
    start = memory_mb(proc.pid)["VmRSS"]
    client = httpx.Client(base_url=url, timeout=MAX_SECONDS * 2)

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(value):
        t0 = time.perf_counter()
        r = send(client, value)
        _check(r, time.perf_counter() - t0)

    run()
    assert client.get("/healthz").status_code == 200
    assert memory_mb(proc.pid)["VmRSS"] - start < MAX_GROWTH_MB


def _post_multipart(c: httpx.Client, v):
    ctype, body = v
    return c.post("/v1/predict", content=body, headers={"Content-Type": ctype})


def _post_json(c: httpx.Client, body: bytes):
    return c.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})


def test_hostile_multipart(server):
    _fuzz(server, multipart_bodies(), _post_multipart, EXAMPLES)


def test_hostile_json(server):
    _fuzz(server, json_bodies(), _post_json, EXAMPLES)


@pytest.mark.slow
def test_hostile_long(server):
    _fuzz(server, multipart_bodies(), _post_multipart, 10 * EXAMPLES)
    _fuzz(server, json_bodies(), _post_json, 10 * EXAMPLES)
