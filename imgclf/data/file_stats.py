"""What `imgclf check` learns of each file from one small thumbnail (format,
mode, size, how photo-like, perceptual and content hashes), streamed into
numpy columns (FileStats), a process per core for big datasets. Detection's
check reads its images through this too."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np

from imgclf.data import near_dup as nd
from imgclf.data.images import BadImage, open_image, sniff
from imgclf.data.loading import default_workers, file_hash
from imgclf.data.near_dup import image_signature
from imgclf.log import Progress


def _image_stats(path: Path, hashes: bool = True) -> dict:
    """Format, mode, size, how 'photo-like' the pixels are and the perceptual
    hash, from one small thumbnail (decoding at reduced scale keeps this fast
    on big JPEGs)."""
    from PIL import Image

    fmt, mode, size = sniff(path)  # BadImage for non-images, with the reason
    img = open_image(path, draft_size=64)
    with Image.open(path) as raw:
        frames = getattr(raw, "n_frames", 1)
    img.thumbnail((64, 64))
    a = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
    _, counts = np.unique(a, axis=0, return_counts=True)
    flat = float(counts.max() / len(a))
    sig = image_signature(img) if hashes else (None, None)
    # A graphic has a flat area covering most of it, and few distinct colours
    # outside it (flat fills, anti-aliased edges). A photo on a plain
    # background is flat too, but nearly every pixel of its subject differs
    # from the next (noise, shading), however small the image: "variety" is
    # distinct colours per pixel outside the flat area, which a count of
    # colours alone is not on a 32 px image (1,024 pixels in all).
    return {"format": fmt, "mode": mode, "size": size, "frames": frames, "std": float(a.std()), "flat": flat,
            "colours": int(len(counts)), "variety": float(len(counts) / max(1.0, (1 - flat) * len(a))),
            "phash": sig[0], "thumb": sig[1]}


class FileStats:
    """What check knows of each file, in numpy columns indexed like `entries`:
    about 1.2 KB a file (mostly the 32 px grey thumbnail the near-duplicate
    check compares), so a million files cost ~1.2 GB. ok[k] says whether
    file k could be read."""

    def __init__(self, n: int):
        self.ok = np.zeros(n, bool)
        self.fmt = np.zeros(n, np.uint8)  # index into self.names["format"]
        self.mode = np.zeros(n, np.uint8)
        self.size = np.zeros((n, 2), np.int32)
        self.frames = np.zeros(n, np.int32)
        self.std = np.zeros(n, np.float32)
        self.flat = np.zeros(n, np.float32)
        self.colours = np.zeros(n, np.int32)
        self.variety = np.zeros(n, np.float32)
        self.phash = np.zeros((n, nd.N_VIEWS), np.uint64)
        self.thumb = np.zeros((n, nd.THUMB, nd.THUMB), np.uint8)
        self.content = np.zeros(n, "S32")  # file_hash: exact copies
        self.names: dict[str, list[str]] = {"format": [], "mode": []}

    def _code(self, kind: str, name: str) -> int:
        names = self.names[kind]
        if name not in names:
            names.append(name)
        return names.index(name)

    def set(self, k: int, st: dict) -> None:
        self.ok[k] = True
        self.fmt[k], self.mode[k] = self._code("format", st["format"]), self._code("mode", st["mode"])
        self.size[k], self.frames[k], self.std[k] = st["size"], st["frames"], st["std"]
        self.flat[k], self.colours[k], self.content[k] = st["flat"], st["colours"], st["content"]
        self.variety[k] = st["variety"]
        if st["phash"] is not None:
            self.phash[k], self.thumb[k] = st["phash"], st["thumb"]

    def counts(self, kind: str) -> dict[str, int]:
        col = self.fmt if kind == "format" else self.mode
        return {name: int((col[self.ok] == i).sum()) for i, name in enumerate(self.names[kind])}


def _stats_or_reason(path: Path, hashes: bool) -> dict | str:
    try:
        return {**_image_stats(path, hashes), "content": file_hash(path)}
    except BadImage as e:
        return e.reason
    except Exception as e:  # anything PIL throws is a bad file, not a crash of check
        return f"unreadable: {e}"


def _scan_chunk(paths: list[Path], hashes: bool) -> list[dict | str]:
    return [_stats_or_reason(p, hashes) for p in paths]


def scan_files(paths: Iterable[Path], n: int, progress: bool = True, hashes: bool = True
               ) -> tuple[list[tuple[int, str]], FileStats]:
    """Per readable file of the `n` paths its statistics (FileStats, indexed
    like `paths`: format, size, perceptual and content hashes), streamed into
    columns; the unreadable ones as (index, why). Decoding thumbnails is CPU
    work, so chunks of files go to a process per core. Detection's check
    reads its images through this too."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bad, stats = [], FileStats(n)
    step, it = 256, iter(paths)
    chunks = iter(lambda: list(islice(it, step)), [])
    # Below a few thousand files, starting the processes costs more than it saves. forkserver:
    # the workers start clean, not as forks of a process that may hold torch's threads.
    procs = max(1, 2 * default_workers()) if n >= 2000 else 1
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("forkserver")) if procs > 1 else None
    results = _bounded_map(pool, chunks, hashes, 4 * procs) if pool else (_scan_chunk(c, hashes) for c in chunks)
    try:
        with Progress(total=n, desc="checking", unit="img", enabled=progress) as bar:
            for i, part in enumerate(results):
                for j, r in enumerate(part):
                    k = i * step + j
                    if isinstance(r, str):
                        bad.append((k, r))
                    else:
                        stats.set(k, r)
                bar.update(len(part))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return bad, stats


def _bounded_map(pool, chunks, hashes: bool, window: int):
    """pool.map in order, with at most `window` chunks in flight (Executor.map
    would queue every chunk of a million files at once)."""
    from collections import deque

    pending = deque()
    for c in chunks:
        pending.append(pool.submit(_scan_chunk, c, hashes))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
