"""Soak test of `imgclf serve`: good, bad and hostile requests mixed, for
minutes, at concurrency 32, on loopback.

  .venv/bin/python bench/bench_soak.py [--seconds 180] [--concurrency 32]

Each of the 32 keep-alive connections draws its next request at random:
  good     one real JPEG (expects 200 and the right label)        60%
  bad      text named .jpg, a truncated JPEG (expects 422)         15%
  hostile  20,000 empty multipart parts (413), JSON nested 50,000
           deep (400), a 5 KB PNG of 6300x6300 (200), a made-up
           method name (405/other)                                  25%
Meanwhile an attacker on 127.0.0.1 keeps --idle sockets open that send
nothing and --idle sockets that trickle a header line a second, reopening
each as soon as the server closes it; the clients above connect from
127.0.0.2 (another loopback address: another client to the server).
After the mix, --uploads concurrent 19 MiB non-image uploads, in
--upload-rounds rounds (expects 422, or 503 busy from the body budget), then
--settle seconds idle.

Reports requests, status codes, p50/p99 latency per kind, and the server's
resident memory idle, after a warm-up of good requests (onnxruntime's arena
reaches its working size), at the end of the mix, after the uploads have
settled, and its peak (VmHWM). Passes when no answer of the mix is a 5xx or a
wrong answer, the good requests' p99 is under 1 s, and memory at the end of
the mix and after the uploads is within --max-growth-mb of the warmed-up
size. Only loopback is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import time
from collections import Counter
from pathlib import Path

from bench_serve import HOST, _roundtrip, free_port, multipart, start
from common import DATASETS, ROOT, machine, table

CLIENT = "127.0.0.2"  # the well-behaved clients; the attacker uses HOST


def requests(port: int) -> dict[str, tuple[float, bytes, set[int], bytes | None]]:
    """name: (weight, raw HTTP request, acceptable statuses, text the body must hold)."""
    from PIL import Image

    tiny = DATASETS / "cats_dogs_tiny" / "val"
    cat = sorted((tiny / "cats").iterdir())[0].read_bytes()
    buf = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buf, "PNG", optimize=True)

    def raw(method: str, body: bytes, ctype: str) -> bytes:
        return (f"{method} /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    return {
        "good": (0.60, multipart(cat, port), {200}, b'"cats"'),
        "bad: text as .jpg": (0.08, multipart(b"not an image at all", port), {422}, b"bad_image"),
        "bad: truncated JPEG": (0.07, multipart(cat[:len(cat) // 2], port), {422}, b"bad_image"),
        "hostile: 20k parts": (0.06, raw("POST", b"--X\r\n\r\nv\r\n" * 20_000 + b"--X--\r\n",
                                         "multipart/form-data; boundary=X"), {413}, b"too_many_parts"),
        "hostile: deep JSON": (0.07, raw("POST", b"[" * 50_000, "application/json"), {400}, b"bad_json"),
        "hostile: 40 MP PNG": (0.04, multipart(buf.getvalue(), port), {200}, b"predictions"),
        "hostile: method": (0.08, raw("X" * 3000, b"", "text/plain"), {405}, b"method_not_allowed"),
    }


async def _conn(port, kinds, stop, rng, stats) -> None:
    reader = writer = None
    names = list(kinds)
    weights = [kinds[n][0] for n in names]
    while time.perf_counter() < stop:
        name = rng.choices(names, weights)[0]
        _, req, ok, expect = kinds[name]
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port, local_addr=(CLIENT, 0))
            t0 = time.perf_counter()
            status, body = await asyncio.wait_for(_roundtrip(reader, writer, req), 60)
            stats["lat"].setdefault(name, []).append(time.perf_counter() - t0)
            stats["status"][status] += 1
            if status not in ok or (expect and expect not in body):
                stats["wrong"].append((name, status, body[:120]))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            stats["status"][f"connection: {type(e).__name__}"] += 1
            writer = None


async def _hold(port: int, slow: bool, stop: float, counts: Counter) -> None:
    """One attacker socket: opened, idle or trickling header lines, reopened once the server drops it."""
    while time.perf_counter() < stop:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        counts["opened"] += 1
        t0 = time.perf_counter()
        try:
            if slow:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while time.perf_counter() < stop:
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except asyncio.TimeoutError:
                    if slow:
                        writer.write(b"X-Slow: y\r\n")
                    continue
                counts["refused (503)" if data.startswith(b"HTTP/1.1 503") else "closed by the server"] += 1
                counts["held s"] += time.perf_counter() - t0
                break
        except OSError:
            counts["closed by the server"] += 1
        finally:
            writer.close()
        await asyncio.sleep(0.2)


async def _upload(port: int, req: bytes) -> int | str:
    """One large upload, its answer read while it is still being sent (a 503 comes before the body is read)."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(CLIENT, 0))

    async def send():
        writer.write(req)
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        line = await asyncio.wait_for(reader.readline(), 120)
        return int(line.split()[1]) if line else "closed"
    except (OSError, asyncio.TimeoutError, IndexError, ValueError) as e:
        return type(e).__name__
    finally:
        sending.cancel()
        writer.close()


def uploads(port: int, n: int, rounds: int) -> Counter:
    import os

    req = multipart(os.urandom(19 << 20), port)  # 19 MiB that is not an image, under the 20 MiB body limit
    out: Counter = Counter()

    async def go():
        for res in await asyncio.gather(*(_upload(port, req) for _ in range(n))):
            out[res] += 1

    for _ in range(rounds):
        asyncio.run(go())
    return out


def mem_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-tiny")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of good requests before measuring")
    ap.add_argument("--max-growth-mb", type=float, default=150.0)
    ap.add_argument("--idle", type=int, default=256, help="attacker sockets of each kind (idle, slow header)")
    ap.add_argument("--uploads", type=int, default=100, help="concurrent 19 MiB uploads per round")
    ap.add_argument("--upload-rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds idle after the uploads")
    a = ap.parse_args()
    import subprocess

    from bench_infer import ensure_run

    run = ensure_run(a.run)
    from imgclf.runs import RunDir

    onnx = RunDir(run).export_file("onnx")
    if not onnx.exists():
        subprocess.run([sys.executable, "-m", "imgclf", "export", str(run), "--out", str(onnx)], check=True,
                       capture_output=True)
    port = free_port()
    proc = start([sys.executable, "-m", "imgclf", "serve", str(onnx), "--port", str(port)], port)
    try:
        kinds = requests(port)
        idle_mem = mem_mb(proc.pid)

        async def go(kinds, seconds, stats, attack: Counter | None = None):
            stop = time.perf_counter() + seconds
            holders = [] if attack is None else [_hold(port, i % 2 == 1, stop, attack) for i in range(2 * a.idle)]
            await asyncio.gather(*(_conn(port, kinds, stop, random.Random(i), stats) for i in range(a.concurrency)),
                                 *holders)

        # Warm-up on good requests only: onnxruntime's arena and the batcher
        # reach their working size; growth is measured from here.
        asyncio.run(go({"good": kinds["good"]}, a.warmup, {"lat": {}, "status": Counter(), "wrong": []}))
        start_mem = mem_mb(proc.pid)
        stats = {"lat": {}, "status": Counter(), "wrong": []}
        attack: Counter = Counter()
        t0 = time.perf_counter()
        asyncio.run(go(kinds, a.seconds, stats, attack))
        wall = time.perf_counter() - t0
        time.sleep(2)
        end_mem = mem_mb(proc.pid)
        up = uploads(port, a.uploads, a.upload_rounds) if a.uploads else Counter()
        time.sleep(a.settle)
        settled_mem = mem_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    n = sum(len(v) for v in stats["lat"].values())
    print(f"Machine: {machine()}; {a.seconds:g} s at concurrency {a.concurrency}, server `imgclf serve {onnx.name}`\n")
    rows = [{"request": k, "count": len(v), "p50 ms": f"{pct(v, 0.5):.0f}", "p99 ms": f"{pct(v, 0.99):.0f}"}
            for k, v in sorted(stats["lat"].items())]
    print(table(rows, ["request", "count", "p50 ms", "p99 ms"]))
    print(f"\nrequests: {n} in {wall:.0f} s ({n / wall:.1f}/s); status codes: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(stats["status"].items(), key=lambda kv: str(kv[0]))))
    print(f"server memory: idle {idle_mem['VmRSS']:.0f} MB, after {a.warmup:g} s warm-up {start_mem['VmRSS']:.0f} MB, "
          f"end {end_mem['VmRSS']:.0f} MB, peak {end_mem['VmHWM']:.0f} MB "
          f"(bound: end - after warm-up < {a.max_growth_mb:.0f} MB)")
    held = attack.pop("held s", 0.0)
    print(f"attacker: {a.idle} idle + {a.idle} slow-header sockets from {HOST}: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(attack.items()))
          + f"; mean time held before the server let go {held / max(1, attack['opened']):.2f} s")
    print(f"uploads: {a.upload_rounds} x {a.uploads} concurrent 19 MiB: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(up.items(), key=lambda kv: str(kv[0])))
          + f"; memory {a.settle:g} s after: {settled_mem['VmRSS']:.0f} MB, peak {settled_mem['VmHWM']:.0f} MB")
    fives = sum(v for k, v in stats["status"].items() if isinstance(k, int) and k >= 500)
    growth = max(end_mem["VmRSS"], settled_mem["VmRSS"]) - start_mem["VmRSS"]
    p99 = pct(stats["lat"].get("good", []), 0.99)
    bad_up = sum(v for k, v in up.items() if k not in (422, 503))
    ok = not stats["wrong"] and not fives and growth < a.max_growth_mb and p99 < 1000 and not bad_up
    print(f"good p99 {p99:.0f} ms (bound 1000); memory growth {growth:.0f} MB (bound {a.max_growth_mb:.0f})")
    for w in stats["wrong"][:10]:
        print("unexpected:", w)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
