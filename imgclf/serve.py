"""`imgclf serve RUN_OR_ONNX`: a REST API and a web page for a trained model.

    POST /v1/predict   images as multipart form data (any field name) or JSON
                       {"images": ["<base64>", ...], "top_k": 3}; top-k per image
    GET  /v1/model     classes, input size, metrics from the run, versions
    GET  /healthz      the process is up;  GET /readyz: the model is loaded
    GET  /metrics      Prometheus text format
    GET  /             a page to drop images on;  /docs: OpenAPI

Concurrent requests are micro-batched: each image goes on an asyncio queue and
one task takes up to --max-batch of them, waiting at most a few milliseconds
for company, and runs the model once in a worker thread. A batch of 8 costs
far less than 8 batches of 1, so throughput grows with load.

Request data never touches the disk and never becomes a path: the body is read
into memory up to a limit and multipart is parsed in memory (Starlette's own
form parser spools large files to temp files, so it is not used), images are
told by content, decoded with a pixel limit, and every bad input gets a 4xx
with a JSON body {"error": {"code", "message", ...}} that says what to fix.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations (Request) at runtime, and Request is imported inside create_app.

import asyncio
import base64
import binascii
import hmac
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .images import BadImage

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}


@dataclass
class ServeConfig:
    model: str  # .onnx file, or a run directory / model.pt (needs torch)
    max_batch: int = 32  # images per model call
    batch_wait_ms: float = 5.0  # how long a batch waits for more images
    api_key: str | None = None  # required on /v1/* when set (X-API-Key or Authorization: Bearer)
    max_body_bytes: int = 20 * 2**20  # whole request
    max_files: int = 16  # images per request
    max_pixels: int = 40_000_000  # per decoded image (a 12 MP photo is far below)
    default_top_k: int = 5
    threads: int | None = None  # onnxruntime threads (default: all cores / workers)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


# --- the model behind the API ----------------------------------------------------

class _TorchBackend:
    """A run directory served with PyTorch (for .onnx files OnnxClassifier is
    used directly and torch is never imported)."""

    def __init__(self, path: str):
        from .predict import load

        self.clf = load(path)
        self.classes, self.preprocess, self.arch = self.clf.classes, self.clf.preprocess, self.clf.arch
        self.int8 = False
        run = Path(path) if Path(path).is_dir() else Path(path).parent
        self.metadata = {"metrics": _run_metrics(run), "temperature": self.clf.temperature, "arch": self.arch,
                         "trained_with": self.clf.record.get("imgclf_version")}

    def prepare(self, data: bytes, max_pixels: int) -> np.ndarray:
        from .images import open_image
        from .preprocess import resize_image

        img = open_image(data, draft_size=self.preprocess.draft_size, max_pixels=max_pixels)
        return np.asarray(resize_image(img, self.preprocess), dtype=np.uint8)

    def probs(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
        return self.clf._probs_from_features(self.clf.extractor(x))


def _run_metrics(run: Path) -> dict:
    for split in ("test", "val"):
        f = run / f"eval_{split}.json"
        if f.exists():
            m = json.loads(f.read_text())
            return {"split": split, "n": m.get("n"), "accuracy": m.get("accuracy"),
                    "balanced_accuracy": m.get("balanced_accuracy")}
    return {}


def load_backend(path: str, threads: int | None = None):
    if str(path).lower().endswith(".onnx"):
        from .onnx_model import OnnxClassifier

        return OnnxClassifier(path, threads=threads)
    return _TorchBackend(path)


# --- micro-batching --------------------------------------------------------------

class Batcher:
    """Collects single images from concurrent requests into batches."""

    def __init__(self, fn, max_batch: int, wait_s: float, metrics: "Metrics"):
        self.fn, self.max_batch, self.wait_s, self.metrics = fn, max_batch, wait_s, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        # One thread runs the model: onnxruntime already uses every core inside
        # a call, so two concurrent calls would only fight over them.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="imgclf-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futs = []
        for x in xs:
            f = loop.create_future()
            self.queue.put_nowait((x, f))
            futs.append(f)
        return list(await asyncio.gather(*futs))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            items = [(x, f) for x, f in items if not f.cancelled()]  # client went away
            if not items:
                continue
            self.metrics.batch(len(items))
            try:
                probs = await loop.run_in_executor(self.pool, self.fn, np.stack([x for x, _ in items]))
            except Exception as e:  # never let one bad batch kill the loop
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), p in zip(items, probs):
                if not f.done():
                    f.set_result(p)


# --- Prometheus metrics (text format, hand-written: four families) ------------------

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {}  # per path: bucket counts + [sum, count]
        self.batches = [0] * (len(_BATCH_BUCKETS) + 1) + [0, 0]
        self.images = 0

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        k = (method, path, status)
        self.requests[k] = self.requests.get(k, 0) + 1
        h = self.latency.setdefault(path, [0] * (len(_LAT_BUCKETS) + 1) + [0.0, 0])
        _observe(h, _LAT_BUCKETS, seconds)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def batch(self, n: int) -> None:
        _observe(self.batches, _BATCH_BUCKETS, n)
        self.images += n

    def render(self) -> str:
        out = ["# HELP imgclf_requests_total HTTP requests by method, path and status.",
               "# TYPE imgclf_requests_total counter"]
        out += [f'imgclf_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}'
                for (m, p, s), n in sorted(self.requests.items())]
        out += ["# HELP imgclf_request_duration_seconds Request latency.",
                "# TYPE imgclf_request_duration_seconds histogram"]
        for p, h in sorted(self.latency.items()):
            out += _hist_lines("imgclf_request_duration_seconds", f'path="{p}",', _LAT_BUCKETS, h)
        out += ["# HELP imgclf_batch_size Images per model call (micro-batching).",
                "# TYPE imgclf_batch_size histogram"]
        out += _hist_lines("imgclf_batch_size", "", _BATCH_BUCKETS, self.batches)
        out += ["# HELP imgclf_errors_total Rejected requests by error code.", "# TYPE imgclf_errors_total counter"]
        out += [f'imgclf_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
        out += ["# HELP imgclf_images_total Images classified.", "# TYPE imgclf_images_total counter",
                f"imgclf_images_total {self.images}"]
        return "\n".join(out) + "\n"


def _observe(h: list, buckets: tuple, v: float) -> None:
    for i, b in enumerate(buckets):
        if v <= b:
            h[i] += 1
            break
    else:
        h[len(buckets)] += 1
    h[-2] += v
    h[-1] += 1


def _hist_lines(name: str, labels: str, buckets: tuple, h: list) -> list[str]:
    lines, cum = [], 0
    for b, n in zip(list(buckets) + ["+Inf"], h[:len(buckets) + 1]):
        cum += n
        lines.append(f'{name}_bucket{{{labels}le="{b}"}} {cum}')
    lab = "{" + labels.rstrip(",") + "}" if labels else ""
    return lines + [f"{name}_sum{lab} {h[-2]:.6g}", f"{name}_count{lab} {h[-1]}"]


# --- request parsing (in memory, bounded) --------------------------------------------

async def read_body(request, limit: int) -> bytes:
    n = request.headers.get("content-length")
    if n is not None:
        try:
            n = int(n)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
        if n > limit:
            raise ApiError(413, "body_too_large", f"request body is {n:,} bytes, over the limit of {limit:,}; "
                           f"send fewer or smaller images (resize them to about the model's input size)")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies are counted as they arrive
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes; "
                           f"send fewer or smaller images")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) for every part of a multipart/form-data body that is a
    file, parsed in memory. Plain text fields (e.g. top_k) are returned under
    the name "field:<name>"."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary; let your HTTP client "
                       "build the body (curl -F 'file=@cat.jpg')")
    parts: list[dict] = []
    cur: dict = {}
    hdr = {"field": b"", "value": b""}

    def on_part_begin():
        cur.clear()
        cur.update(headers={}, data=[])

    def on_header_field(d, s, e):
        hdr["field"] += d[s:e]

    def on_header_value(d, s, e):
        hdr["value"] += d[s:e]

    def on_header_end():
        cur["headers"][hdr["field"].lower()] = hdr["value"]
        hdr["field"], hdr["value"] = b"", b""

    def on_part_data(d, s, e):
        cur["data"].append(d[s:e])

    def on_part_end():
        parts.append(dict(cur))
        if sum(1 for p in parts if b"filename" in p["headers"].get(b"content-disposition", b"")) > max_files:
            raise ApiError(413, "too_many_files", f"more than {max_files} images in one request; "
                           f"split them over several requests")

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({e})") from None
    out = []
    for p in parts:
        _, disp = parse_options_header(p["headers"].get(b"content-disposition", b""))
        data = b"".join(p["data"])
        if b"filename" in disp:
            out.append((disp[b"filename"].decode("utf-8", "replace")[:200], data))
        elif b"name" in disp:
            out.append(("field:" + disp[b"name"].decode("utf-8", "replace")[:100], data))
    return out


def parse_json(body: bytes, max_files: int) -> tuple[list[tuple[str, bytes]], int | None]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"body is not valid JSON ({e}); send {{\"images\": [\"<base64>\", ...]}}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_json", 'expected a JSON object {"images": ["<base64>", ...]}')
    imgs = doc.get("images", [doc["image"]] if "image" in doc else None)
    if not isinstance(imgs, list) or not all(isinstance(s, str) for s in imgs):
        raise ApiError(400, "bad_json", 'expected {"images": ["<base64>", ...]} (a list of base64 strings)')
    if len(imgs) > max_files:
        raise ApiError(413, "too_many_files", f"{len(imgs)} images in one request, over the limit of {max_files}; "
                       f"split them over several requests")
    out = []
    for i, s in enumerate(imgs):
        if s.startswith("data:") and "," in s:  # a data URL, as browsers make them
            s = s.split(",", 1)[1]
        try:
            out.append((f"images[{i}]", base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64", index=i) from None
    return out, doc.get("top_k")


def _top_k(v, default: int, n_classes: int) -> int:
    if v is None or v == "" or v == b"":
        return min(default, n_classes)
    try:
        k = int(v)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_top_k", f"top_k must be an integer, got {v!r}") from None
    if k < 1:
        raise ApiError(400, "bad_top_k", f"top_k must be at least 1, got {k}")
    return min(k, n_classes)


# --- the app ------------------------------------------------------------------------

def create_app(cfg: ServeConfig):
    """The FastAPI app; the model loads at start-up (see /readyz)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    state: dict = {"backend": None, "batcher": None, "started": time.time()}
    metrics = Metrics()
    static = {name: resources.files("imgclf").joinpath("static", name).read_bytes() for name in STATIC_FILES}

    @asynccontextmanager
    async def lifespan(app):
        backend = await run_in_threadpool(load_backend, cfg.model, cfg.threads)
        batcher = Batcher(backend.probs, cfg.max_batch, cfg.batch_wait_ms / 1000, metrics)
        batcher.start()
        state.update(backend=backend, batcher=batcher)
        yield
        await batcher.stop()

    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan,
                  description="Image classification with a model trained by imgclf. "
                              "POST images to /v1/predict; GET / for a page to try it.")

    def err(status: int, code: str, message: str, **extra) -> JSONResponse:
        metrics.error(code)
        return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return err(e.status, e.code, e.message, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return err(e.status_code, code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return err(422, "bad_parameters", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    @app.exception_handler(Exception)
    async def _internal(request, e):  # last resort: a JSON 500, never a dead server
        return err(500, "internal", f"internal error ({type(e).__name__}); see the server log")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "other"  # the route template: bounded label values
        metrics.request(request.method, path, response.status_code, time.perf_counter() - t0)
        return response

    def check_key(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None:
            raise ApiError(401, "missing_api_key", "this server needs an API key: send it as 'X-API-Key: KEY' "
                           "or 'Authorization: Bearer KEY'")
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ApiError(401, "wrong_api_key", "the API key is wrong")

    def backend():
        if state["backend"] is None:
            raise ApiError(503, "not_ready", "the model is still loading; retry in a moment (see /readyz)")
        return state["backend"]

    predict_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "top_k": {"type": "integer"}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "top_k": {"type": "integer"}}}}}}}

    @app.post("/v1/predict", openapi_extra=predict_body, summary="Top-k labels for one or more images")
    async def predict(request: Request, top_k: int | None = None):
        check_key(request)
        be = backend()
        ctype = request.headers.get("content-type", "")
        body = await read_body(request, cfg.max_body_bytes)
        if not body:
            raise ApiError(400, "empty_request", "no images in the request; send multipart files "
                           "(curl -F 'file=@cat.jpg') or JSON {\"images\": [\"<base64>\"]}")
        k_raw = top_k
        if ctype.startswith("multipart/form-data"):
            parts = parse_multipart(body, ctype, cfg.max_files)
            files = [(n, d) for n, d in parts if not n.startswith("field:")]
            fields = {n[6:]: d for n, d in parts if n.startswith("field:")}
            if k_raw is None and "top_k" in fields:
                k_raw = fields["top_k"].decode("utf-8", "replace").strip()
        elif ctype.startswith("application/json"):
            files, jk = parse_json(body, cfg.max_files)
            k_raw = k_raw if k_raw is not None else jk
        else:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'} is not supported; "
                           "use multipart/form-data or application/json")
        if not files:
            raise ApiError(400, "empty_request", "no image files in the request; send at least one file part "
                           "(curl -F 'file=@cat.jpg')")
        k = _top_k(k_raw, cfg.default_top_k, len(be.classes))

        def prepare_all():
            xs, bad = [], []
            for i, (name, data) in enumerate(files):
                try:
                    xs.append(be.prepare(data, max_pixels=cfg.max_pixels))
                except BadImage as e:
                    bad.append({"index": i, "filename": name, "error": e.reason,
                                "too_large": "over the limit" in e.reason})
            return xs, bad

        xs, bad = await run_in_threadpool(prepare_all)
        if bad:
            big = [b for b in bad if b.pop("too_large")]
            if big:
                raise ApiError(413, "image_too_large", f"{big[0]['filename']}: {big[0]['error']}; "
                               f"resize it below {cfg.max_pixels:,} pixels", images=bad)
            raise ApiError(422, "bad_image", f"{bad[0]['filename']}: {bad[0]['error']}", images=bad)
        t0 = time.perf_counter()
        probs = await state["batcher"](xs)
        preds = [{"filename": name, **_top(be.classes, p, k)} for (name, _), p in zip(files, probs)]
        return {"predictions": preds, "model_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.get("/v1/model", summary="Classes, input size, metrics and versions")
    async def model_info(request: Request):
        check_key(request)
        be = backend()
        return _model_info(be, cfg)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded")
    async def readyz():
        if state["backend"] is None:
            return err(503, "not_ready", "the model is still loading")
        return {"status": "ready", "model": Path(cfg.model).name}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(static["index.html"], media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        # Looked up in a fixed in-memory table: a request never names a path on disk.
        if name not in static:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(static[name], media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    app.state.imgclf = state
    app.state.metrics = metrics
    return app


def _top(classes: list[str], p: np.ndarray, k: int) -> dict:
    order = np.argsort(-p)[:k]
    return {"label": classes[order[0]], "score": float(p[order[0]]),
            "top": [{"label": classes[j], "score": float(p[j])} for j in order]}


def _model_info(be, cfg: ServeConfig) -> dict:
    import onnxruntime

    from . import __version__

    meta = getattr(be, "metadata", {})
    versions = {"imgclf": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    if meta.get("trained_with"):
        versions["trained_with_imgclf"] = meta["trained_with"]
    if not cfg.model.lower().endswith(".onnx"):
        import torch

        versions["torch"] = torch.__version__
    pp = be.preprocess
    return {"model": Path(cfg.model).name, "arch": be.arch, "format": "onnx" if cfg.model.lower().endswith(".onnx") else "pytorch",
            "int8": bool(getattr(be, "int8", False)), "classes": be.classes, "num_classes": len(be.classes),
            "input_size": pp.size, "resize": pp.resize, "temperature": meta.get("temperature"),
            "metrics": meta.get("metrics", {}), "versions": versions,
            "limits": {"max_batch": cfg.max_batch, "max_files": cfg.max_files, "max_body_bytes": cfg.max_body_bytes,
                       "max_pixels": cfg.max_pixels}, "api_key_required": bool(cfg.api_key)}


# --- running it ------------------------------------------------------------------

_ENV = "IMGCLF_SERVE_CONFIG"


def app_from_env():
    """uvicorn factory for --workers > 1 (each worker process builds its own app)."""
    return create_app(ServeConfig(**json.loads(os.environ[_ENV])))


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn

    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"{cfg.model}: no such model; serve a run directory or an .onnx from `imgclf export`")
    if cfg.threads is None and workers > 1:
        cfg.threads = max(1, (os.cpu_count() or 1) // workers)  # workers must not oversubscribe the cores
    if cfg.model.lower().endswith(".onnx"):
        load_backend(cfg.model)  # fail now, with the reason, rather than inside a worker
    print(f"imgclf serve: {cfg.model} on http://{host}:{port}/  (API: POST /v1/predict, docs: /docs)"
          + (", API key required" if cfg.api_key else ""), flush=True)
    if workers > 1:
        os.environ[_ENV] = json.dumps(asdict(cfg))
        uvicorn.run("imgclf.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
    else:
        uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")
