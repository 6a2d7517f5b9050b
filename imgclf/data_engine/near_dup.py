"""Near-duplicates by embedding, for `imgclf check --near-dup embed`: the
pretrained backbone's features of each image and its mirror (the embedding
service, through the feature cache `train` reads), and the pairs whose
cosine similarity passes EMBED_MIN_COSINE (the neighbour module). It finds
the 10% crops a perceptual hash misses (data/near_dup.py).

data/check.py, a layer below, takes these pairs as an argument:
`check_dataset` here is data/check.py's with the embedding detector given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data import check
from imgclf.data.loading import default_workers
from imgclf.inference.neighbours import similar_pairs
from imgclf.models.embedder import BackboneEmbedder

# Cosine similarity at or above which two embeddings are the same photo.
# Chosen on hymenoptera + cats_and_dogs_filtered/validation (the strictest
# threshold within 0.5 points of the best recall with <= 0.5% false pairs),
# reported on dogs_vs_cats_2k_fullres (docs/benchmarks.md, "Near-duplicates").
EMBED_MIN_COSINE = 0.88


def embeddings(root: str | Path, items: list[tuple[str, int]], model: str = "efficientnet_lite0",
               cache_dir: str | Path | None = None, workers: int | None = None, progress: bool = True
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features of `items` (plain and mirrored) from the pretrained
    backbone, through the feature cache: the entries `imgclf train` with the
    same model reads, so a later training extracts nothing again.
    Returns ({"plain", "flip": float[N', D]}, kept_index[N'])."""
    emb = BackboneEmbedder.pretrained(model, "cpu", "auto", cache_dir)
    feats, _, kept = emb.features_items(root, items, workers=default_workers() if workers is None else workers,
                                        variants=("plain", "flip"), progress=progress, desc="embeddings")
    return feats, kept


class EmbeddingPairs:
    """check's embedding detector: (root, items, progress) -> (kept_index,
    i, j) over the kept items, and `criterion`, its line in the report."""

    def __init__(self, model: str = "efficientnet_lite0", cache_dir: str | Path | None = None,
                 min_cosine: float = EMBED_MIN_COSINE):
        self.model, self.cache_dir, self.min_cosine = model, cache_dir, min_cosine
        self.criterion = f"{model} embeddings of each image and its mirror with cosine similarity >= {min_cosine}"

    def __call__(self, root: str | Path, items: list[tuple[str, int]], progress: bool = True):
        feats, kept = embeddings(root, items, self.model, self.cache_dir, progress=progress)
        i, j, _ = similar_pairs(feats["plain"], feats["flip"], self.min_cosine)
        return kept, i, j


def check_dataset(data: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True, near_dup: str = "hash", model: str = "efficientnet_lite0",
                  cache_dir: str | None = None, fix: str | Path | None = None, follow_links: bool = False) -> dict:
    """`imgclf check DATA`: data/check.py's check_dataset, with `--near-dup
    embed` run by `model`'s pretrained backbone."""
    pairs = EmbeddingPairs(model, cache_dir) if near_dup == "embed" else None
    return check.check_dataset(data, val_fraction, test_fraction, seed, progress, near_dup, fix=fix,
                               embed_pairs=pairs, follow_links=follow_links)
