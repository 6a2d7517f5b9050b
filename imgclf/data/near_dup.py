"""Near-duplicates: the same photo re-encoded, resized, slightly cropped,
recoloured or mirrored, found by perceptual hash or by embedding similarity.

Both detectors compare every image with every other in vectorised blocks
(numpy, a few million pairs at a time), never a Python loop over pairs, and
each compares an image's mirror too (a hash or an embedding of a mirrored
photo is nothing like the original's). Pairs become groups through
connected components (scipy), and each group is named by what it breaks:
one class (a copy), several classes (a conflicting label), several splits
(leakage). Thresholds were chosen on one set of photos and measured on
another (bench/bench_neardup.py, docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from imgclf.data.datasets import default_workers

# Hamming distance (of 64 bits) at or below which two pHashes are the same
# photo; cosine similarity at or above which two embeddings are. Chosen on
# hymenoptera + cats_and_dogs_filtered/validation (the strictest threshold
# within 0.5 points of the best recall with <= 0.5% false pairs), reported on
# dogs_vs_cats_2k_fullres (docs/benchmarks.md, "Near-duplicates"): pHash 84.8%
# of copy pairs (it misses most 10% crops), 0.14% false; pHash or embedding
# 99.3%, 0.12% false.
HASH_MAX_DISTANCE = 12
EMBED_MIN_COSINE = 0.88
METHODS = ("hash", "embed", "off")


def image_hash(img) -> np.ndarray:
    """[pHash of the image, pHash of its mirror] as uint64: 64-bit DCT hashes
    (imagehash.phash). A small thumbnail is enough (pHash works on 32x32 grey)."""
    import imagehash
    from PIL import ImageOps

    out = np.zeros(2, np.uint64)
    for k, im in enumerate((img, ImageOps.mirror(img))):
        bits = imagehash.phash(im).hash.flatten()
        out[k] = np.packbits(bits).view(">u8")[0]
    return out


# Pairs per block. Hashes: small blocks that stay in cache are fastest (measured
# at 10k images: 2^19 cells 1.0 s, 2^24 cells 3.4 s); embeddings: larger blocks
# suit the matrix product (2^18: 7.7 s, 2^20: 4.8 s for 5k x 1,280).
HASH_CELLS, EMBED_CELLS = 1 << 19, 1 << 22


def _blocks(n: int, cells: int):
    """Row blocks [a, b) of the upper triangle, each compared with columns a..n-1."""
    a = 0
    while a < n:
        b = min(n, a + max(1, cells // max(1, n - a)))
        yield a, b
        a = b


def hash_pairs(hashes: np.ndarray, max_distance: int = HASH_MAX_DISTANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for i < j whose hashes, or one's mirror's and the
    other's, differ in at most `max_distance` bits. hashes: uint64[N, 2].
    XOR and popcount (numpy >= 2: np.bitwise_count) into reused buffers."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    out_i, out_j, out_d = [], [], []
    for a, b in _blocks(n, HASH_CELLS):
        cols = h[a:, 0]
        x = np.bitwise_xor(h[a:b, 0, None], cols[None, :])
        d = np.bitwise_count(x)
        np.bitwise_xor(h[a:b, 1, None], cols[None, :], out=x)
        np.minimum(d, np.bitwise_count(x), out=d)
        i, j = np.nonzero(d <= max_distance)
        keep = j > i  # column j is image a + j
        i, j = i[keep], j[keep]
        out_i.append(i + a)
        out_j.append(j + a)
        out_d.append(d[i, j].astype(np.float32))
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_d, np.float32)


def embed_pairs(plain: np.ndarray, flip: np.ndarray | None, min_cosine: float = EMBED_MIN_COSINE
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for i < j whose embeddings (or i's mirror's and j's)
    have cosine similarity of at least `min_cosine`. plain, flip: float[N, D].
    A matrix product per block of rows (BLAS), upper triangle only."""
    p = _unit(plain)
    f = _unit(flip) if flip is not None else None
    n = len(p)
    out_i, out_j, out_s = [], [], []
    for a, b in _blocks(n, EMBED_CELLS):
        s = p[a:b] @ p[a:].T
        if f is not None:
            np.maximum(s, f[a:b] @ p[a:].T, out=s)
        i, j = np.nonzero(s >= min_cosine)
        keep = j > i
        i, j = i[keep], j[keep]
        out_i.append(i + a)
        out_j.append(j + a)
        out_s.append(s[i, j])
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_s, np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components of the pair graph with more than one member,
    each sorted, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return []
    g = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, label = connected_components(g, directed=False)
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    out = [sorted(c.tolist()) for c in np.split(order, cuts) if len(c) > 1]
    return sorted(out, key=lambda c: (-len(c), c[0]))


def embeddings(root: str | Path, items: list[tuple[str, int]], model: str = "efficientnet_lite0",
               cache_dir: str | Path | None = None, workers: int | None = None, progress: bool = True
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of `items` (plain and mirrored) from the pretrained
    backbone, through the feature cache: the entries `imgclf train` with the
    same model reads, so a later training extracts nothing again.
    Returns ({"plain", "flip": float[N', D]}, kept_index[N'])."""
    # The one place `check` gets embeddings: swap for the shared embedding function when there is one.
    import torch

    from imgclf.models.registry import build_model, get_model_info
    from imgclf.models.features import FeatureExtractor, extract, feature_caches

    pp = get_model_info(model).preprocess
    backbone = build_model(model, 2, pretrained=True).backbone
    ext = FeatureExtractor(backbone, pp, torch.device("cpu"), "auto", cache_dir)
    caches = feature_caches(cache_dir, model, ext.backbone_hash, pp, ("plain", "flip"))
    feats, _, kept = extract(ext, root, items, caches, workers=default_workers() if workers is None else workers,
                             desc="embeddings", progress=progress)
    return feats, kept
