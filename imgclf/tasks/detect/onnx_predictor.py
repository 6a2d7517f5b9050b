"""An exported detector (`imgclf export` on a detection run: .onnx or .ort)
as a DetPredictor, on onnxruntime alone: no torch.

The graph (tasks/detect/export.py) takes uint8 images of any size and gives
boxes in their pixels, after the letterbox, the network and NMS. Here it is
fed the letterbox Pillow made (`DetPredictor.prepare`, as every engine is),
which the graph's own letterbox leaves as it is, so its boxes are in input
pixels and the shared `to_original` maps them back, exactly as for PyTorch.
A graph with a `masks` output (a run with instance masks) gives each
detection's 28 x 28 mask probabilities too; the shared `found` pastes them
into the original pixels and `answer` writes them as COCO RLE.

This module must never import torch (tests/test_detect_deploy.py checks it).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from imgclf.data.preprocess import Preprocess
from imgclf.inference.onnx_predictor import INPUT, open_session, task_metadata, warn_if_stale
from imgclf.tasks.detect.predictor import DetPredictor

OUTPUTS = ("boxes", "scores", "labels", "selected")  # (N, D, 4), (N, D), (N, D), (N, D); score 0: padding
MASKS = "masks"  # (N, D, 28, 28), when the run has instance masks


class OnnxDetPredictor(DetPredictor):
    def __init__(self, path: str | Path | bytes, threads: int | None = None, session=None):
        """path: an exported .onnx/.ort, or its bytes; session: the one already
        opened on it (imgclf.tasks.load reads the task from its metadata)."""
        self.source = "<bytes>" if isinstance(path, bytes) else str(path)
        self.session = session = session or open_session(path, threads)
        self.metadata, self.classes = task_metadata(session, self.source, "detect", list(OUTPUTS))
        meta, names = self.metadata, [o.name for o in session.get_outputs()]
        self.wanted = list(OUTPUTS[:3]) + ([MASKS] if MASKS in names else [])
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.thresholds = np.asarray(meta["thresholds"], np.float32)
        self.int8, self.arch = bool(meta.get("int8")), str(meta.get("arch", "detector"))
        self._lock = threading.Lock()  # one call at a time: onnxruntime uses every core inside one
        if not isinstance(path, bytes):
            warn_if_stale(meta, path)

    def outputs(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        with self._lock:
            got = self.session.run(self.wanted, {INPUT: np.ascontiguousarray(batch, np.uint8)})
        return [tuple(v[s > 0] for v in per) for per in zip(*got) for s in [per[1]]]
