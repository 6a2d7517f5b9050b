"""Reading a dataset's files: content hashes (the feature cache's keys),
header scans, the DataLoader (each file read once; its bytes hashed and
decoded), the log of bad files, and a look at a sample of headers for `auto`.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from imgclf.data.datasets import Splits, drop_files, multi_hot
from imgclf.data.images import BadImage, decode, open_regular, read_file, sniff
from imgclf.log import get_logger

log = get_logger(__name__)

# path -> (size, mtime_ns, hash): training, calibration, the unknown scorer and
# the final evaluation each look up the same files; hashing each once
# saves reading them again. A changed file is re-hashed.
_HASHES: dict[str, tuple[int, int, str]] = {}


def content_hash(data: bytes) -> str:
    """The identity of an image's bytes, for the feature cache and duplicate checks."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: str | Path) -> str:
    """content_hash of a file, streamed (regular files only: a device or FIFO
    is BadImage, never read). Same digest as content_hash of its bytes."""
    key = str(path)
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        known = _HASHES.get(key)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        h = hashlib.blake2b(digest_size=16)
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        except OSError as e:
            raise BadImage(key, f"cannot read file: {e.strerror or e}") from None
    _HASHES[key] = (st.st_size, st.st_mtime_ns, h.hexdigest())
    return h.hexdigest()


def _hash_or_blank(path) -> str:
    try:
        return file_hash(path)
    except BadImage:
        return ""


def hash_files(paths: list, threads: int = 8) -> list[str]:
    """file_hash of many files on a few threads: hashlib releases the GIL on
    large buffers and the reads wait on the disk, so threads overlap both
    (a shared network filesystem gains the most). An unreadable file (gone,
    a device, no permission) hashes to "": never found in a cache, so the
    loader tries it and reports why, once."""
    if len(paths) < 64:
        return [_hash_or_blank(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_hash_or_blank, paths, chunksize=256))


def scan(splits: Splits, names=("train", "val", "test"), share=None) -> list[tuple[str, str]]:
    """Header-check files (no decode, fast): (relative path, reason) of the bad
    ones, dropped from `splits`. share(list) -> the part this process checks
    (torchrun: each rank its share; drop_files then removes every rank's
    finds). Files that only fail at decode time (truncated data) are caught
    and reported by the loader."""
    bad = []
    for name in names:
        items = getattr(splits, name)
        for rel, _ in (share(items) if share else items):
            try:
                sniff(splits.path(rel))
            except BadImage as e:
                bad.append((rel, e.reason))
    if share is None:
        drop_files(splits, {rel for rel, _ in bad}, names)
    return bad


class ImageDataset:
    """(root, [(relpath, label)]) -> (uint8 CHW tensor | None, label, index, reason).

    A file that fails to decode yields None and the reason instead of raising,
    so one bad file among 100,000 does not end a long run; `collate` drops it
    and passes the reason up to be reported once. With hashed=True each item
    also carries the content_hash of the very bytes it decoded (collate_hashed):
    the feature cache's key, which a file rewritten between hashing and
    decoding can then never mislabel."""

    def __init__(self, root: str | Path, items: list[tuple[str, int]], transform, draft_size: int | None = None,
                 num_classes: int | None = None, hashed: bool = False):
        """num_classes: given for multi-label items, whose tuples become 0/1 target vectors."""
        self.root, self.items, self.transform, self.draft_size = Path(root), items, transform, draft_size
        self.num_classes, self.hashed = num_classes, hashed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, y = self.items[i]
        if self.num_classes is not None:
            y = multi_hot([y], self.num_classes)[0]
        out, h = self._load(rel, y, i)
        return (*out, h) if self.hashed else out

    def _load(self, rel: str, y, i: int) -> tuple[tuple, str | None]:
        try:
            data = read_file(self.root / rel)
            img = decode(data, str(self.root / rel), draft_size=self.draft_size)
            return (self.transform(img), y, i, None), content_hash(data) if self.hashed else None
        except BadImage as e:
            return (None, y, i, e.reason), None
        except Exception as e:  # a transform failing on an odd image: reported and skipped, not a dead worker
            return (None, y, i, f"cannot transform this image ({type(e).__name__}: {e})"), None


def collate(batch):
    import numpy as np
    import torch

    good = [b for b in batch if b[0] is not None]
    bad = [(b[2], b[3]) for b in batch if b[0] is None]
    if not good:
        return None, None, None, bad
    x = torch.stack([b[0] for b in good])
    ys = [b[1] for b in good]
    if hasattr(ys[0], "shape"):  # multi-hot rows (ImageDataset with num_classes)
        y = torch.from_numpy(np.stack(ys))
    elif isinstance(ys[0], tuple):  # multi-label tuples where only the images matter (feature extraction)
        y = ys
    else:
        y = torch.tensor(ys, dtype=torch.long)
    idx = torch.tensor([b[2] for b in good], dtype=torch.long)
    return x, y, idx, bad


def collate_hashed(batch):
    """collate for ImageDataset(hashed=True): also the content hashes of the good items, in order."""
    return (*collate([b[:4] for b in batch]), [b[4] for b in batch if b[0] is not None])


def default_workers() -> int:
    """DataLoader workers for this machine. On 2 cores one worker decodes while
    the main process computes; more would fight the model's threads."""
    import os

    n = os.cpu_count() or 1
    return 0 if n <= 1 else min(8, max(1, n // 2))


# Below this file-size limit (`ulimit -f`) DataLoader workers are not used:
# they hand batches over as shared-memory files, which the limit also bounds,
# and a worker that fails to write one leaves the main process waiting forever.
MIN_FILE_LIMIT_FOR_WORKERS = 1 << 30
_SAID_LIMIT: list[int] = []


def _small_file_limit() -> bool:
    try:
        import resource
    except ImportError:
        return False
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    small = soft != resource.RLIM_INFINITY and soft < MIN_FILE_LIMIT_FOR_WORKERS
    if small and not _SAID_LIMIT:
        _SAID_LIMIT.append(soft)
        log.warning(f"note: the file-size limit (ulimit -f) is {soft:,} bytes: images are decoded in this process, "
                    f"without DataLoader workers (their batches are files the limit would cut)")
    return small


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0, sampler=None,
                collate_fn=None):
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    workers = workers if workers == 0 or not _small_file_limit() else 0
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_fn or collate, generator=g, persistent_workers=False,
        prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available(),
    )


class BadFileLog:
    """Reports each bad file once (path and reason) and counts them for the summary."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        if path not in self.seen:
            self.seen[path] = reason
            log.warning(f"skipped {path}: {reason}")


@dataclass
class ImageLook:
    """What a sample of headers says about a dataset's images (for `auto`)."""

    n: int  # headers read
    side: int  # 90th percentile of the longer side, pixels
    grey: float  # share of single-channel images (L, LA, 1, I, I;16, F)

    def describe(self) -> str:
        return f"{self.side}px (90th percentile of the longer side), {100 * self.grey:.0f}% grayscale, {self.n} sampled"


def look_at(splits: Splits, n: int = 200, seed: int = 0) -> ImageLook | None:
    """Sizes and modes of up to n training images, from headers only (no
    decode: a few ms for 200 files); None when none could be read."""
    import numpy as np

    items = splits.train if len(splits.train) <= n else random.Random(seed).sample(splits.train, n)
    sides, grey = [], 0
    for rel, _ in items:
        try:
            _, mode, (w, h) = sniff(Path(splits.root) / rel)
        except BadImage:
            continue  # reported by the file check
        sides.append(max(w, h))
        grey += mode in ("1", "L", "LA", "I", "I;16", "F")
    if not sides:
        return None
    return ImageLook(len(sides), int(np.percentile(sides, 90)), grey / len(sides))
