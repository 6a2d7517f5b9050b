"""An exported `.onnx` classifier, run with onnxruntime alone: no torch.

`imgclf export` writes a graph that takes uint8 RGB images (N, H, W, 3) at the
model's input size and returns calibrated probabilities; normalisation and
softmax(logits / temperature) are inside it. What is left outside is the
resize (crop, squash or pad), done here in PIL exactly as in training, and the
class names and preprocessing are read from the file's metadata. So the file
alone is enough, and an inference-only install (`pip install imgclf[serve]`)
can predict and serve with numpy, Pillow and onnxruntime.

This module must never import torch (tests/test_export.py checks it).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from .images import MAX_PIXELS, BadImage, open_image
from .preprocess import Preprocess, resize_image

FORMAT = "imgclf-onnx-1"  # metadata "format": what this reader understands
INPUT, OUTPUT = "images", "probs"


class OnnxClassifier:
    """Same `.predict()` results as `imgclf.predict.Classifier`, from an .onnx file."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.source = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such model file; write one with `imgclf export RUN --format onnx`")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"{path}: not a loadable ONNX model ({e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an imgclf export (metadata format={meta.get('format')!r}); "
                             f"export the run with `imgclf export RUN --format onnx`")
        self.metadata: dict = {k: _maybe_json(v) for k, v in meta.items()}
        self.classes: list[str] = list(self.metadata["classes"])
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.temperature = float(self.metadata.get("temperature", 1.0))
        self.int8 = bool(self.metadata.get("int8", False))
        # One InferenceSession may be run from several threads, but we keep
        # the serve path simple: a lock makes the batcher's calls sequential.
        self._lock = threading.Lock()

    @property
    def arch(self) -> str:
        return str(self.metadata.get("arch", "?"))

    @property
    def size(self) -> int:
        return self.preprocess.size

    def prepare(self, src, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Any image source (path, bytes, PIL, array) -> uint8 (H, W, 3) at the
        model's input size; raises BadImage."""
        img = open_image(src, draft_size=self.preprocess.draft_size, max_pixels=max_pixels)
        return np.asarray(resize_image(img, self.preprocess), dtype=np.uint8)

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, C) probabilities."""
        with self._lock:
            return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    def top(self, p: np.ndarray, top_k: int) -> dict:
        order = np.argsort(-p)[:max(1, min(top_k, len(self.classes)))]
        return {"label": self.classes[order[0]], "score": float(p[order[0]]),
                "top": [{"label": self.classes[j], "score": float(p[j])} for j in order]}

    def predict(self, inputs, top_k: int = 5, batch_size: int = 32, raw: bool = False) -> list[dict]:
        """Top-k labels for each input (a path, PIL image, HxWx3 array, or a
        list of them); a bad input gives {"error": reason} in its place."""
        if isinstance(inputs, (str, os.PathLike, np.ndarray, bytes)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        inputs = list(inputs)
        out: list[dict] = [{} for _ in inputs]
        for start in range(0, len(inputs), batch_size):
            xs, ids = [], []
            for i in range(start, min(start + batch_size, len(inputs))):
                src = inputs[i]
                if isinstance(src, (str, os.PathLike)):
                    out[i]["path"] = str(src)
                try:
                    xs.append(self.prepare(src))
                    ids.append(i)
                except BadImage as e:
                    out[i]["error"] = e.reason
            if not xs:
                continue
            for i, p in zip(ids, self.probs(np.stack(xs))):
                out[i].update(self.top(p, top_k))
                if raw:
                    out[i]["probs"] = p
        return out

    def predict_proba(self, inputs, batch_size: int = 32) -> np.ndarray:
        """(N, C) probabilities; raises BadImage on the first unreadable input."""
        results = self.predict(inputs, top_k=len(self.classes), batch_size=batch_size, raw=True)
        for r in results:
            if "error" in r:
                raise BadImage(r.get("path", "<input>"), r["error"])
        return np.stack([r["probs"] for r in results])


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except (ValueError, TypeError):
        return v


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    return OnnxClassifier(path, threads=threads)
