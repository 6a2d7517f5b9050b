"""`imgclf serve RUN_OR_ONNX`: a REST API and a web page for a trained model.

  app.py       routes, errors, authentication
  startup.py   what runs before ready (model, warm-up, similarity index), in a background thread
  ratelimit.py a token bucket per client address (/v1/similar)
  parsing.py   bounded, in-memory request parsing and decoding
  batching.py  micro-batching of concurrent requests
  metrics.py   Prometheus metrics (prometheus_client; summed over --workers)
  openapi.py   the schema of every request, status code and body
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from imgclf.config import ServeConfig
from imgclf.errors import ConfigError, ImgclfError
from imgclf.inference.load import model_format
from imgclf.log import get_logger
from imgclf.tasks import load, task_of

log = get_logger(__name__)
SERVED_TASKS = ("classify", "detect", "segment")  # /v1/predict's answers (answers.py)


def create_app(cfg: ServeConfig, background: bool = False):
    """The FastAPI app (imported here lazily: app.py imports this package's modules)."""
    from imgclf.deploy.serve.app import create_app as _create_app  # deferred: FastAPI, only when serving

    return _create_app(cfg, background)

_ENV = "IMGCLF_SERVE_CONFIG_FILE"


def app_from_env():
    """uvicorn factory for --workers > 1 (each worker process builds its own
    app). The config, API key included, comes from a file only this user can
    read, named in the environment: the key itself is never in an environment."""
    from imgclf.deploy.serve import connections  # deferred: uvicorn's protocol classes, only when serving

    return_memory_promptly()
    cfg = ServeConfig(**json.loads(Path(os.environ[_ENV]).read_text()))
    connections.configure(cfg.header_timeout_s, cfg.max_connections_per_client)
    return create_app(cfg, background=True)


def checked_api_key(given: str | None, env: dict) -> str | None:
    """The API key from --api-key or IMGCLF_API_KEY, refused when it could
    never work as meant: empty or blank (no authentication, silently), or
    with surrounding spaces (HTTP strips them from header values). A key on
    the command line is visible to every user in `ps`: a warning says so."""
    source = "--api-key" if given is not None else "IMGCLF_API_KEY"
    key = given if given is not None else env.get("IMGCLF_API_KEY")
    if key is None:
        return None
    if not key.strip():
        raise ConfigError(f"{source} is empty, which would leave the server open to everyone",
                          "set a real key (e.g. IMGCLF_API_KEY=$(openssl rand -hex 24)), or drop the option "
                          "to serve without a key")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError(f"{source} has surrounding spaces or control characters, which no HTTP client can "
                          "send back", "strip them from the key")
    if given is not None:
        log.warning("imgclf serve: warning: --api-key on the command line is visible to other users (ps); "
                    "set IMGCLF_API_KEY in the environment instead")
    return key


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
    """Run uvicorn. It listens at once (/healthz answers) while the model
    loads in the background (/readyz: 503 until ready). With one process, a
    model file that cannot be loaded stops the server with its message: no
    restart would fix it. Worker processes (--workers) report it on /readyz,
    after this process has checked the model loads (a clear error now)."""
    import uvicorn

    from imgclf.deploy.serve import connections  # deferred: uvicorn's protocol classes, only when serving

    model_format(cfg.model)  # a missing or non-model file: refused at once, from its first bytes
    if task_of(cfg.model) not in SERVED_TASKS:
        raise ConfigError(f"{cfg.model}: serving a {task_of(cfg.model)} run is not built yet (served: "
                          f"{', '.join(SERVED_TASKS)})", "predict with the run itself (imgclf predict RUN IMAGES)")
    if cfg.threads is None and cfg.workers > 1:
        cfg.threads = max(1, (os.cpu_count() or 1) // cfg.workers)  # workers must not oversubscribe the cores
    connections.configure(cfg.header_timeout_s, cfg.max_connections_per_client)
    # h11 (not httptools, even where installed): its header-size limit applies, and
    # connections.py adds the header deadline and per-client limit to it.
    common = {"host": cfg.host, "port": cfg.port, "log_level": "warning", "timeout_keep_alive": 5,
              "http": connections.GuardedH11Protocol, "h11_max_incomplete_event_size": 64 * 1024,
              "limit_concurrency": cfg.max_connections}
    banner = (f"imgclf serve: {cfg.model} on http://{cfg.host}:{cfg.port}/  (API: POST /v1/predict, docs: /docs)"
              + (", API key required" if cfg.api_key else ""))
    if cfg.workers <= 1:
        serve_one(cfg, common, banner)
        return
    pred = load(cfg.model, threads=1)  # fail before the banner, with the reason
    pred.set_reject(cfg.reject)
    del pred
    return_memory_promptly()
    log.info(banner)
    with tempfile.TemporaryDirectory(prefix="imgclf-serve-") as d:  # mode 0700
        path = Path(d) / "config.json"
        path.touch(0o600)
        path.write_text(json.dumps(asdict(cfg)))
        os.environ[_ENV] = str(path)
        os.environ.pop("IMGCLF_API_KEY", None)  # the workers read the key from the file, not their environment
        (Path(d) / "metrics").mkdir()  # prometheus_client's multiprocess mode: every worker's values in one place
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(d) / "metrics")
        uvicorn.run("imgclf.deploy.serve:app_from_env", factory=True, workers=cfg.workers, **common)


def serve_one(cfg: ServeConfig, common: dict, banner: str) -> None:
    """One uvicorn process: the banner once the model is ready; a model file
    that cannot be loaded (an ImgclfError: its message names the file and the
    fix) shuts the server down and is raised here, for the command's one line."""
    import uvicorn

    return_memory_promptly()
    app = create_app(cfg, background=True)
    server = uvicorn.Server(uvicorn.Config(app, **common))
    st, failed = app.state.imgclf, []

    def on_failure(e: Exception) -> bool:
        if not isinstance(e, ImgclfError):
            return False  # unexpected: logged with its traceback, reported by /readyz, the server stays up
        failed.append(e)
        server.should_exit = True
        return True

    st.on_ready, st.on_failure = (lambda: log.info(banner)), on_failure
    server.run()
    if failed:
        raise failed[0]
