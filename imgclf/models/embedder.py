"""The embedding service: a frozen backbone's pooled features, one way.

Training, a run's predictor, `imgclf embed`, `similar`, `suggest`, label-noise
suspects, the data map and near-duplicate checks all get backbone features
here: one extractor (models/features.py: onnxruntime on CPU, else torch) over
one feature cache, keyed by the backbone's weights, so whichever of them runs
first pays for the encoding and the others read its entries.

    emb = BackboneEmbedder.pretrained("efficientnet_lite0")      # no run
    emb = BackboneEmbedder(arch, model.backbone, pp)             # a run's own (fine-tuned) backbone
    feats, labels, kept = emb.features_items(root, items, variants=("plain", "flip"))
    vectors = emb.embed(batch)                                   # uint8 (N, S, S, 3) -> (N, D)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from imgclf.data.loading import BadFileLog
from imgclf.data.preprocess import Preprocess, to_nchw
from imgclf.errors import ConfigError
from imgclf.models.features import FeatureCache, FeatureExtractor, extract, feature_caches
from imgclf.models.registry import build_model, get_model_info, resolve_device


class BackboneEmbedder:
    """A backbone (frozen: never trained here) and its preprocessing. The
    extractor is built on first use: exporting the backbone for onnxruntime
    takes seconds, and a cached feature needs no extractor at all."""

    def __init__(self, arch: str, backbone: torch.nn.Module, preprocess: Preprocess,
                 device: str | torch.device = "auto", engine: str = "auto", cache_dir: str | Path | None = None,
                 source: str = ""):
        self.arch, self.backbone, self.preprocess, self.source = arch, backbone, preprocess, source
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.engine, self.cache_dir = engine, cache_dir
        self._extractor: FeatureExtractor | None = None

    @classmethod
    def pretrained(cls, name: str, device: str | torch.device = "auto", engine: str = "auto",
                   cache_dir: str | Path | None = None) -> BackboneEmbedder:
        """A model's pretrained backbone without a run (`imgclf embed --model NAME`,
        `imgclf check --near-dup embed`): the same features as training with it."""
        info = get_model_info(name)
        if not info.pretrained:
            raise ConfigError(f"--model {name} has no pretrained weights, so its embeddings would be random",
                              "use a pretrained model (see `imgclf models`) or --run RUN")
        return cls(name, build_model(name, 1, pretrained=True).backbone, copy.deepcopy(info.preprocess), device,
                   engine, cache_dir, f"pretrained:{name}")

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.preprocess, self.device, self.engine,
                                               self.cache_dir)
        return self._extractor

    def caches(self, variants: tuple[str, ...] = ("plain",), enabled: bool = True) -> dict[str, FeatureCache]:
        """This backbone's feature caches, one per variant ("plain", "flip")."""
        return feature_caches(self.cache_dir, self.arch, self.extractor.backbone_hash, self.preprocess, variants,
                              enabled)

    def prepare(self, src) -> np.ndarray:
        return self.preprocess.load(src)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> (N, D) pooled backbone features (not normalised)."""
        return self.extractor(to_nchw(batch))

    def features_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32, workers: int = 1,
                       bad: BadFileLog | None = None, variants: tuple[str, ...] = ("plain",), progress: bool = True,
                       use_cache: bool = True, desc: str = "features"):
        """Pooled features of (relative path, label) items per variant, through
        the feature cache. Returns ({variant: float32[N', D]}, labels[N'],
        kept_index[N']) for the N' items that could be read."""
        return extract(self.extractor, root, items, self.caches(variants, use_cache), batch_size, workers, bad, desc,
                       progress=progress)
