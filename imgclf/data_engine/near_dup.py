"""Near-duplicates by embedding, for `imgclf check` (`--near-dup embed`, and
`auto` where the features are already cached): the pretrained backbone's
features of each image and its mirror (the embedding service, through the
feature cache `train` reads), and the pairs whose cosine similarity passes
EMBED_MIN_COSINE (the neighbour module). It finds copies a perceptual hash
misses. Each such pair is reported only when its pixels agree too
(data/near_dup.py: pixel_similarity >= EMBED_MIN_CORR), so a pair is always
proven by two signals.

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
from imgclf.models.features import default_cache_dir, feature_caches, state_hash

# Cosine similarity at or above which two embeddings make a candidate, and
# the pixel correlation that verifies it (below the hash's: the embedding
# is the stronger first signal). Chosen together on hymenoptera +
# cats_and_dogs_filtered/validation at 32 px and full size (the strictest
# pair at the best worst-size recall, with no more than 0.5% false pairs),
# reported on dogs_vs_cats_2k_fullres (docs/benchmarks.md, "Near-duplicates").
EMBED_MIN_COSINE = 0.88
EMBED_MIN_CORR = 0.8
# `auto` embeds when at least this share of the images' features is cached:
# then the embedding costs a lookup, not a backbone pass per image.
CACHED_SHARE = 0.9


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
    i, j, cosine) over the kept items; `cached(content_hashes)`, whether the
    features are already there (`auto`); `min_corr`, the pixel correlation
    that verifies its pairs; and `criterion`, its line in the report."""

    def __init__(self, model: str = "efficientnet_lite0", cache_dir: str | Path | None = None,
                 min_cosine: float = EMBED_MIN_COSINE, min_corr: float = EMBED_MIN_CORR):
        self.model, self.cache_dir, self.min_cosine, self.min_corr = model, cache_dir, min_cosine, min_corr
        self.criterion = (f"{model} embeddings of each image and its mirror with cosine similarity >= {min_cosine}, "
                          f"verified by pixels correlating >= {min_corr}")

    def cached(self, content_hashes: np.ndarray) -> bool:
        """Whether the plain and mirrored features of at least CACHED_SHARE of
        these files (data.loading.file_hash) are in the feature cache."""
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        if not len(content_hashes) or not (root / "features").is_dir():
            return False  # nothing cached anywhere: no need to load the backbone to know
        emb = BackboneEmbedder.pretrained(self.model, "cpu", "auto", self.cache_dir)
        caches = feature_caches(self.cache_dir, emb.arch, state_hash(emb.backbone), emb.preprocess, ("plain", "flip"))
        found = np.all([c.locate(content_hashes)[:, 0] >= 0 for c in caches.values()], axis=0)
        return float(found.mean()) >= CACHED_SHARE

    def __call__(self, root: str | Path, items: list[tuple[str, int]], progress: bool = True):
        feats, kept = embeddings(root, items, self.model, self.cache_dir, progress=progress)
        i, j, cos = similar_pairs(feats["plain"], feats["flip"], self.min_cosine)
        return kept, i, j, cos


def check_dataset(data: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True, near_dup: str = "auto", model: str = "efficientnet_lite0",
                  cache_dir: str | None = None, fix: str | Path | None = None, follow_links: bool = False,
                  max_drop: float = check.MAX_DROP, force: bool = False) -> dict:
    """`imgclf check DATA`: data/check.py's check_dataset, with the embedding
    detector (`--near-dup embed`, or `auto` where its features are cached)
    run by `model`'s pretrained backbone."""
    pairs = EmbeddingPairs(model, cache_dir) if near_dup in ("embed", "auto") else None
    return check.check_dataset(data, val_fraction, test_fraction, seed, progress, near_dup, fix=fix,
                               embed_pairs=pairs, follow_links=follow_links, max_drop=max_drop, force=force)
