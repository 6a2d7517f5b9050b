"""Real `imgclf serve` processes on loopback for the tests: started as a user
would start them (optionally with torch made unimportable), waited for, and
stopped; their memory read from /proc."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .conftest import ROOT

NO_TORCH = "import sys; sys.modules['torch'] = None; "  # any `import torch` now raises ImportError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, log: Path, *args: str, torch_free: bool = False, wait_for: str = "/readyz",
                   env: dict | None = None):
    """Yields (url, process) for `imgclf serve MODEL ARGS` on a free port, once
    `wait_for` answers 200: /readyz (the model is ready) or /healthz (the
    port is open; the model may still be loading). `env` adds variables."""
    port = free_port()
    argv = ["serve", str(model), "--port", str(port), *args]
    code = (NO_TORCH if torch_free else "") + f"from imgclf.cli import main; sys.exit(main({argv!r}))"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; " + code], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + wait_for, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server did not become ready:\n{log.read_text()}")
            time.sleep(0.3 if wait_for == "/readyz" else 0.02)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def served_tiny_onnx(tiny_run, tmp_path_factory, name: str, *args: str):
    """The session's exported cats_dogs_tiny model behind a torch-free
    `imgclf serve ARGS`; yields (url, process, log path)."""
    from .test_export import export_once

    model = export_once(tiny_run, tmp_path_factory)[0]
    log = tmp_path_factory.mktemp(name) / "server.log"
    with running_server(model, log, *args, torch_free=True) as (url, proc):
        yield url, proc, log


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out
