"""Similarity search over a run's training images: `imgclf similar` and /v1/similar.

The index holds the run's embeddings of its training images (pooled backbone
features, inference/embed.py; read from the feature cache training filled),
L2-normalised, so similarity is cosine; plus a small JPEG thumbnail of each
image, so a server can show neighbours without ever opening a path a request
could name. It is built once per model.pt and saved as RUN/similar.npz.

Search is exact numpy brute force (one matrix-vector product) below
HNSW_MIN training images, and an HNSW graph (usearch) from there on, built
once and saved as RUN/similar.usearch. bench/bench_index.py measured, for
1280-d vectors on this 2-core CPU (shared with other sessions): brute force
1.8 ms at 10k, 9.6 ms at 50k, 19-32 ms at 100k and 84 ms at 250k vectors;
HNSW 2-3.5 ms at 50k-100k, its graph built in 82 s (50k) and 280-290 s
(100k) (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.log import get_logger
from imgclf.data.images import BadImage, open_image
from imgclf.data.datasets import BadFileLog
from imgclf.io import atomic_write_bytes
from imgclf.inference.predictor import expand_paths
from imgclf.runs import RunDir
from imgclf.inference.torch_predictor import TorchPredictor

log = get_logger(__name__)

# Measured (bench/bench_index.py, docs/benchmarks.md): brute force takes
# 9.6 ms at 50k and 19-32 ms at 100k (quiet / loaded machine), still instant
# next to embedding the query image, while HNSW there saves < 30 ms a query
# for minutes of graph building (82 s at 50k, 280 s at 100k) and misses 6-15%
# of the true neighbours. Brute force nears 50 ms by about 150k (84 ms at
# 250k under load): from there a saved graph's 2-4 ms is worth its build.
HNSW_MIN = 150_000
# expansion_search: at 100k vectors 64 found 0.855 of the true top 10 in
# 2.1 ms, 128 found 0.943 in 3.5 ms, 256 0.973 in 6.0 ms; 128 for recall
# at a cost still ~10x under brute force. (usearch forgets it on restore.)
HNSW_EF_SEARCH = 128
THUMB_SIZE = 96  # pixels, longest side; about 3 KB as JPEG


def import_usearch():
    """usearch.index, imported after onnxruntime: the other way round,
    onnxruntime's import crashes the process in libstdc++ (usearch 2.26,
    onnxruntime 1.2x, this machine; tests/test_data_engine.py checks it)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    from usearch import index

    return index


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32), so a dot product is a cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def brute_force(X: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product of unit rows: (ids (nq, k), similarities (nq, k)), best first."""
    k = min(k, len(X))
    S = Q @ X.T
    part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < len(X) else np.tile(np.arange(len(X)), (len(Q), 1))
    sims = np.take_along_axis(S, part, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(sims, order, axis=1)


def nearest_distance(Q: np.ndarray, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Cosine distance (1 - similarity) from each unit row of Q to its nearest
    row of X, in chunks so memory stays at chunk x len(X)."""
    out = np.empty(len(Q), np.float32)
    for i in range(0, len(Q), chunk):
        out[i:i + chunk] = 1.0 - (Q[i:i + chunk] @ X.T).max(axis=1)
    return out


@dataclass
class SimilarityIndex:
    vectors: np.ndarray  # (N, D) unit rows, float32
    paths: list[str]  # relative to the run's data root
    labels: np.ndarray  # (N,) class index
    classes: list[str]
    thumbs: np.ndarray  # every thumbnail's JPEG bytes, concatenated (uint8)
    offsets: np.ndarray  # (N + 1,) where each thumbnail starts and ends in `thumbs`
    model_sha: str  # sha256 of the model.pt it was built from
    graph_file: Path | None = None  # the saved HNSW graph (RUN/similar.usearch), when len >= HNSW_MIN
    _hnsw: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, features: np.ndarray, k: int) -> list[list[dict]]:
        """The k most similar training images for each row of raw embeddings."""
        Q = unit_rows(features)
        if len(self) >= HNSW_MIN:
            ids, sims = self._search_hnsw(Q, k)
        else:
            ids, sims = brute_force(self.vectors, Q, k)
        return [[{"id": int(i), "path": self.paths[i], "label": self.classes[int(self.labels[i])],
                  "similarity": round(float(s), 4)} for i, s in zip(row_i, row_s)] for row_i, row_s in zip(ids, sims)]

    def hnsw(self):
        """The HNSW graph: memory-mapped from graph_file when saved (building
        one takes minutes at 100k images), else built now."""
        if self._hnsw is None:
            usearch = import_usearch()
            if self.graph_file is not None and self.graph_file.exists():
                self._hnsw = usearch.Index.restore(str(self.graph_file), view=True)
            else:
                idx = usearch.Index(ndim=self.vectors.shape[1], metric="cos", dtype="f32", connectivity=16,
                                    expansion_add=128)
                idx.add(np.arange(len(self)), self.vectors)
                self._hnsw = idx
            self._hnsw.expansion_search = HNSW_EF_SEARCH
        return self._hnsw

    def _search_hnsw(self, Q: np.ndarray, k: int):
        m = self.hnsw().search(Q, min(k, len(self)))
        keys, dist = np.atleast_2d(m.keys), np.atleast_2d(m.distances)
        return keys.astype(np.int64), 1.0 - dist

    def thumbnail(self, i: int) -> bytes:
        return self.thumbs[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, paths=np.array(self.paths), labels=self.labels,
                 classes=np.array(self.classes), thumbs=self.thumbs, offsets=self.offsets,
                 meta=np.array(json.dumps({"model_sha256": self.model_sha, "version": 1})))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> "SimilarityIndex":
        with np.load(path, allow_pickle=False) as z:  # arrays of numbers and strings only
            meta = json.loads(str(z["meta"]))
            return cls(z["vectors"], [str(p) for p in z["paths"]], z["labels"], [str(c) for c in z["classes"]],
                       z["thumbs"], z["offsets"], meta["model_sha256"])


def make_thumbnail(path: str | Path, size: int = THUMB_SIZE) -> bytes:
    """A small JPEG of an image (decoded safely, EXIF-rotated); b"" if unreadable."""
    try:
        img = open_image(path, draft_size=2 * size)
    except BadImage:
        return b""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def build_index(run, clf, workers: int = 1, progress: bool = True) -> SimilarityIndex:
    """Embeddings and thumbnails of the run's training images (features from the cache)."""
    splits = run.splits()
    feats, labels, kept = clf.features_items(splits.root, splits.train, workers=workers, progress=progress,
                                             bad=BadFileLog())
    paths = [splits.train[int(i)][0] for i in kept]
    thumbs = [make_thumbnail(splits.path(p)) for p in paths]
    offsets = np.zeros(len(thumbs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in thumbs])
    return SimilarityIndex(unit_rows(feats["plain"]), paths, labels.astype(np.int64), list(splits.classes),
                           np.frombuffer(b"".join(thumbs), np.uint8).copy(), offsets, run.model_sha256())


def load_index(run, clf, workers: int = 1, progress: bool = True) -> SimilarityIndex:
    """RUN/similar.npz if it was built from this model.pt, else built now and saved."""
    path = run.similar_file
    if path.exists():
        try:
            index = SimilarityIndex.load(path)
            if index.model_sha == run.model_sha256():
                return with_graph(index, run)
        except Exception:  # damaged or from another version: rebuilt below, said once
            log.warning(f"note: {path} is unreadable; rebuilding it")
    log.warning(f"building the similarity index of {run}'s training images (once; saved as {path})")
    run.similar_graph_file.unlink(missing_ok=True)  # a graph of the old vectors
    index = build_index(run, clf, workers, progress)
    atomic_write_bytes(path, index.to_bytes())
    return with_graph(index, run)


def with_graph(index: SimilarityIndex, run) -> SimilarityIndex:
    """At HNSW_MIN images or more, the HNSW graph saved beside the index (built once, then memory-mapped)."""
    if len(index) < HNSW_MIN:
        return index
    index.graph_file = run.similar_graph_file
    if not index.graph_file.exists():
        import os
        import tempfile

        log.warning(f"building the HNSW graph of {len(index):,} images (once; saved as {index.graph_file})")
        fd, tmp = tempfile.mkstemp(dir=index.graph_file.parent, suffix=".tmp")
        os.close(fd)
        try:
            index.hnsw().save(tmp)
            os.replace(tmp, index.graph_file)  # atomic, as every run file
        finally:
            Path(tmp).unlink(missing_ok=True)
    return index


def similar_images(cfg) -> list[dict]:
    """`imgclf similar RUN IMAGE...`: the k nearest training images of each image."""
    run = RunDir(cfg.run)
    clf = TorchPredictor.from_run(run.path, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir)
    index = load_index(run, clf, progress=False)
    out = []
    for p in expand_paths(cfg.images):
        try:
            x = clf.prepare(p)
        except BadImage as e:
            out.append({"path": p, "error": e.reason})
            continue
        out.append({"path": p, "neighbours": index.search(clf.embed(x[None]), cfg.k)[0]})
    return out


def format_similar(results: list[dict], root: str = "") -> str:
    lines = []
    for r in results:
        lines.append(r["path"])
        if "error" in r:
            lines.append(f"  ERROR {r['error']}")
            continue
        for rank, nb in enumerate(r["neighbours"], 1):
            lines.append(f"  {rank:>3}  {nb['similarity']:.3f}  {nb['label']:<12} {Path(root) / nb['path']}")
    return "\n".join(lines)
