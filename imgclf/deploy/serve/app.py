"""The FastAPI app of `imgclf serve`: state, routes, authentication (the HTTP
shell, errors, headers and the page: http.py).

    POST /v1/predict   images as multipart form data (any field name) or JSON
                       {"images": ["<base64>", ...], "top_k": 3}; top-k per image
                       (a detector: boxes; a segmenter: a label-map PNG and
                       class shares: answers.py)
    POST /v1/similar   the same bodies; the k most similar training images of
                       each, with thumbnails (serving a run directory only)
    GET  /v1/model     classes, input size, metrics from the run, versions
    GET  /healthz      the process is up (at once);  GET /readyz: the model is
                       loaded, warmed up and checked (done in a background thread)
    GET  /metrics      Prometheus text format
    GET  /             a page to drop images on;  /docs: OpenAPI

The model is any `imgclf.inference.Predictor` (an .onnx without torch, or a
run directory), its answers built by the shared `top_k`. Every error is a
JSON body {"error": {"code", "message", ...}} that says what to fix.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations (Request) at runtime, and Request is imported inside create_app.

import contextlib
import hmac
import logging
import math
import platform
import threading
import time
from pathlib import Path

from imgclf._version import __version__
from imgclf.config import ServeConfig
from imgclf.data.images import BadImage, decode_cost
from imgclf.deploy.serve.answers import (
    answer_bytes,
    collate,
    draft_size,
    image_answers,
    input_description,
    legend,
    model_inputs,
    per_image_outputs,
)
from imgclf.deploy.serve.batching import Batcher
from imgclf.deploy.serve.http import add_error_handlers, add_http_middleware, add_page_routes
from imgclf.deploy.serve.metrics import Metrics
from imgclf.deploy.serve.openapi import (
    METRICS_OPENAPI,
    MODEL_OPENAPI,
    STATUS_OPENAPI,
    Answers,
    Similar,
    Status,
    predict_openapi,
    similar_openapi,
)
from imgclf.deploy.serve.parsing import (
    ApiError,
    BodyBudget,
    DecodeBudget,
    header_cost,
    media_type,
    parse_json,
    parse_multipart,
    parse_top_k,
    read_body,
)
from imgclf.deploy.serve.ratelimit import TokenBuckets, retry_after
from imgclf.deploy.serve.startup import start_up
from imgclf.inference.load import TORCH_FREE, model_format
from imgclf.tasks import task_of

MULTIPART_FIELDS = {"top_k", "file"}  # form fields /v1/predict reads; files are the parts with a filename
log = logging.getLogger("imgclf.serve")


class State:
    """What the routes share: the model, the batcher, limits in force, and how
    far start-up (a background thread: start_up) has come."""

    def __init__(self, cfg: ServeConfig):
        self.cfg, self.metrics = cfg, Metrics()
        self.predictor = None  # set once loaded, warmed up and checked: the server is then ready
        self.batcher: Batcher | None = None
        self.decoding = DecodeBudget(decode_budget_bytes(cfg))
        self.bodies = BodyBudget(cfg.body_budget_bytes)
        self.similar_limit = TokenBuckets(cfg.similar_per_minute, cfg.similar_burst)
        self.in_flight = 0
        self.waiting_for = "the model to load"  # what readiness waits for
        self.load_error: str | None = None  # why the model could not be loaded, for answers (no server paths)
        self.similar = None  # SimilarityIndex of the run's training images, when serving a run directory
        self.similar_building = False
        self.similar_why = "the model is still loading"  # why /v1/similar is unavailable
        self.started = threading.Event()  # start-up is over: ready, or failed
        self.on_ready = None  # set by the command line: its banner, once ready;
        self.on_failure = None  # and what a failed load does (True: the caller reports it, not the log)

    def ready(self):
        if self.predictor is not None:
            return self.predictor
        if self.load_error is not None:
            raise ApiError(503, "load_failed", f"the model could not be loaded: {self.load_error}")
        raise ApiError(503, "not_ready", f"the server is starting: waiting for {self.waiting_for}; retry in a "
                       "moment (see /readyz)", headers={"Retry-After": "2"}, waiting_for=self.waiting_for)

    def run_batch(self, batch) -> list[tuple]:
        """The batcher's model call: a batch -> one output per image, as the model's task has it."""
        return per_image_outputs(self.predictor)(batch)

    def collate(self, items: list):
        """How the batcher joins images, as the model's task has it."""
        return collate(self.predictor)(items)


def decode_budget_bytes(cfg: ServeConfig) -> int:
    """--decode-budget-mb, or by default what the costliest image of
    --max-pixels up to a 4:1 aspect ratio takes to decode (an RGBA PNG at
    full size), so any such image fits, and smaller ones share the budget."""
    if cfg.decode_budget_mb:
        return int(cfg.decode_budget_mb * 2**20)
    side = math.isqrt(cfg.max_pixels)
    return decode_cost("PNG", "RGBA", (4 * (side + 1), side // 4 + 1))


def create_app(cfg: ServeConfig, background: bool = False):
    """The FastAPI app. Start-up (model, warm-up, similarity index: start_up)
    runs in a background thread; with background=False the app waits for it
    before it answers (what a test client or an embedding app expects: ready,
    or failed, once started). `imgclf serve` passes True: /healthz answers at
    once, and /readyz says 503 and what it waits for until the model is ready."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool


    st = State(cfg)

    @asynccontextmanager
    async def lifespan(app):
        st.batcher = Batcher(st.run_batch, cfg.max_batch, cfg.batch_wait_ms / 1000, st.metrics, st.collate)
        st.batcher.start()
        threading.Thread(target=start_up, args=(st,), name="imgclf-start-up", daemon=True).start()
        if not background:
            await run_in_threadpool(st.started.wait)
        yield
        await st.batcher.stop()

    # /docs is served below from local files (no CDN); ReDoc would need one.
    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with a model trained by imgclf. "
                              "POST images to /v1/predict; GET / for a page to try it.")
    add_error_handlers(app, st.metrics)
    add_http_middleware(app, st.metrics)
    add_predict_route(app, st)
    add_similar_route(app, st)
    add_info_routes(app, st)
    add_page_routes(app)
    app.state.imgclf = st
    return app


def check_key(st: State, request) -> None:
    """The key from X-API-Key or Authorization: Bearer, compared as raw header
    bytes (UTF-8 on both sides, so a non-ASCII key works) in constant time."""
    key = st.cfg.api_key
    if not key:
        return
    headers = dict(request.scope["headers"])  # raw (lower-case name, value) bytes
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if given is None and auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    if given is None:
        raise ApiError(401, "missing_api_key", "this server needs an API key: send it as 'X-API-Key: KEY' "
                       "or 'Authorization: Bearer KEY'")
    if not hmac.compare_digest(given, key.encode()):
        raise ApiError(401, "wrong_api_key", "the API key is wrong")


def parse_request(st: State, body: bytes, ctype: str) -> tuple[list[tuple[str, bytes]], object]:
    """(files, raw top_k from the body) from a multipart or JSON body (runs in a worker thread)."""
    cfg, kind = st.cfg, media_type(ctype)
    if kind == "multipart/form-data":
        parts = parse_multipart(body, ctype, cfg.max_files, cfg.max_files + 8)
        files = [(n, d) for n, d in parts if not n.startswith("field:")]
        fields = {n[6:]: d for n, d in parts if n.startswith("field:")}
        unknown = sorted(set(fields) - MULTIPART_FIELDS)
        if unknown:  # the schema says so too (additionalProperties: false), so the parts bound never meets a valid body
            raise ApiError(422, "unknown_field", f"unknown form field {unknown[0][:60]!r}: send image files (any "
                           "field name, with a filename) and optionally top_k")
        k = fields.get("top_k")
    elif kind == "application/json":
        files, k = parse_json(body, cfg.max_files)
    else:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype[:100] or '(none)'} is not supported; "
                       "use multipart/form-data or application/json")
    if not files:
        raise ApiError(400, "empty_request", "no image files in the request; send at least one file part "
                       "(curl -F 'file=@cat.jpg') or JSON {\"images\": [\"<base64>\"]}")
    return files, k


def top_k_of(request, body_k, default: int, n_classes: int) -> int:
    """top_k from the query (which wins) or the body; both are checked, and
    any other query parameter is an error rather than silently ignored."""
    unknown = sorted(set(request.query_params) - {"top_k"})
    if unknown:
        raise ApiError(400, "bad_parameters", f"unknown query parameter {unknown[0][:40]!r}; the only one is top_k")
    query = request.query_params.getlist("top_k")
    if len(query) > 1:
        raise ApiError(400, "bad_top_k", "top_k is given more than once in the query")
    k = parse_top_k(body_k, default, n_classes)
    return parse_top_k(query[0], default, n_classes) if query else k


def decode_all(st: State, files: list[tuple[str, bytes]]) -> list:
    """Model inputs for every file, each decoded once its cost in bytes fits
    the shared decode budget; a 413/422 naming every bad file otherwise, or
    503 busy when the budget stays full (runs in a worker thread)."""
    xs, bad = [], []
    draft = draft_size(st.predictor)
    for i, (name, data) in enumerate(files):
        cost = header_cost(data, draft, st.cfg.max_pixels)
        if cost > st.decoding.limit:
            bad.append({"index": i, "filename": name, "too_large": True,
                        "error": f"decoding it would take about {cost >> 20:,} MB, over the server's decode budget "
                                 f"of {st.decoding.limit >> 20:,} MB (--decode-budget-mb)"})
            continue
        try:
            with st.decoding.hold(cost):
                xs.append(st.predictor.prepare(data, max_pixels=st.cfg.max_pixels))
        except BadImage as e:
            bad.append({"index": i, "filename": name, "error": e.reason, "too_large": "over the limit" in e.reason})
    if bad:
        big = [b for b in bad if b.pop("too_large")]
        if big:
            raise ApiError(413, "image_too_large", f"{big[0]['filename']}: {big[0]['error']}; "
                           f"resize it below {st.cfg.max_pixels:,} pixels (or send it as JPEG)", images=bad)
        raise ApiError(422, "bad_image", f"{bad[0]['filename']}: {bad[0]['error']}", images=bad)
    return xs


async def images_body(request, st: State, held) -> bytes:
    """The whole request body, within the size, time and memory limits; 400 when empty."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding != "identity":
        raise ApiError(415, "unsupported_content_encoding", f"Content-Encoding {coding[:40]!r} is not supported; "
                       "send the body uncompressed (images are already compressed)")
    body = await read_body(request, st.cfg.max_body_bytes, st.cfg.body_timeout_s, st.cfg.body_deadline_s, held)
    if not body:
        raise ApiError(400, "empty_request", "no images in the request; send multipart files "
                       "(curl -F 'file=@cat.jpg') or JSON {\"images\": [\"<base64>\"]}")
    return body


@contextlib.contextmanager
def processing_slot(st: State):
    """One of --max-concurrent slots for parsing, decoding and the model, or 503.
    Taken once the body is in: slow uploads hold a connection (bounded by
    --max-connections), never a processing slot."""
    if st.in_flight >= st.cfg.max_concurrent:
        raise ApiError(503, "busy", f"{st.in_flight} requests are in progress, the limit; retry shortly")
    st.in_flight += 1
    try:
        yield
    finally:
        st.in_flight -= 1


def add_predict_route(app, st: State) -> None:
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool


    @app.post("/v1/predict", openapi_extra=predict_openapi(st.cfg.max_files), response_model=Answers,
              response_model_exclude_none=True, summary="Top-k labels (or boxes, or label maps) for one or more images",
              response_description="top-k labels per image (a detector: boxes; a segmenter: a label map and "
                                   "class shares), in request order")
    async def predict(request: Request):
        check_key(st, request)
        pred = st.ready()
        with st.bodies.account() as held:
            body = await images_body(request, st, held)
            with processing_slot(st):
                files, body_k = await run_in_threadpool(parse_request, st, body, request.headers.get("content-type", ""))
                del body
                k = top_k_of(request, body_k, st.cfg.top_k, len(pred.classes))
                xs = await run_in_threadpool(decode_all, st, files)
                t0 = time.perf_counter()
                # A segmenter's full-size label maps share the decode budget until they are encoded.
                cost = answer_bytes(pred, xs)
                taken = await run_in_threadpool(st.decoding.take, cost) if cost else 0
                try:
                    outs = await st.batcher(model_inputs(pred, xs))
                    preds = await run_in_threadpool(image_answers, pred, files, xs, outs, k)
                    del outs  # the label maps: only their PNGs leave
                finally:
                    st.decoding.give(taken)
        lg = legend(pred)
        return {"predictions": preds, "model_ms": round((time.perf_counter() - t0) * 1000, 2),
                **({"legend": lg} if lg else {})}


MAX_SIMILAR_K = 50  # neighbours per image: each carries a ~3 KB thumbnail


def public_path(p: str) -> str:
    """A training image's path as answers show it: relative to the data root,
    or its file name alone when it was absolute or leaves the root (a CSV of
    absolute paths), so no answer reveals the server's file system."""
    from pathlib import PurePath

    pp = PurePath(p)
    return pp.name if pp.is_absolute() or ".." in pp.parts else p


def similar_results(st: State, files, xs: list, k: int) -> list[dict]:
    """Neighbours of each decoded image, thumbnails inline (runs in a worker thread).
    Thumbnails come from the index by id: no request ever names a file."""
    import base64

    import numpy as np

    found = st.similar.search(st.predictor.embed(np.stack(xs)), k)
    for nbs in found:
        for nb in nbs:
            nb["path"] = public_path(nb["path"])
            nb["thumbnail"] = "data:image/jpeg;base64," + base64.b64encode(st.similar.thumbnail(nb["id"])).decode()
    return [{"filename": name, "neighbours": nbs} for (name, _), nbs in zip(files, found)]


def k_of(request, default: int, limit: int) -> int:
    """k from the query string (the only parameter /v1/similar takes)."""
    unknown = sorted(set(request.query_params) - {"k"})
    if unknown:
        raise ApiError(400, "bad_parameters", f"unknown query parameter {unknown[0][:40]!r}; the only one is k")
    query = request.query_params.getlist("k")
    if len(query) > 1:
        raise ApiError(400, "bad_k", "k is given more than once in the query")
    try:
        return parse_top_k(query[0] if query else None, default, limit)
    except ApiError as e:
        raise ApiError(400, "bad_k", e.message.replace("top_k", "k")) from None


def add_similar_route(app, st: State) -> None:
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool


    # An exported model never has it: the route answers why, and stays out of the schema.
    @app.post("/v1/similar", openapi_extra=similar_openapi(st.cfg.max_files, MAX_SIMILAR_K), response_model=Similar,
              response_description="the k most similar training images of each image, best first",
              summary="The most similar training images of each image, with thumbnails",
              include_in_schema=model_format(st.cfg.model) not in TORCH_FREE and task_of(st.cfg.model) == "classify")
    async def similar(request: Request):
        check_key(st, request)
        st.ready()
        if st.similar is None and st.similar_building:
            raise ApiError(503, "similar_not_ready", "the similarity index of the training images is still being "
                           "built; predictions already work; retry in a moment", headers={"Retry-After": "5"})
        if st.similar is None:
            raise ApiError(404, "similar_unavailable", f"similarity search is not available: {st.similar_why}")
        wait = st.similar_limit.take(request.client.host if request.client else "")
        if wait:
            raise ApiError(429, "rate_limited", f"over {st.cfg.similar_per_minute:g} /v1/similar requests a minute "
                           f"from this address (--similar-per-minute); retry in {retry_after(wait)} s",
                           headers={"Retry-After": retry_after(wait)})
        k = k_of(request, 10, min(MAX_SIMILAR_K, len(st.similar)))
        with st.bodies.account() as held:
            body = await images_body(request, st, held)
            with processing_slot(st):
                files, _ = await run_in_threadpool(parse_request, st, body, request.headers.get("content-type", ""))
                del body
                xs = await run_in_threadpool(decode_all, st, files)
                t0 = time.perf_counter()
                results = await run_in_threadpool(similar_results, st, files, xs, k)
        return {"results": results, "model_ms": round((time.perf_counter() - t0) * 1000, 2)}


def add_info_routes(app, st: State) -> None:
    from fastapi import Request
    from fastapi.responses import Response


    @app.get("/v1/model", summary="Classes, input size, metrics and versions", openapi_extra=MODEL_OPENAPI)
    async def model_info(request: Request):
        check_key(st, request)
        return model_description(st.ready(), st.cfg, st)

    @app.get("/healthz", summary="Liveness: the process answers", openapi_extra=STATUS_OPENAPI,
             response_model=Status, response_model_exclude_none=True)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded, warmed up and checked", openapi_extra=STATUS_OPENAPI,
             response_model=Status, response_model_exclude_none=True)
    async def readyz():
        st.ready()
        similar = "building" if st.similar_building else "ready" if st.similar is not None else "unavailable"
        return {"status": "ready", "model": Path(st.cfg.model).name, "similar": similar}

    @app.get("/metrics", summary="Prometheus metrics (text format)", openapi_extra=METRICS_OPENAPI,
             response_class=Response)
    async def prom(request: Request):
        if not st.cfg.public_metrics:
            check_key(st, request)
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_description(pred, cfg: ServeConfig, st: State) -> dict:
    """/v1/model: what is served, how well it did on held-out data, the limits."""
    import sys

    import onnxruntime


    meta = pred.metadata
    fmt = model_format(cfg.model)
    onnx = fmt in TORCH_FREE  # exports: no torch
    versions = {"imgclf": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    if meta.get("trained_with"):
        versions["trained_with_imgclf"] = meta["trained_with"]
    if not onnx and "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    lg = legend(pred)
    return {"model": Path(cfg.model).name, "task": getattr(pred, "task", "classify"), "arch": pred.arch, "format": {"run": "pytorch", "ort": "onnx"}.get(fmt, fmt),
            "int8": bool(getattr(pred, "int8", False)), "classes": pred.classes, "num_classes": len(pred.classes),
            **({"legend": lg} if lg else {}), **input_description(pred), "temperature": pred.temperature,
            "unknown_score": pred.has_unknown, "reject": pred.reject, "multi_label": pred.multi_label,
            "thresholds": None if pred.thresholds is None else [float(t) for t in pred.thresholds],
            "metrics": meta.get("metrics") or {}, "versions": versions,
            "limits": {"max_batch": cfg.max_batch, "max_files": cfg.max_files, "max_body_bytes": cfg.max_body_bytes,
                       "max_pixels": cfg.max_pixels, "max_concurrent": cfg.max_concurrent,
                       "decode_budget_bytes": st.decoding.limit, "similar_per_minute": cfg.similar_per_minute},
            "api_key_required": bool(cfg.api_key),
            "similar": {"available": st.similar is not None, "images": len(st.similar) if st.similar is not None else 0,
                        **({} if st.similar is not None else {"why_not": st.similar_why})}}
