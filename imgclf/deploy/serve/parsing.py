"""Request parsing, in memory and bounded in every dimension.

The body is read up to a byte limit and a time limit; multipart is parsed in
one linear pass with a cap on parts (Starlette's own form parser spools large
files to temp files, so it is not used); JSON depth errors are caught; images
are told by content and decoded under a pixel limit per image and a budget
of decoding bytes shared by all requests. Parsing and decoding run in worker threads,
never on the event loop. Request data never becomes a path."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import json
import threading
from contextlib import contextmanager

from imgclf.data.images import decode_cost

MAX_TOP_K_DIGITS = 6  # any top_k beyond the class count means "all classes"


class ApiError(Exception):
    """A 4xx/5xx with a JSON body {"error": {"code", "message", ...}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers


def media_type(content_type: str) -> str:
    """'Multipart/Form-Data; boundary=x' -> 'multipart/form-data' (RFC 9110: case-insensitive)."""
    return content_type.split(";", 1)[0].strip().lower()


async def read_body(request, limit: int, timeout_s: float, deadline_s: float, held: BodyBytes) -> bytes:
    """The whole body, or 413 past `limit` bytes (checked against
    Content-Length first, then as chunks arrive), and 408 when the client
    stops sending for `timeout_s` (a short body under a long Content-Length)
    or takes longer than `deadline_s` in all (a byte every few seconds).
    Its bytes are counted in `held` (the shared body budget) before they are read."""
    from starlette.requests import ClientDisconnect

    n = request.headers.get("content-length")
    if n is not None:
        if not n.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(n) > limit:
            raise ApiError(413, "body_too_large", f"request body is {int(n):,} bytes, over the limit of {limit:,}; "
                           f"send fewer or smaller images (resize them to about the model's input size)")
        held.grow(int(n))
    # One growing bytearray, not a list of chunks: past glibc's 1 MB mmap
    # threshold it lives in its own mapping (realloc moves it with mremap), so
    # a 20 MB body leaves nothing in the heap when freed. Kept as 64 KiB
    # chunks, 8 concurrent bodies pinned about 150 MB of heap that not even
    # malloc_trim could hand back (measured with bench_soak.py's uploads).
    buf, stream = bytearray(), request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, min(timeout_s, end - loop.time())))
        except StopAsyncIteration:
            return bytes(buf)
        except TimeoutError:
            raise ApiError(408, "body_timeout", f"the request body stalled for {timeout_s:g} s or took over "
                           f"{deadline_s:g} s; send the whole body promptly (check Content-Length)") from None
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client closed the connection mid-request") from None
        size = len(buf) + len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes; "
                           f"send fewer or smaller images")
        held.grow(size - held.n)  # a chunked body: counted as it arrives
        buf += chunk


def parse_multipart(body: bytes, content_type: str, max_files: int, max_parts: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) for every file part of a multipart/form-data body, in
    one pass (python-multipart's streaming parser); other fields come back as
    ("field:<name>", bytes). More than max_files files or max_parts parts is a 413."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary; let your HTTP client "
                       "build the body (curl -F 'file=@cat.jpg')")
    out: list[tuple[str, bytes]] = []
    cur: dict = {}
    counts = {"parts": 0, "files": 0}

    def on_part_begin():
        counts["parts"] += 1
        if counts["parts"] > max_parts:
            raise ApiError(413, "too_many_parts", f"more than {max_parts} parts in one multipart body; "
                           f"send at most {max_files} images and the top_k field")
        cur.clear()
        cur.update(field=b"", value=b"", headers={}, data=[])

    def on_header_end():
        cur["headers"][cur["field"].lower()] = cur["value"]
        cur["field"] = cur["value"] = b""

    def on_part_end():
        _, disp = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        data = b"".join(cur["data"])
        if b"filename" in disp:
            counts["files"] += 1
            if counts["files"] > max_files:
                raise ApiError(413, "too_many_files", f"more than {max_files} images in one request; "
                               f"split them over several requests")
            out.append((disp[b"filename"].decode("utf-8", "replace")[:200], data))
        elif b"name" in disp:
            out.append(("field:" + disp[b"name"].decode("utf-8", "replace")[:100], data))

    callbacks = {"on_part_begin": on_part_begin, "on_part_end": on_part_end, "on_header_end": on_header_end,
                 "on_header_field": lambda d, s, e: cur.__setitem__("field", cur["field"] + d[s:e]),
                 "on_header_value": lambda d, s, e: cur.__setitem__("value", cur["value"] + d[s:e]),
                 "on_part_data": lambda d, s, e: cur["data"].append(d[s:e])}
    try:
        parser = MultipartParser(boundary, callbacks)  # refuses a boundary over 256 bytes (RFC 2046: 70)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body ({type(e).__name__})") from None
    return out


def parse_json(body: bytes, max_files: int) -> tuple[list[tuple[str, bytes]], object]:
    """([(name, image bytes)], top_k or None) from {"images": ["<base64>", ...], "top_k": k}."""
    try:
        doc = json.loads(body, parse_int=bounded_int)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ApiError(400, "bad_json", f"body is not valid JSON ({why}); send {{\"images\": [\"<base64>\", ...]}}") from None
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
            hint = ("; it contains line breaks: encode without them (base64 -w0)" if "\n" in s or "\r" in s
                    else "")
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64{hint}", index=i) from None
    return out, doc.get("top_k")


def bounded_int(s: str) -> int:
    """A JSON integer; one of thousands of digits saturates (any count beyond
    the classes means all of them) instead of raising Python's digit-limit error."""
    return int(s) if len(s) <= 18 else (-1 if s.startswith("-") else 1) * 10**18


def parse_top_k(v, default: int, n_classes: int) -> int:
    """A positive integer (JSON number or decimal string); beyond the class
    count means all classes. Floats, booleans and other strings are a 400."""
    if v is None or v == "" or v == b"":
        return min(default, n_classes)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit():
        s = v.strip()
        v = n_classes if len(s) > MAX_TOP_K_DIGITS else int(s)
    if isinstance(v, float) and v.is_integer():  # JSON Schema: 3.0 is an integer, 2.7 and 1e999 are not
        v = min(int(v), n_classes + 1)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, "bad_top_k", f"top_k must be a positive integer, got {str(v)[:40]!r}")
    if v < 1:
        raise ApiError(400, "bad_top_k", f"top_k must be at least 1, got {v}")
    return min(v, n_classes)


class BodyBudget:
    """Bounds the request bytes held in memory across all requests (bodies,
    and the parts and images parsed from them), as DecodeBudget bounds
    decoding: many large uploads at once get 503 busy with Retry-After
    instead of taking the server's memory. A request counts its bytes from
    before it reads them until its answer is sent. When the last large
    request ends, the garbage collector runs and glibc is asked to hand its
    free pages back to the system. The collection is what frees most: a
    refused request's exception holds its traceback, whose frames hold the
    body, in a reference cycle (asyncio and anyio keep such exceptions on
    futures), and an idle server allocates too little to trigger the
    collector, so those bodies would stay until the next burst of traffic
    (bench_soak.py's uploads: +110 MB that a collection takes back to below
    the warmed-up size)."""

    TRIM_AFTER = 64 << 20

    def __init__(self, limit: int):
        self.limit, self.used, self.since_trim = limit, 0, 0
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            if n > 0 and self.used and self.used + n > self.limit:  # one request alone always fits (it is under --max-body-mb)
                raise ApiError(503, "busy", f"the server is holding {self.used:,} bytes of request bodies, the "
                               f"limit; retry in a moment", headers={"Retry-After": "1"})
            self.used += n
            self.since_trim += max(n, 0)

    def give(self, n: int) -> None:
        with self.lock:
            self.used -= n
            trim = self.used == 0 and self.since_trim >= self.TRIM_AFTER
            if trim:
                self.since_trim = 0
        if trim:  # rare (once per 64 MB of bodies), so the collection's pause (tens of ms) is affordable
            gc.collect()
            trim_heap()

    @contextmanager
    def account(self):
        held = BodyBytes(self)
        try:
            yield held
        finally:
            self.give(held.n)


class BodyBytes:
    """One request's share of the BodyBudget."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.n = budget, 0

    def grow(self, n: int) -> None:
        if n > 0:
            self.budget.take(n)
            self.n += n


def trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system. A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DecodeBudget:
    """Bounds the memory that decoding takes at once across all requests, in
    bytes as `decode_cost` counts them for each image's format, mode and size
    (a 40 MP 1-bit PNG and a 40 MP RGBA PNG differ sixfold), so many small
    files that decode to huge images (a 5 KB PNG of 40 MP) cannot exhaust
    memory together: a decode waits until its bytes fit, and after `wait_s`
    the request gets 503 busy with Retry-After. An image that could never fit
    is refused by the caller before it waits (413)."""

    def __init__(self, limit: int, wait_s: float = 30.0):
        self.limit, self.used, self.wait_s = limit, 0, wait_s
        self.cond = threading.Condition()

    def take(self, cost: int) -> int:
        """Wait until `cost` fits (blocking: from a worker thread), or 503;
        returns the bytes taken, for `give`."""
        cost = min(cost, self.limit)
        with self.cond:
            if not self.cond.wait_for(lambda: self.used + cost <= self.limit, self.wait_s):
                raise ApiError(503, "busy", f"decoding other images takes {self.used >> 20:,} MB of the "
                               f"{self.limit >> 20:,} MB decode budget; retry in a moment",
                               headers={"Retry-After": "1"})
            self.used += cost
        return cost

    def give(self, taken: int) -> None:
        with self.cond:
            self.used -= taken
            self.cond.notify_all()

    @contextmanager
    def hold(self, cost: int):
        taken = self.take(cost)
        try:
            yield
        finally:
            self.give(taken)


def header_cost(data: bytes, draft_size: int | None, max_pixels: int) -> int:
    """The bytes decoding this image takes (decode_cost, from the header
    alone); 0 if unreadable or over max_pixels (the decode then refuses it
    from its header, with the reason)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return 0 if w * h > max_pixels else decode_cost(im.format, im.mode, im.size, draft_size)
    except Exception:
        return 0
