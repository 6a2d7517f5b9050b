"""An exported segmenter (`imgclf export` on a segmentation run: .onnx or
.ort) as a SegPredictor, on onnxruntime alone: no torch.

The graph (tasks/segment/export.py) takes a uint8 image at its own size,
resizes it inside (longer side image_size, aspect kept) and returns the
label map at the size it was given, the logits brought there before the
argmax as `TorchSegPredictor.label_maps` does. So this predictor feeds each
image as decoded, unresized: its answers are the run's, up to the in-graph
resize's rounding (a level or two against Pillow's), which the export's
parity gate measures.

This module must never import torch (tests/test_segment_export.py checks it).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from imgclf.data.images import MAX_PIXELS, Source, open_image
from imgclf.inference.onnx_predictor import INPUT, open_session, task_metadata, warn_if_stale
from imgclf.tasks.segment.predictor import SegPredictor

OUTPUT = "labels"  # uint8 (N, H, W): class ids at the input's resolution
# Pixels of input per graph call: the logits at the input's size are
# num_classes floats per pixel, so big photos go one at a time.
PIXELS_PER_CALL = 4_000_000


class OnnxSegPredictor(SegPredictor):
    def __init__(self, path: str | Path | bytes, threads: int | None = None, session=None):
        """path: an exported .onnx/.ort, or its bytes; session: the one already
        opened on it (imgclf.tasks.load reads the task from its metadata)."""
        self.source = "<bytes>" if isinstance(path, bytes) else str(path)
        self.session = session = session or open_session(path, threads)
        self.metadata, self.classes = task_metadata(session, self.source, "segment", [OUTPUT])
        meta = self.metadata
        self.image_size = int(meta["image_size"])
        self.int8, self.arch = bool(meta.get("int8")), str(meta.get("arch", "segmenter"))
        self._lock = threading.Lock()  # one call at a time: onnxruntime uses every core inside one
        if not isinstance(path, bytes):
            warn_if_stale(meta, path)

    def prepare(self, src: Source, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        """The image as decoded, at its own size: the graph resizes it itself."""
        img = open_image(src, None, max_pixels)
        return np.asarray(img, dtype=np.uint8), img.size

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3), any H and W -> uint8 (N, H, W) label maps."""
        step = max(1, PIXELS_PER_CALL // max(1, batch.shape[1] * batch.shape[2]))
        out = []
        for i in range(0, len(batch), step):
            with self._lock:
                out.append(self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch[i:i + step], np.uint8)})[0])
        return np.concatenate(out)
