"""Load test of `imgclf serve` against a naive service, in one run, on loopback.

  .venv/bin/python bench/bench_serve.py [--run RUN] [--seconds 8]

Servers (each alone on the machine while measured):
  imgclf serve   the exported fp32 .onnx, micro-batching (--max-batch 32, 5 ms)
  naive          FastAPI + PyTorch eager, one image per request, no batching
                 (a sync endpoint with UploadFile: the usual first version)
Load: a small asyncio HTTP/1.1 keep-alive client in this process, sending the
same multipart request (one real ~25 KB JPEG) from 1, 8 and 32 connections
for --seconds each; a response counts as an error unless it is 200 and names
the right label. Only 127.0.0.1 is ever contacted.
"""

# No `from __future__ import annotations`: FastAPI must see UploadFile at runtime.

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import DATASETS, ROOT, machine, table

HOST = "127.0.0.1"


# --- the naive baseline service ---------------------------------------------------

def naive_app(run: str):
    import io

    import torch
    from fastapi import FastAPI, File, UploadFile

    from imgclf.data.images import open_image
    from imgclf.data.preprocess import Preprocess, resize_image
    from imgclf.deploy.export import probs_module
    from imgclf.models.records import model_from_record
    from imgclf.runs import RunDir

    rec = RunDir(run).record()
    pp = Preprocess.from_dict(rec["preprocess"])
    model = probs_module(model_from_record(rec), pp, rec.get("temperature", 1.0))
    app = FastAPI()

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    @app.post("/v1/predict")
    def predict(file: UploadFile = File(...)):
        import numpy as np

        x = np.asarray(resize_image(open_image(io.BytesIO(file.file.read())), pp), np.uint8)[None]
        with torch.inference_mode():
            p = model(torch.from_numpy(x))[0].numpy()
        i = int(p.argmax())
        return {"predictions": [{"label": rec["classes"][i], "score": float(p[i])}]}

    return app


# --- load generator ----------------------------------------------------------------

def multipart(data: bytes, port: int) -> bytes:
    b = "imgclfbenchboundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; boundary={b}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _roundtrip(reader, writer, req: bytes) -> tuple[int, bytes]:
    writer.write(req)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    n = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    return status, await reader.readexactly(n)


async def _conn(port: int, req: bytes, stop: float, lat: list, errs: list, expect: bytes) -> None:
    reader = writer = None
    while time.perf_counter() < stop:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            t0 = time.perf_counter()
            status, body = await asyncio.wait_for(_roundtrip(reader, writer, req), 30)
            lat.append(time.perf_counter() - t0)
            if status != 200 or expect not in body:
                errs.append(status)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            errs.append(repr(e))
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def load(port: int, req: bytes, conc: int, seconds: float, expect: bytes) -> dict:
    lat: list[float] = []
    errs: list = []

    async def go():
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_conn(port, req, stop, lat, errs, expect) for _ in range(conc)))

    t0 = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "req/s": f"{len(lat) / wall:.1f}", "p50 ms": f"{q(0.5):.0f}",
            "p99 ms": f"{q(0.99):.0f}", "errors": len(errs)}


# --- orchestration ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2):
                return p
        except OSError:
            if p.poll() is not None:
                raise SystemExit(f"server failed: {p.stderr.read().decode()}") from None
            time.sleep(0.3)
    p.kill()
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-tiny")
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--naive-server", nargs=2, metavar=("RUN", "PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.naive_server:
        import uvicorn

        uvicorn.run(naive_app(a.naive_server[0]), host=HOST, port=int(a.naive_server[1]), log_level="warning")
        return

    from bench_infer import ensure_run

    run = ensure_run(a.run)
    from imgclf.runs import RunDir

    onnx = RunDir(run).export_file("onnx")
    if not onnx.exists():
        subprocess.run([sys.executable, "-m", "imgclf", "export", str(run), "--out", str(onnx)], check=True,
                       capture_output=True)
    img = sorted((DATASETS / "cats_dogs_tiny" / "val" / "cats").iterdir())[0].read_bytes()
    levels = [int(c) for c in a.concurrency.split(",")]
    servers = {
        "imgclf serve (ONNX, micro-batching)": lambda port: [sys.executable, "-m", "imgclf", "serve", str(onnx),
                                                              "--port", str(port), "--max-batch", "32"],
        "naive (FastAPI + PyTorch, batch 1)": lambda port: [sys.executable, __file__, "--naive-server", str(run),
                                                            str(port)],
    }
    rows = []
    for name, cmd in servers.items():
        port = free_port()
        proc = start(cmd(port), port)
        try:
            req = multipart(img, port)
            load(port, req, 2, 2.0, b'"cats"')  # warm-up
            for c in levels:
                rows.append({"server": name, "concurrency": c, **load(port, req, c, a.seconds, b'"cats"')})
                print(f"  {name} c={c}: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"Machine: {machine()}; load generator: asyncio HTTP/1.1 keep-alive client in the same machine, "
          f"{a.seconds:g} s per level, one {len(img) / 1e3:.0f} KB JPEG per request\n")
    print(table(rows, ["server", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "errors"]))


if __name__ == "__main__":
    main()
