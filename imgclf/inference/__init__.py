"""One inference path for every command.

    Predictor.prepare(src)  -> uint8 (S, S, 3)   Preprocess.load: the training resize
    Predictor.probs(batch)  -> (N, C)            calibrated probabilities
    top_k(p, classes, k)    -> {"label", "score", "top"}   the one answer format

`TorchPredictor` (a run directory or model.pt) and `OnnxPredictor` (an
exported .onnx, no torch) implement `probs`; everything above it is shared
here, so `imgclf.load`, `predict`, `evaluate`, the export parity check and
`serve` give the same probabilities for the same image. The temperature is
applied in exactly one function, `torch_predictor.calibrated_probs`, which the
exported graph is traced from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from imgclf.data.images import MAX_PIXELS, BadImage, Source, list_files
from imgclf.data.preprocess import Preprocess


def top_k(p: np.ndarray, classes: list[str], k: int) -> dict:
    """One image's answer: the best label, its score and the k best labels."""
    order = np.argsort(-p, kind="stable")[:max(1, min(k, len(classes)))]
    return {"label": classes[order[0]], "score": float(p[order[0]]),
            "top": [{"label": classes[j], "score": float(p[j])} for j in order]}


class Predictor:
    """Shared by both engines: batching, bad inputs, the answer format."""

    classes: list[str]
    preprocess: Preprocess
    temperature: float
    arch: str
    source: str
    metadata: dict  # what /v1/model shows: metrics, versions, export provenance

    def prepare(self, src: Source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Any image source -> uint8 (S, S, 3) as the model was trained; raises BadImage."""
        return self.preprocess.load(src, max_pixels)

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> (N, C) calibrated probabilities."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Build whatever the first call would (a server calls this before it says ready)."""

    def predict(self, inputs, top_k: int = 5, batch_size: int = 32, raw: bool = False) -> list[dict]:
        """Top-k labels for each input (a path, bytes, PIL image, HxWx3 array,
        or a list of them). A bad input gives {"error": reason} in its place
        instead of failing the batch; raw=True adds the whole "probs" vector."""
        if isinstance(inputs, (str, os.PathLike, np.ndarray, bytes)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        inputs = list(inputs)
        out: list[dict] = [{"path": str(s)} if isinstance(s, (str, os.PathLike)) else {} for s in inputs]
        for start in range(0, len(inputs), batch_size):
            xs, ids = [], []
            for i in range(start, min(start + batch_size, len(inputs))):
                try:
                    xs.append(self.prepare(inputs[i]))
                    ids.append(i)
                except BadImage as e:
                    out[i]["error"] = e.reason
            if not xs:
                continue
            for i, p in zip(ids, self.probs(np.stack(xs))):
                out[i].update(_top_k(p, self.classes, top_k))
                if raw:
                    out[i]["probs"] = p
        return out

    def predict_proba(self, inputs, batch_size: int = 32) -> np.ndarray:
        """(N, C) probabilities; raises BadImage on the first unreadable input."""
        results = self.predict(inputs, top_k=1, batch_size=batch_size, raw=True)
        for r in results:
            if "error" in r:
                raise BadImage(r.get("path", "<input>"), r["error"])
        return np.stack([r["probs"] for r in results])


_top_k = top_k  # `predict`'s parameter shadows the function's name


def load(path: str | Path, device: str = "auto", engine: str = "auto", cache_dir: str | Path | None = None,
         threads: int | None = None) -> Predictor:
    """A trained classifier from a run directory or its model.pt (PyTorch), an
    exported .onnx / .ort (onnxruntime alone, no torch) or .tflite (the LiteRT
    interpreter, no torch); same `.predict()`."""
    from imgclf.runs import RunDir

    if str(path).lower().endswith(RunDir.ONNX_SUFFIXES):
        from imgclf.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor(path, threads=threads)
    if str(path).lower().endswith(RunDir.TFLITE_SUFFIXES):
        from imgclf.inference.litert_predictor import LiteRTPredictor

        return LiteRTPredictor(path, threads=threads)
    from imgclf.inference.torch_predictor import TorchPredictor

    return TorchPredictor.from_run(path, device=device, engine=engine, cache_dir=cache_dir)


def expand_paths(paths: Iterable[str | Path]) -> list[str]:
    """Files as given; folders expanded to every file inside (sorted)."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        out += [str(f) for f in list_files(p)] if p.is_dir() else [str(p)]
    return out
