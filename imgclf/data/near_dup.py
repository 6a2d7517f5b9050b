"""Near-duplicates with no model: the same photo re-encoded, resized,
recoloured, mirrored or cropped a little (`imgclf check`).

Two signals, and a pair is reported only when both agree:
  1. a candidate: 64-bit pHashes (DCT of a 32 px grey thumbnail) within
     HASH_MAX_DISTANCE bits, where each image is hashed whole, mirrored and as
     nine 90% crops, so a cropped copy meets the view of its original that
     matches it;
  2. the proof: normalised correlation of the two 32 px grey thumbnails (at
     the hash's resolution), the best over the same crops and mirror, of at
     least PIXEL_MIN_CORR.
A 64-bit hash alone carries little on a small image: unrelated 32 px photos
often fall within a dozen bits of each other, while their pixels do not
correlate. Images under MIN_SIDE px are not compared at all.

Pairs become groups as stars (`star_groups`): every member is a verified pair
with its group's centre, so one false pair can never chain two families of
copies (or thousands of unrelated images) into one group. The embedding
detector is the data engine's (data_engine/near_dup.py): check takes its
pairs as an argument, so this layer never loads a model. Thresholds: chosen
on one set of photos, measured on another, at 32 px and full size
(bench/bench_neardup.py, docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Candidate: at most this many of 64 bits differ between one image's hash and
# any view (whole, mirrored, 90% crops) of the other's. Proof: the best
# normalised correlation of the 32 px grey thumbnails over the same views.
# Both chosen together on hymenoptera + cats_and_dogs_filtered/validation at
# 32 px and full size (the strictest pair within 0.5 points of the best
# worst-size recall, with no more than 0.5% false pairs at either size),
# reported on dogs_vs_cats_2k_fullres (docs/benchmarks.md, "Near-duplicates").
HASH_MAX_DISTANCE = 10
PIXEL_MIN_CORR = 0.82
# Below this many pixels on the short side a thumbnail is mostly interpolation:
# such images are left out of the near-duplicate search, and the report says so.
MIN_SIDE = 16
METHODS = ("auto", "hash", "embed", "off")

THUMB = 32  # the side of the grey thumbnail pHash reads and the correlation compares
CROP = 0.9  # views keep 90% of the width and height ...
OFFSETS = (0.0, 0.05, 0.1)  # ... at these offsets (fractions of the side), 9 crops
N_VIEWS = 2 + len(OFFSETS) ** 2  # whole, mirrored, crops
_DCT = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(THUMB)[None, :] + 1) / (2 * THUMB))


def _boxes(w: int, h: int) -> list[tuple[float, float, float, float]]:
    return [(ox * w, oy * h, ox * w + CROP * w, oy * h + CROP * h) for oy in OFFSETS for ox in OFFSETS]


def _phash(grey: np.ndarray) -> np.uint64:
    """pHash as imagehash computes it (the low 8x8 of the 2-D DCT-II, unscaled,
    against its median), from a THUMB x THUMB grey array."""
    c = _DCT @ grey @ _DCT.T
    return np.packbits((c > np.median(c)).ravel()).view(">u8")[0]


def image_signature(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(uint64[N_VIEWS] pHashes of the image whole, mirrored and its nine 90%
    crops; uint8[THUMB, THUMB] grey thumbnail) from a (small) RGB image."""
    grey = img.convert("L")
    views = [grey, ImageOps.mirror(grey)] + [grey.resize((THUMB, THUMB), Image.LANCZOS, box=b)
                                           for b in _boxes(*grey.size)]
    arrs = [np.asarray(v.resize((THUMB, THUMB), Image.LANCZOS) if v.size != (THUMB, THUMB) else v, np.float64)
            for v in views]
    return np.array([_phash(a) for a in arrs], np.uint64), np.clip(np.rint(arrs[0]), 0, 255).astype(np.uint8)


def image_hash(img: Image.Image) -> np.ndarray:
    """The hashes of `image_signature` alone."""
    return image_signature(img)[0]


# Pairs per block: small blocks that stay in cache are fastest (docs/benchmarks.md).
HASH_CELLS = 1 << 17


def _blocks(n: int, cells: int):
    """Row blocks [a, b) of the upper triangle, each compared with columns a..n-1."""
    a = 0
    while a < n:
        b = min(n, a + max(1, cells // max(1, n - a)))
        yield a, b
        a = b


def hash_pairs(hashes: np.ndarray, max_distance: int = HASH_MAX_DISTANCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for i < j where one image's whole hash (column 0) is
    within `max_distance` bits of any view of the other's (any column).
    hashes: uint64[N, K]. XOR and popcount (numpy >= 2: np.bitwise_count)
    into reused buffers, in blocks of the upper triangle."""
    h = np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).T)  # one contiguous row per view
    k, n = h.shape
    out_i, out_j, out_d = [], [], []
    for a, b in _blocks(n, HASH_CELLS):
        rows, cols = h[:, a:b].T, h[:, a:].T
        d = np.full((b - a, n - a), 64, np.uint8)
        x = np.empty((b - a, n - a), np.uint64)
        c = np.empty((b - a, n - a), np.uint8)
        for v in range(k):
            for left, right in ((rows[:, v, None], cols[None, :, 0]), (rows[:, 0, None], cols[None, :, v])):
                np.bitwise_xor(left, right, out=x)
                np.minimum(d, np.bitwise_count(x, out=c), out=d)
                if v == 0:
                    break  # whole against whole: once
        i, j = np.nonzero(d <= max_distance)
        keep = j > i  # column j is image a + j
        i, j = i[keep], j[keep]
        out_i.append(i + a)
        out_j.append(j + a)
        out_d.append(d[i, j].astype(np.float32))
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_d, np.float32)


def pair_distance(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """hash_pairs' distance for the given pairs only."""
    h = np.asarray(hashes, dtype=np.uint64)
    a, b = h[i], h[j]
    d = np.minimum(np.bitwise_count(a ^ b[:, :1]).min(1), np.bitwise_count(b ^ a[:, :1]).min(1))
    return d.astype(np.float32)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _resampler(offset: float, scale: float) -> np.ndarray:
    """THUMB x THUMB matrix that resamples a row (bilinear) to the span
    [offset, offset + scale] of it, as fractions of the side."""
    x = np.clip((offset + scale * (np.arange(THUMB) + 0.5) / THUMB) * THUMB - 0.5, 0, THUMB - 1)
    x0 = np.minimum(np.floor(x).astype(int), THUMB - 2)
    w = x - x0
    r = np.zeros((THUMB, THUMB), np.float32)
    r[np.arange(THUMB), x0] = 1 - w
    r[np.arange(THUMB), x0 + 1] += w
    return r


_VIEWS = [(_resampler(0, 1), _resampler(0, 1))] + [(_resampler(oy, CROP), _resampler(ox, CROP))
                                                    for oy in OFFSETS for ox in OFFSETS]


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-3)


def pixel_similarity(thumbs: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each pair (i, j): the best normalised correlation between one
    image's grey thumbnail, whole or as a 90% crop, and the other's, plain or
    mirrored, both ways round. thumbs: uint8[N, THUMB, THUMB]."""
    out = np.zeros(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a, b = thumbs[i[s:s + chunk]].astype(np.float32), thumbs[j[s:s + chunk]].astype(np.float32)
        best = np.full(len(a), -1.0, np.float32)
        for x, y in ((a, b), (b, a)):
            targets = (_unit(y), _unit(y[:, :, ::-1]))
            for ry, rx in _VIEWS:
                v = _unit(np.einsum("ij,njk,lk->nil", ry, x, rx, optimize=True))
                for t in targets:
                    np.maximum(best, np.einsum("nd,nd->n", v, t), out=best)
        out[s:s + chunk] = best
    return out


def verified_hash_pairs(hashes: np.ndarray, thumbs: np.ndarray, max_distance: int = HASH_MAX_DISTANCE,
                        min_corr: float = PIXEL_MIN_CORR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, correlation) of the hash candidates whose pixels correlate."""
    i, j, _ = hash_pairs(hashes, max_distance)
    c = pixel_similarity(thumbs, i, j)
    ok = c >= min_corr
    return i[ok], j[ok], c[ok]


def star_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Groups of verified pairs without chaining: the image with the most
    partners left becomes a centre and takes its partners not yet grouped;
    an image whose partners are all taken joins the group of a partner that
    is a centre. Every member is thus a verified pair with its group's
    centre. Each group sorted, largest first."""
    if len(i) == 0:
        return []
    partners: dict[int, set[int]] = {}
    for a, b in zip(i.tolist(), j.tolist()):
        if a != b:
            partners.setdefault(a, set()).add(b)
            partners.setdefault(b, set()).add(a)
    group_of: dict[int, int] = {}
    centres: dict[int, list[int]] = {}
    for c in sorted(partners, key=lambda k: (-len(partners[k]), k)):
        if c in group_of:
            continue
        free = [k for k in partners[c] if k not in group_of]
        if not free:  # join a partner's group where that partner is its centre
            home = next((k for k in sorted(partners[c]) if k in centres), None)
            if home is not None:
                centres[home].append(c)
                group_of[c] = home
            continue
        centres[c] = [c, *free]
        for k in centres[c]:
            group_of[k] = c
    out = [sorted(g) for g in centres.values()]
    return sorted(out, key=lambda g: (-len(g), g[0]))


def groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components of the pair graph with more than one member,
    each sorted, largest first. For merging groups that share a member
    (--fix), never for turning unverified chains into groups."""
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
