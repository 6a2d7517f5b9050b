"""Near-duplicates by perceptual hash: the same photo re-encoded, resized,
recoloured or mirrored (`imgclf check`), with no model.

The detector compares every image with every other in vectorised blocks
(numpy, a few million pairs at a time), never a Python loop over pairs, and
compares an image's mirror too (a hash of a mirrored photo is nothing like
the original's). Pairs become groups through connected components (scipy),
and each group is named by what it breaks: one class (a copy), several
classes (a conflicting label), several splits (leakage). The threshold was
chosen on one set of photos and measured on another (bench/bench_neardup.py,
docs/benchmarks.md). The embedding detector, which finds crops too, is the
data engine's (data_engine/near_dup.py): check takes its pairs as an argument,
so this layer never loads a model.
"""

from __future__ import annotations

import numpy as np

# Hamming distance (of 64 bits) at or below which two pHashes are the same
# photo. Chosen on hymenoptera + cats_and_dogs_filtered/validation (the
# strictest threshold within 0.5 points of the best recall with <= 0.5% false
# pairs), reported on dogs_vs_cats_2k_fullres (docs/benchmarks.md,
# "Near-duplicates"); it misses most 10% crops, which embeddings find.
HASH_MAX_DISTANCE = 12
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


# Pairs per block: small blocks that stay in cache are fastest (docs/benchmarks.md).
HASH_CELLS = 1 << 19


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
