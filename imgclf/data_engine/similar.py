"""Similarity search over a run's training images: `imgclf similar` and /v1/similar.

The index holds the run's embeddings of its training images (pooled backbone
features, models/embedder.py; read from the feature cache training filled),
L2-normalised, so similarity is cosine; plus a small JPEG thumbnail of each
image, so a server can show neighbours without ever opening a path a request
could name. It is built once per model.pt and saved as RUN/similar.npz.

Search is the neighbour module's (inference/neighbours.py): exact below
HNSW_MIN training images, an HNSW graph from there on, built once and saved
as RUN/similar.usearch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.images import BadImage, thumbnail
from imgclf.data.loading import BadFileLog
from imgclf.errors import DataError
from imgclf.inference import expand_paths, neighbours
from imgclf.inference.neighbours import CosineGraph, knn, unit_rows
from imgclf.inference.torch_predictor import TorchPredictor
from imgclf.io import atomic_write_bytes
from imgclf.log import get_logger
from imgclf.runs import RunDir

log = get_logger(__name__)

THUMB_SIZE = 96  # pixels, longest side; about 3 KB as JPEG


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
    _graph: CosineGraph | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, features: np.ndarray, k: int) -> list[list[dict]]:
        """The k most similar training images for each row of raw embeddings."""
        graph = self.graph().index if len(self) >= neighbours.HNSW_MIN else None
        ids, sims = knn(self.vectors, unit_rows(features), k, graph)
        return [[{"id": int(i), "path": self.paths[i], "label": self.classes[int(self.labels[i])],
                  "similarity": round(float(s), 4)} for i, s in zip(row_i, row_s)] for row_i, row_s in zip(ids, sims)]

    def graph(self) -> CosineGraph:
        """The HNSW graph: memory-mapped from graph_file when saved, else built now."""
        if self._graph is None:
            self._graph = CosineGraph(self.vectors, self.graph_file)
        return self._graph

    def thumbnail(self, i: int) -> bytes:
        return self.thumbs[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, vectors=self.vectors, paths=np.array(self.paths), labels=self.labels,
                 classes=np.array(self.classes), thumbs=self.thumbs, offsets=self.offsets,
                 meta=np.array(json.dumps({"model_sha256": self.model_sha, "version": 1})))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> SimilarityIndex:
        with np.load(path, allow_pickle=False) as z:  # arrays of numbers and strings only
            meta = json.loads(str(z["meta"]))
            return cls(z["vectors"], [str(p) for p in z["paths"]], z["labels"], [str(c) for c in z["classes"]],
                       z["thumbs"], z["offsets"], meta["model_sha256"])


def build_index(run, clf, workers: int = 1, progress: bool = True) -> SimilarityIndex:
    """Embeddings and thumbnails of the run's training images (features from the cache)."""
    splits = run.splits()
    feats, labels, kept = clf.features_items(splits.root, splits.train, workers=workers, progress=progress,
                                             bad=BadFileLog())
    paths = [splits.train[int(i)][0] for i in kept]
    if not paths:  # e.g. the data moved: an index of nothing would answer every query with nothing
        raise DataError(f"none of the run's {len(splits.train)} training images can be read under {splits.root}",
                        "put the data back there, or give its new place: imgclf evaluate RUN DATA")
    thumbs = [thumbnail(splits.path(p), THUMB_SIZE) or b"" for p in paths]
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
    if len(index) < neighbours.HNSW_MIN:
        return index
    index.graph_file = run.similar_graph_file
    if not index.graph_file.exists():
        log.warning(f"building the HNSW graph of {len(index):,} images (once; saved as {index.graph_file})")
        index.graph().save(index.graph_file)
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
