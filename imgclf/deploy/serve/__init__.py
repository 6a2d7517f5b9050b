"""`imgclf serve RUN_OR_ONNX`: a REST API and a web page for a trained model.

  app.py       routes, errors, authentication
  parsing.py   bounded, in-memory request parsing and decoding
  batching.py  micro-batching of concurrent requests
  metrics.py   Prometheus text format
  openapi.py   the schema of every request, status code and body
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from imgclf.config import ServeConfig
from imgclf.errors import RunError
from imgclf.inference.load import load
from imgclf.log import get_logger

log = get_logger(__name__)


def create_app(cfg: ServeConfig):
    """The FastAPI app (imported here lazily: app.py imports this package's modules)."""
    from imgclf.deploy.serve.app import create_app as _create_app  # deferred: FastAPI, only when serving

    return _create_app(cfg)

_ENV = "IMGCLF_SERVE_CONFIG"


def app_from_env():
    """uvicorn factory for --workers > 1 (each worker process builds its own app)."""
    return_memory_promptly()
    return create_app(ServeConfig(**json.loads(os.environ[_ENV])))


def return_memory_promptly() -> None:
    """glibc keeps freed memory in per-thread arenas and, after a large free,
    raises its mmap threshold so later large buffers stay in those arenas too:
    a server decoding images in 40 threads then never shrinks. Fewer arenas and
    a fixed 1 MB mmap threshold (decoded images are mmapped and unmapped on
    free) keep its memory near the working set. A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def serve(cfg: ServeConfig) -> None:
    """Check the model loads (a clear error now, not inside a worker), then run uvicorn."""
    import uvicorn


    if not Path(cfg.model).exists():
        raise RunError(f"{cfg.model}: no such model", "serve a run directory or an .onnx from `imgclf export`")
    if cfg.threads is None and cfg.workers > 1:
        cfg.threads = max(1, (os.cpu_count() or 1) // cfg.workers)  # workers must not oversubscribe the cores
    load(cfg.model, threads=1).set_reject(cfg.reject)  # fail before the banner, with the reason
    return_memory_promptly()
    log.info(f"imgclf serve: {cfg.model} on http://{cfg.host}:{cfg.port}/  (API: POST /v1/predict, docs: /docs)"
             + (", API key required" if cfg.api_key else ""))
    # h11 (not httptools, even where installed): its header-size limit applies.
    common = {"host": cfg.host, "port": cfg.port, "log_level": "warning", "timeout_keep_alive": 5, "http": "h11",
              "h11_max_incomplete_event_size": 64 * 1024, "limit_concurrency": cfg.max_connections}
    if cfg.workers > 1:
        os.environ[_ENV] = json.dumps(asdict(cfg))
        uvicorn.run("imgclf.deploy.serve:app_from_env", factory=True, workers=cfg.workers, **common)
    else:
        uvicorn.run(create_app(cfg), **common)
