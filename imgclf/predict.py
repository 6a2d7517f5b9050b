"""`imgclf.load(RUN)`: a trained classifier that predicts from paths, PIL
images or arrays, preprocessing exactly as in training (it is stored in the
model file). It shares the feature extractor (and its cache) with training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

try:
    import torch
except ImportError:  # inference-only install (imgclf[serve]): .onnx files need no torch
    torch = None

from .images import BadImage, list_files, open_image
from .preprocess import Preprocess, eval_transform


class Classifier:
    def __init__(self, record: dict, device: str = "auto", engine: str = "auto",
                 cache_dir: str | Path | None = None, source: str = ""):
        from .runs import model_from_record
        from .train import resolve_device

        self.record = record
        self.source = source
        self.classes: list[str] = list(record["classes"])
        self.preprocess = Preprocess.from_dict(record["preprocess"])
        self.temperature = float(record.get("temperature", 1.0))
        self.model = model_from_record(record)
        self.device = resolve_device(device)
        self.engine, self.cache_dir = engine, cache_dir
        self._extractor = None
        self._bhash = None
        self.model.head.to(self.device)

    @property
    def arch(self) -> str:
        return self.record["arch"]

    @property
    def extractor(self):
        from .features import FeatureExtractor, state_hash

        if self._extractor is None:
            self._bhash = state_hash(self.model.backbone)
            self._extractor = FeatureExtractor(self.model.backbone, self.preprocess, self.device, self.engine,
                                               self.cache_dir, self._bhash)
        return self._extractor

    def _probs_from_features(self, f: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model.head(torch.from_numpy(np.asarray(f, dtype=np.float32)).to(self.device)).float().cpu()
            return torch.softmax(logits / self.temperature, dim=1).numpy()

    def logits_from_uint8(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            f = self.extractor(x)
            return self.model.head(torch.from_numpy(f).to(self.device)).float().cpu().numpy()

    def predict_proba_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32,
                            workers: int = 1, bad=None, use_cache: bool = True, flip: bool = False):
        """Probabilities for (relative path, label) items under `root`, through the
        feature cache. Returns (probs[N', C], labels[N'], kept_index[N'])."""
        variants = ("plain", "flip") if flip else ("plain",)
        feats, labels, kept = self.features_items(root, items, batch_size, workers, bad, variants, use_cache=use_cache)
        if not len(kept):
            return np.zeros((0, len(self.classes))), labels, kept
        probs = self._probs_from_features(feats["plain"])
        if flip:  # test-time augmentation: average with the mirrored image
            probs = (probs + self._probs_from_features(feats["flip"])) / 2
        return probs, labels, kept

    def features_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32, workers: int = 1,
                       bad=None, variants: tuple[str, ...] = ("plain",), progress: bool = True, use_cache: bool = True):
        """Pooled backbone features for (relative path, label) items, per variant
        ("plain", "flip"), through the feature cache (the same entries training
        wrote). Returns ({variant: features[N', D]}, labels[N'], kept_index[N'])."""
        from .features import FeatureCache, default_cache_dir, extract, feature_key

        ext = self.extractor  # computes the backbone hash the cache key needs
        root_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        caches = {v: FeatureCache(root_dir, feature_key(self.arch, self._bhash, self.preprocess, v),
                                  {"model": self.arch, "size": self.preprocess.size, "variant": v})
                  if use_cache else None for v in variants}
        return extract(ext, root, items, caches, batch_size, workers, bad, "features", progress=progress)

    def logits_items(self, root: str | Path, items: list[tuple[str, int]], batch_size: int = 32, workers: int = 1,
                     bad=None, variants: tuple[str, ...] = ("plain",), progress: bool = True):
        """Raw logits (before temperature) per variant, for calibration and
        reports. Returns ({variant: logits[N', C]}, labels[N'], kept_index[N'])."""
        feats, labels, kept = self.features_items(root, items, batch_size, workers, bad, variants, progress)
        with torch.inference_mode():
            out = {v: self.model.head(torch.from_numpy(np.asarray(f, dtype=np.float32)).to(self.device)).float().cpu().numpy()
                   if len(kept) else np.zeros((0, len(self.classes)), np.float32) for v, f in feats.items()}
        return out, labels, kept

    def predict_proba(self, inputs, batch_size: int = 32) -> np.ndarray:
        """(N, C) probabilities; raises BadImage on the first unreadable input."""
        results = self.predict(inputs, top_k=len(self.classes), batch_size=batch_size, raw=True)
        for r in results:
            if "error" in r:
                raise BadImage(r.get("path", "<input>"), r["error"])
        return np.stack([r["probs"] for r in results])

    def predict(self, inputs, top_k: int = 5, batch_size: int = 32, raw: bool = False) -> list[dict]:
        """Top-k labels for each input (a path, PIL image, HxWx3 array, or a
        list of them). A bad input gives {"error": reason} in its place instead
        of failing the batch."""
        if isinstance(inputs, (str, os.PathLike, np.ndarray)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        inputs = list(inputs)
        pp = self.preprocess
        tf = eval_transform(pp)
        out: list[dict | None] = [None] * len(inputs)
        k = min(top_k, len(self.classes))
        for start in range(0, len(inputs), batch_size):
            chunk = list(enumerate(inputs[start:start + batch_size], start))
            xs, ids = [], []
            for i, src in chunk:
                entry = {"path": str(src)} if isinstance(src, (str, os.PathLike)) else {}
                try:
                    xs.append(tf(open_image(src, draft_size=pp.draft_size)))
                    ids.append(i)
                except BadImage as e:
                    out[i] = {**entry, "error": e.reason}
                    continue
                out[i] = entry
            if not xs:
                continue
            probs = self._probs_from_features(self.extractor(torch.stack(xs)))
            for i, p in zip(ids, probs):
                order = np.argsort(-p)[:k]
                out[i].update({"label": self.classes[order[0]], "score": float(p[order[0]]),
                               "top": [{"label": self.classes[j], "score": float(p[j])} for j in order]})
                if raw:
                    out[i]["probs"] = p
        return out  # type: ignore[return-value]


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | Path | None = None):
    """A trained classifier from a run directory or its model.pt, or an exported
    .onnx file (run with onnxruntime alone, no torch; same `.predict()`)."""
    if str(path).lower().endswith(".onnx"):
        from .onnx_model import OnnxClassifier

        return OnnxClassifier(path)
    if torch is None:
        raise ImportError(f"{path}: a run directory or model.pt needs PyTorch (pip install 'imgclf[train]'); "
                          f"this install can only run exported models (imgclf export RUN --format onnx)")
    from .runs import model_file_path, torch_load

    p = model_file_path(path)
    return Classifier(torch_load(p), device=device, engine=engine, cache_dir=cache_dir, source=str(path))


def expand_paths(paths: Iterable[str | Path]) -> list[str]:
    """Files as given; folders expanded to every file inside (sorted)."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += [str(f) for f in list_files(p)]
        else:
            out.append(str(p))
    return out
