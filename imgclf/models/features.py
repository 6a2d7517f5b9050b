"""Frozen-backbone features: computed once, cached on disk, reused.

With a frozen backbone, every epoch of the usual recipe recomputes the same
features. We run each image through the backbone once (and once flipped),
store the pooled feature vector keyed by the file's content hash, and train
the head on the cache for as many epochs as it needs, in seconds.

Cache layout: CACHE/features/<key>/shard-*.npy, written atomically at least
every FLUSH_SECONDS of extraction, each holding content hashes and float16
features, memory-mapped when read (FeatureCache). The key
covers the model, a hash of the backbone's actual weights, the preprocessing
and the variant (plain or flipped), so a fine-tuned backbone or another image
size never reads stale features, while new or changed files only compute what
is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from imgclf.data.loading import BadFileLog, ImageDataset, collate_hashed, hash_files, make_loader
from imgclf.data.preprocess import Preprocess, eval_transform, normalize
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_bytes, write_error
from imgclf.log import Progress, get_logger
from imgclf.models.same_pad import trace_to_onnx
from imgclf.ort import ort_session

log = get_logger(__name__)

VARIANTS = ("plain", "flip")


def default_cache_dir() -> Path:
    if os.environ.get("IMGCLF_CACHE_DIR"):
        return Path(os.environ["IMGCLF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


def state_hash(module: torch.nn.Module) -> str:
    """Hash of a module's weights (about 20 ms for Lite0): what makes two
    backbones produce the same features."""
    h = hashlib.blake2b(digest_size=12)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_key(model_name: str, backbone_hash: str, pp: Preprocess, variant: str) -> str:
    # v2: images far over the input size are shrunk before RGB (data/images.py: shrink).
    # v3: float16 memory-mapped shards (FeatureCache).
    desc = json.dumps({"model": model_name, "backbone": backbone_hash, "pp": pp.to_dict(), "variant": variant,
                       "v": 3}, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:20]


class FeatureCache:
    """Content hash -> feature vector for one key, in append-only shards.

    A shard is one .npy file of (hash, float16 vector) records, memory-mapped
    when read: a million images' features (1280-d) are 2.6 GB on disk and
    stay there, paged in as batches touch them, instead of 5 GB of float32
    in RAM. float16 keeps the features' first three significant digits, which
    the head's accuracy does not notice (bench/bench_memory.py). A shard is
    written atomically under a unique name, so several processes (torchrun
    ranks, even on several machines sharing the folder) can add to one cache
    at once: no torn or lost entries, at worst the same image twice.
    The index is one sorted array of hashes, so lookups are vectorised.
    With root=None the cache lives in memory only (--no-cache)."""

    def __init__(self, root: str | Path | None, key: str = "", meta: dict | None = None):
        self.dir = Path(root) / "features" / key if root is not None else None
        self.meta = meta or {}
        self._files: list[str] = []  # shard names already indexed
        self._shards: list[np.ndarray] = []  # structured arrays (hash, f), memory-mapped
        self._hashes = np.zeros(0, "S32")  # sorted
        self._where = np.zeros((0, 2), np.int64)  # (shard, row) of each sorted hash

    def load(self) -> FeatureCache:
        """Index the shards on disk not indexed yet (call again to see other
        processes' new shards). A damaged shard only costs recomputation."""
        if self.dir is None or not self.dir.exists():
            return self
        new = [p for p in sorted(self.dir.glob("shard-*.npy")) if p.name not in set(self._files)]
        added = []
        for shard in new:
            try:
                arr = np.load(shard, mmap_mode="r", allow_pickle=False)
                if arr.dtype.names != ("hash", "f") or arr.ndim != 1:
                    raise ValueError("not a feature shard")
            except Exception:
                log.warning(f"note: feature cache shard {shard} is damaged; removed, its images will be recomputed")
                try:
                    shard.unlink(missing_ok=True)
                except OSError:
                    pass  # a read-only cache: skipped, recomputed in memory
                continue
            self._files.append(shard.name)
            added.append(arr)
        self._index(added)
        return self

    def _index(self, shards: list[np.ndarray]) -> None:
        if not shards:
            return
        first = len(self._shards)
        self._shards += shards
        h = np.concatenate([self._hashes] + [np.asarray(s["hash"]) for s in shards])
        w = np.concatenate([self._where] + [np.stack([np.full(len(s), first + i), np.arange(len(s))], 1)
                                            for i, s in enumerate(shards)])
        order = np.argsort(h, kind="stable")
        self._hashes, self._where = h[order], w[order]

    def __len__(self) -> int:
        return len(np.unique(self._hashes)) if len(self._hashes) else 0

    def locate(self, hashes) -> np.ndarray:
        """(shard, row) of each hash, (-1, -1) where it is not cached. Stable:
        shards are only ever appended, so later additions never move it."""
        q = np.asarray(hashes, dtype="S32")
        if not len(self._hashes) or not len(q):
            return np.full((len(q), 2), -1, np.int64)
        i = np.minimum(np.searchsorted(self._hashes, q), len(self._hashes) - 1)
        return np.where((self._hashes[i] == q)[:, None], self._where[i], -1)

    def gather(self, where: np.ndarray) -> np.ndarray:
        """float16 features at (shard, row) places (from `locate`), read shard by shard."""
        dim = self._shards[0]["f"].shape[1] if self._shards else 0
        out = np.empty((len(where), dim), np.float16)
        shard, row = where[:, 0], where[:, 1]
        for s in np.unique(shard):
            m = shard == s
            out[m] = self._shards[s]["f"][row[m]]
        return out

    def add(self, hashes: list[str], feats: np.ndarray) -> None:
        if not hashes:
            return
        rec = np.empty(len(hashes), dtype=[("hash", "S32"), ("f", np.float16, (feats.shape[1],))])
        rec["hash"], rec["f"] = hashes, feats
        if self.dir is None:
            self._index([rec])
            return
        buf = io.BytesIO()
        np.save(buf, rec, allow_pickle=False)
        name = f"shard-{time.time_ns()}-{os.environ.get('RANK', '0')}-{uuid.uuid4().hex[:6]}.npy"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.exists():
                atomic_write_bytes(meta, json.dumps(self.meta, indent=2).encode())
            atomic_write_bytes(self.dir / name, buf.getvalue())
        except OSError as e:  # the cache is an optimisation: a full or read-only one is not the run's end
            cache_unwritable(self.dir, e)
            self.dir = None
        else:
            self._files.append(name)
        self._index([rec])


class FeatureRows:
    """Training rows of cached features, several variants stacked (row k is
    variant k // n of item k % n), read from the memory-mapped shards one
    batch at a time, so the head trains on more features than fit in RAM."""

    def __init__(self, caches: list[FeatureCache], positions: list[np.ndarray]):
        self.caches, self.positions = caches, positions
        self.n = len(positions[0]) if positions else 0

    def __len__(self) -> int:
        return self.n * len(self.caches)

    @property
    def nbytes(self) -> int:
        """Size in RAM when gathered as float16."""
        dims = [s["f"].shape[1] for c in self.caches for s in c._shards[:1]]
        return len(self) * (dims[0] if dims else 0) * 2

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        out = None
        for v, (cache, pos) in enumerate(zip(self.caches, self.positions)):
            m = idx // self.n == v
            if m.any():
                f = cache.gather(pos[idx[m] % self.n])
                out = np.empty((len(idx), f.shape[1]), np.float32) if out is None else out
                out[m] = f
        return out


_CACHE_SAID: list[Path] = []


def cache_unwritable(where: Path, e: OSError) -> None:
    """Say once per process that the cache cannot be written, and why; the
    work goes on without it (the cache only saves time)."""
    if not _CACHE_SAID:
        err = e if isinstance(e, ImgclfError) else write_error(where, e)
        log.warning(f"note: feature cache: {err.message}; going on without the cache ({err.fix}, or give --cache-dir "
                    f"a writable folder)")
    _CACHE_SAID.append(where)


def feature_caches(cache_dir: str | Path | None, model_name: str, backbone_hash: str, pp: Preprocess,
                   variants: tuple[str, ...], enabled: bool = True) -> dict[str, FeatureCache]:
    """One cache per variant for this backbone and preprocessing (in memory only when not enabled)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return {v: FeatureCache(root if enabled else None, feature_key(model_name, backbone_hash, pp, v),
                            {"model": model_name, "size": pp.size, "resize": pp.resize, "variant": v}).load()
            for v in variants}


def cache_info(root: str | Path) -> list[dict]:
    rows = []
    for d in sorted((Path(root) / "features").glob("*")):
        size = sum(f.stat().st_size for f in d.glob("*"))
        meta = {}
        if (d / "meta.json").exists():
            meta = json.loads((d / "meta.json").read_text())
        n = len(FeatureCache(d.parent.parent, d.name).load())
        rows.append({"key": d.name, "entries": n, "bytes": size, **meta})
    return rows


def cache_clear(root: str | Path) -> int:
    d = Path(root)
    n = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.exists() else 0
    for sub in ("features", "onnx"):
        shutil.rmtree(d / sub, ignore_errors=True)
    return n


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim).
    Batches of images and onnxruntime's buffers are freed, but glibc keeps
    the pages in fragmented heaps: measured (bench/bench_memory.py), a
    2,000-image extraction grew from 0.4 to 2 GB and 4,000 images to 2 GB more.
    Trimming every few batches (TRIM_EVERY) keeps it flat; a
    fixed low mmap threshold did too, but made every large allocation fault
    its pages in afresh: PyTorch eager inference ran 35% slower. glibc only."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# In the cached backbone's file name: bumped when the export changes, so older
# files are not reused (2: TF padding folded into the convolutions, models/same_pad.py).
ONNX_RECIPE = "r2"
ORT_BATCH = 16  # images per onnxruntime call when extracting features (see FeatureExtractor.__call__)


class FeatureExtractor:
    """uint8 NCHW batch -> pooled features, on torch or onnxruntime.

    onnxruntime is about 2x faster than eager PyTorch for EfficientNet-Lite0 on
    this 2-core CPU (70 vs 35 images/s at 224 px, bench/bench_pipeline.py), so
    `auto` uses it on CPU. The exported backbone is cached next to the features,
    keyed by the same weights hash."""

    def __init__(self, backbone: torch.nn.Module, pp: Preprocess, device: torch.device, engine: str = "auto",
                 cache_dir: str | Path | None = None, backbone_hash: str | None = None):
        self.backbone, self.pp, self.device = backbone.eval(), pp, device
        self.backbone_hash = backbone_hash or state_hash(backbone)
        self.encoded = 0  # images run through the backbone (cache misses), counted by extract
        self.session = None
        self.engine = "torch"
        if engine == "auto":
            engine = "onnxruntime" if device.type == "cpu" and _has_ort() else "torch"
        if engine == "onnxruntime":
            self.session = self._ort_session(cache_dir, self.backbone_hash)
            self.engine = "onnxruntime"
        else:
            self.backbone.to(device)
            if device.type == "cpu":
                # channels_last is markedly faster for these convnets on CPU (bench/bench_pipeline.py).
                self.backbone.to(memory_format=torch.channels_last)

    def _ort_session(self, cache_dir, bhash: str):
        """The backbone as ONNX, exported once per weights hash and size. The
        file's name carries a hash of its bytes, checked on every load: a
        damaged file (a full disk, a killed copy) is rebuilt with one line
        said, never a protobuf traceback."""
        folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "onnx"
        stem = f"backbone-{bhash}-{self.pp.size}-{ONNX_RECIPE}"
        for path in sorted(folder.glob(f"{stem}-*.onnx")):
            data = path.read_bytes()
            if path.stem.endswith("-" + hashlib.sha256(data).hexdigest()[:16]):
                try:
                    return ort_session(data, torch.get_num_threads())
                except Exception:
                    pass
            log.warning(f"note: cached backbone {path} is damaged; rebuilding it")
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: rebuilt in memory
        data = self._export_onnx()
        try:
            atomic_write_bytes(folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:16]}.onnx", data)
        except OSError as e:  # exported again next time, that is all
            cache_unwritable(folder, e)
        return ort_session(data, torch.get_num_threads())

    def _export_onnx(self) -> bytes:
        self.backbone.cpu().to(memory_format=torch.contiguous_format)
        example = torch.zeros(1, 3, self.pp.size, self.pp.size)
        return trace_to_onnx(self.backbone, example, ["x"], ["features"]).SerializeToString()

    @torch.inference_mode()
    def __call__(self, x_uint8: torch.Tensor) -> np.ndarray:
        x = normalize(x_uint8, self.pp)
        if self.session is not None:
            # Chunks of ORT_BATCH: onnxruntime's memory arena keeps the peak of
            # the largest batch (it grows with the batch), and 16 is as fast as
            # 32 on CPU. Without the arena every batch faults its buffers in
            # afresh, which was much slower (docs/benchmarks.md).
            xs = x.numpy()
            return np.concatenate([self.session.run(None, {"x": xs[i:i + ORT_BATCH]})[0]
                                   for i in range(0, len(xs), ORT_BATCH)])
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).float().cpu().numpy()


def _has_ort() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        return False


def extract(extractor: FeatureExtractor, root: str | Path, items: list[tuple[str, int]],
            caches: dict[str, FeatureCache], batch_size: int = 32, workers: int = 1,
            bad: BadFileLog | None = None, desc: str = "features", progress: bool = True,
            hashes: list[str] | None = None, rows: bool = False):
    """Features of `items` for each variant in `caches` ("plain", "flip").

    Returns ({variant: features[N', D]}, labels[N'], kept_index[N']) for the N'
    items that could be read; rows=True gives one FeatureRows over the variants
    instead of the arrays (read from the shards batch by batch). Only images
    missing from a variant's cache are decoded and run through the backbone.
    `hashes` (given or computed) is updated in place for the items decoded:
    features are stored and found under the hash of the bytes they came from."""
    if hashes is None:
        hashes = hash_files([Path(root) / rel for rel, _ in items])
    pos = {v: c.locate(hashes)[:, 0] for v, c in caches.items()}
    todo = np.flatnonzero(np.any([p < 0 for p in pos.values()], axis=0)) if items else []
    if len(todo):
        _compute(extractor, root, items, [int(i) for i in todo], hashes, caches, batch_size, workers, bad, desc,
                 progress)
    pos = {v: c.locate(hashes) for v, c in caches.items()}
    kept = np.flatnonzero(np.all([p[:, 0] >= 0 for p in pos.values()], axis=0)) if items else np.zeros(0, np.int64)
    if rows:
        feats = FeatureRows(list(caches.values()), [p[kept] for p in pos.values()])
    else:
        feats = {v: caches[v].gather(p[kept]).astype(np.float32) for v, p in pos.items()}
    labels = [items[i][1] for i in kept]
    if labels and isinstance(labels[0], tuple):  # multi-label: an object array of tuples (datasets.multi_hot)
        labels_arr = np.empty(len(labels), dtype=object)
        labels_arr[:] = labels
        labels = labels_arr
    else:
        labels = np.array(labels, dtype=np.int64)
    return feats, labels, kept


# Batches between heap trims: trimming after every batch cost 5-8% of the
# extraction speed (bench: 60 vs 65 images/s); every 8 still bounds memory.
TRIM_EVERY = 8

# New features reach the on-disk cache at least this often (IMGCLF_FLUSH_SECONDS overrides).
FLUSH_SECONDS = float(os.environ.get("IMGCLF_FLUSH_SECONDS", 20.0))


def _compute(extractor: FeatureExtractor, root, items, todo: list[int], hashes: list[str],
             caches: dict[str, FeatureCache], batch_size: int, workers: int,
             bad: BadFileLog | None, desc: str, progress: bool) -> None:
    """Run the backbone over items[todo], writing shards as it goes (every
    FLUSH_SECONDS), so a crash at 90% of a large dataset keeps 90% of the work."""
    ds = ImageDataset(root, [items[i] for i in todo], eval_transform(extractor.pp), draft_size=extractor.pp.draft_size,
                      hashed=True)
    loader = make_loader(ds, batch_size, shuffle=False, workers=workers, collate_fn=collate_hashed)
    new: dict[str, list] = {v: [] for v in caches}
    new_h: list[str] = []

    def flush():
        for v, c in caches.items():
            if new_h:
                c.add(new_h, np.concatenate(new[v]))
            new[v].clear()
        new_h.clear()

    last = time.time()
    with Progress(total=len(todo), desc=desc, unit="img", enabled=progress) as bar:
        for b, (x, _, idx, badb, got) in enumerate(loader):
            for j, reason in badb:
                if bad is not None:
                    bad.add(items[todo[j]][0], reason)
            if x is not None:
                for v in caches:
                    new[v].append(extractor(torch.flip(x, dims=[3]) if v == "flip" else x))
                for j, h in zip(idx, got):  # the hash of the bytes decoded (the file may have changed since)
                    hashes[todo[int(j)]] = h
                new_h += got
                extractor.encoded += len(idx)
            bar.update(len(badb) + (0 if x is None else len(x)))
            if b % TRIM_EVERY == TRIM_EVERY - 1:
                release_freed_memory()
            if time.time() - last > FLUSH_SECONDS:
                flush()
                last = time.time()
    flush()
