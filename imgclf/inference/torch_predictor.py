"""A run directory (or model.pt) as a Predictor, on PyTorch.

The backbone runs through the embedding service (models/embedder.py: the
same extractor, onnxruntime on CPU, and feature cache as training), so evaluating a run's splits reuses the
features training computed. `calibrated_probs` is the only place where a
temperature meets logits; the ONNX export traces it into its graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgclf.data.loading import BadFileLog
from imgclf.data.preprocess import Preprocess, to_nchw
from imgclf.inference.predictor import Predictor
from imgclf.inference.unknown import UnknownScorer
from imgclf.models.embedder import BackboneEmbedder
from imgclf.models.records import model_from_record
from imgclf.models.registry import resolve_device
from imgclf.runs import RunDir


def calibrated_probs(logits: torch.Tensor, temperature, multi_label: bool = False) -> torch.Tensor:
    """softmax(logits / T): T a scalar, or a column (N, 1) of per-row values.
    Multi-label: an independent sigmoid per label."""
    if multi_label:
        return torch.sigmoid(logits / temperature)
    return torch.softmax(logits / temperature, dim=1)


def probs_from_logits(logits: dict[str, np.ndarray], temperature, multi_label: bool = False) -> np.ndarray:
    """Calibrated probabilities from cached logits per variant; with a "flip"
    variant, averaged with the mirrored image's (test-time augmentation)."""
    dtype = np.float64 if any(np.asarray(lg).dtype == np.float64 for lg in logits.values()) else np.float32
    t = torch.as_tensor(np.asarray(temperature, dtype=dtype))
    ps = [calibrated_probs(torch.from_numpy(np.asarray(lg, dtype=dtype)), t, multi_label).numpy()
          for lg in logits.values()]
    return sum(ps) / len(ps)


class TorchPredictor(Predictor):
    def __init__(self, record: dict, device: str = "auto", engine: str = "auto",
                 cache_dir: str | Path | None = None, source: str = "", metadata: dict | None = None):
        self.record, self.source = record, source
        self.classes: list[str] = list(record["classes"])
        self.preprocess = Preprocess.from_dict(record["preprocess"])
        self.model = model_from_record(record)
        self.multi_label = bool(record.get("multi_label"))
        self.use_fits()
        self.device = resolve_device(device)
        self.engine, self.cache_dir = engine, cache_dir
        self.metadata = metadata or {}
        self.embedder = BackboneEmbedder(self.arch, self.model.backbone, self.preprocess, self.device, engine,
                                         cache_dir, source)
        self.model.head.to(self.device)

    def use_fits(self, fields: dict | None = None) -> None:
        """The post-training fits (temperature, thresholds, unknown scorer, reject)
        from the record, after putting `fields` into it (evaluation/fits.py)."""
        rec = self.record
        rec.update(fields or {})
        self.temperature = float(rec.get("temperature", 1.0))
        self.scorer = None
        if rec.get("unknown"):
            self.scorer = UnknownScorer.from_record(rec["unknown"]).eval()
        self.has_unknown, self.reject = self.scorer is not None, rec.get("reject")
        self.thresholds = np.asarray(rec["thresholds"], np.float32) if rec.get("thresholds") else None

    @classmethod
    def from_run(cls, path: str | Path, **kw) -> TorchPredictor:
        run = RunDir(path)
        meta = {"metrics": run.headline_metrics(), "trained_with": None}
        rec = run.record()
        meta["trained_with"] = rec.get("imgclf_version")
        return cls(rec, source=str(path), metadata=meta, **kw)

    @property
    def arch(self) -> str:
        return self.record["arch"]

    @property
    def extractor(self):
        return self.embedder.extractor

    def warm_up(self) -> None:
        self.extractor  # noqa: B018 (exports and caches the backbone for onnxruntime on first use)

    def logits_from_features(self, f: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(f, dtype=np.float32)).to(self.device)
            return self.model.head(x).float().cpu().numpy()

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        f = self.extractor(to_nchw(batch))
        p = probs_from_logits({"plain": self.logits_from_features(f)}, self.temperature, self.multi_label)
        return p, self.unknown_from_features(f)

    def unknown_from_features(self, f: np.ndarray) -> np.ndarray | None:
        if self.scorer is None:
            return None
        with torch.inference_mode():
            return self.scorer(torch.from_numpy(np.asarray(f, dtype=np.float32))).numpy()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> (N, D) pooled backbone features: the embedding of
        `imgclf embed`, `similar` and `suggest` (models/embedder.py)."""
        return self.embedder.embed(batch)

    def features_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32, workers: int = 1,
                       bad: BadFileLog | None = None, variants: tuple[str, ...] = ("plain",), progress: bool = True,
                       use_cache: bool = True):
        """Pooled backbone features for (relative path, label) items, per variant
        ("plain", "flip"), through the feature cache (the same entries training
        wrote). Returns ({variant: features[N', D]}, labels[N'], kept_index[N'])."""
        return self.embedder.features_items(root, items, batch_size, workers, bad, variants, progress, use_cache)

    def logits_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32, workers: int = 1,
                     bad: BadFileLog | None = None, variants: tuple[str, ...] = ("plain",), progress: bool = True,
                     use_cache: bool = True):
        """Raw logits (before temperature) per variant, for evaluation and
        calibration. Returns ({variant: logits[N', C]}, labels[N'], kept_index[N'])."""
        feats, labels, kept = self.features_items(root, items, batch_size, workers, bad, variants, progress, use_cache)
        empty = np.zeros((0, len(self.classes)), np.float32)
        return {v: self.logits_from_features(f) if len(kept) else empty for v, f in feats.items()}, labels, kept
