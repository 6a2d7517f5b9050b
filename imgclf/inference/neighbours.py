"""Cosine nearest neighbours: the one place imgclf compares embeddings.

Vectors are L2-normalised first (`unit_rows`), so a dot product is a cosine
similarity and 1 - it a cosine distance. Who uses what:
  knn / CosineGraph   `imgclf similar`, /v1/similar (data_engine/similar.py),
                      suggest's density (data_engine/suggest.py)
  nearest_distance    suggest's distance to the labelled images
  similar_pairs       near-duplicates by embedding (data_engine/near_dup.py)
  kth_distance        the open-set unknown score (inference/unknown.py), in
                      torch, because it is traced into the exported ONNX and
                      LiteRT graphs

Search is exact numpy (matrix products, in chunks) below HNSW_MIN vectors,
and an HNSW graph (usearch) from there on, built once and saved by its user.
The crossover was measured by bench/bench_index.py (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

# Exact search stays instant next to embedding the query image up to about
# 150k vectors (bench/bench_index.py); beyond, a saved graph is worth its
# minutes of building.
HNSW_MIN = 150_000
# Candidates explored per HNSW query: 128 trades a few ms for recall (docs/benchmarks.md).
# usearch forgets it when a graph is restored, so it is set on every open.
HNSW_EF_SEARCH = 128
QUERY_CHUNK = 2048  # query rows per matrix product: memory stays at chunk x len(X)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32), so a dot product is a cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(X: np.ndarray, Q: np.ndarray, k: int, graph=None) -> tuple[np.ndarray, np.ndarray]:
    """Top k rows of X for each row of Q, both unit rows: (ids (nq, k),
    similarities (nq, k)), best first. Exact, unless an HNSW `graph` of X
    (CosineGraph.index) is given."""
    k = min(k, len(X))
    if graph is not None:
        m = graph.search(Q, k)
        return np.atleast_2d(m.keys).astype(np.int64), 1.0 - np.atleast_2d(m.distances)
    parts = [_exact(X, Q[i:i + QUERY_CHUNK], k) for i in range(0, len(Q), QUERY_CHUNK)]
    if not parts:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _exact(X: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    S = Q @ X.T
    part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < len(X) else np.tile(np.arange(len(X)), (len(Q), 1))
    sims = np.take_along_axis(S, part, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(sims, order, axis=1)


def nearest_distance(Q: np.ndarray, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Cosine distance from each unit row of Q to its nearest row of X."""
    out = np.empty(len(Q), np.float32)
    for i in range(0, len(Q), chunk):
        out[i:i + chunk] = 1.0 - (Q[i:i + chunk] @ X.T).max(axis=1)
    return out


# Pairs per block of similar_pairs: large blocks suit the matrix product (docs/benchmarks.md, "Near-duplicates").
PAIR_CELLS = 1 << 22


def similar_pairs(plain: np.ndarray, flip: np.ndarray | None, min_cosine: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for i < j whose vectors (or i's mirror's and j's) have
    cosine similarity of at least `min_cosine`. plain, flip: float[N, D],
    any length. Row blocks of the upper triangle, a matrix product each."""
    p = unit_rows(plain)
    f = unit_rows(flip) if flip is not None else None
    n = len(p)
    out_i, out_j, out_s = [], [], []
    a = 0
    while a < n:
        b = min(n, a + max(1, PAIR_CELLS // (n - a)))  # rows a..b-1 against columns a..n-1
        s = p[a:b] @ p[a:].T
        if f is not None:
            np.maximum(s, f[a:b] @ p[a:].T, out=s)
        i, j = np.nonzero(s >= min_cosine)
        keep = j > i
        i, j = i[keep], j[keep]
        out_i.append(i + a)
        out_j.append(j + a)
        out_s.append(s[i, j])
        a = b
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_s, np.float32)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def kth_distance(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """1 - cosine similarity to the k-th nearest row of `bank` (rows unit-norm),
    in torch, for exported graphs. The k-th largest similarity is found by
    taking the maximum k times, each time masking out the one position it came
    from (ties count separately, as in topk): topk lowers to a sort that
    LiteRT's interpreter cannot run, and k argmax passes cost the same here."""
    sims = torch.nn.functional.normalize(features.float(), dim=1) @ bank.float().T
    cols = torch.arange(sims.shape[1], device=sims.device)[None]
    for _ in range(min(k, bank.shape[0]) - 1):
        sims = torch.where(cols == sims.argmax(dim=1, keepdim=True), torch.full_like(sims, -2.0), sims)
    return 1 - sims.max(dim=1).values


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


class CosineGraph:
    """An HNSW graph of unit rows (usearch): memory-mapped from `path` when
    saved there (building one takes minutes at 100k vectors), else built."""

    def __init__(self, vectors: np.ndarray, path: Path | None = None):
        usearch = import_usearch()
        if path is not None and path.exists():
            self.index = usearch.Index.restore(str(path), view=True)
        else:
            self.index = usearch.Index(ndim=vectors.shape[1], metric="cos", dtype="f32", connectivity=16,
                                       expansion_add=128)
            self.index.add(np.arange(len(vectors)), vectors)
        self.index.expansion_search = HNSW_EF_SEARCH

    def save(self, path: Path) -> None:
        """Written to a temporary file, then renamed: atomic, as every run file."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            self.index.save(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
