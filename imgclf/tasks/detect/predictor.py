"""The detection answer, shared by every engine (PyTorch in
torch_predictor.py; exported graphs beside it): the letterbox that prepares an
image and the boxes given back in the original image's pixels.

    DetPredictor.prepare(src)   -> uint8 (S, S, 3), and the original (w, h)   Preprocess "pad": the one letterbox
    DetPredictor.outputs(batch) -> per image: boxes (K, 4) in input pixels, scores (K,), labels (K,)
    DetPredictor.predict(inputs) -> [{"path", "width", "height", "boxes": [{"label", "score", "box"}]}]

A box is [x1, y1, x2, y2] in the original image's pixels (0 at the left edge
of the first pixel). Kept are the detections at or above their class's
threshold: each class's F1-optimal score on val, chosen at training time and
stored with the weights, or one `conf` for all. No torch here: an exported
detector is served without it.
"""

from __future__ import annotations

import os

import numpy as np

from imgclf.data.images import MAX_PIXELS, BadImage, Source, open_image
from imgclf.data.preprocess import Preprocess, pad_geometry, resize_image
from imgclf.errors import ConfigError

ANSWER_KEYS = ("path", "width", "height", "boxes")


class DetPredictor:
    """Shared by the engines: batching, bad inputs, thresholds, the answer."""

    task = "detect"
    classes: list[str]
    preprocess: Preprocess
    thresholds: np.ndarray  # per class: a detection at or above it is answered
    source: str
    arch: str = "detector"
    metadata: dict

    def prepare(self, src: Source, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        """Any image source -> the letterboxed uint8 (S, S, 3) and the
        original (width, height). Decoded at full size (no JPEG draft): the
        boxes go back to the original pixels."""
        img = open_image(src, None, max_pixels)
        try:
            return np.asarray(resize_image(img, self.preprocess), dtype=np.uint8), img.size
        except Exception as e:  # PIL's many error types for odd modes and sizes
            raise BadImage(getattr(src, "name", None) or str(src)[:200], f"cannot resize this image ({e})") from None

    def outputs(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """uint8 (N, S, S, 3) -> per image (boxes in input pixels, scores, class indices)."""
        raise NotImplementedError

    def to_original(self, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Boxes in letterboxed input pixels -> the original image's, clipped to it."""
        w, h = size
        nw, nh, left, top = pad_geometry(w, h, self.preprocess.size)
        b = (np.asarray(boxes, np.float64).reshape(-1, 4) - [left, top, left, top]) / [nw / w, nh / h, nw / w, nh / h]
        return np.clip(b, 0, [w, h, w, h])

    def cutoffs(self, conf: float | None) -> np.ndarray:
        if conf is None:
            return self.thresholds
        if not 0 <= conf <= 1:
            raise ConfigError(f"--conf {conf} is not a score in [0, 1]", "e.g. --conf 0.25, or leave it out for "
                              "each class's threshold chosen on val")
        return np.full(len(self.classes), conf, np.float32)

    def detect(self, inputs, batch_size: int = 8, conf: float | None = None) -> list[dict]:
        """Per input: boxes (original pixels), scores and class indices at or
        above the cut-offs, best first; a bad input gives {"error": reason}."""
        cut = self.cutoffs(conf)
        out: list[dict] = [{"path": str(s)} if isinstance(s, (str, os.PathLike)) else {} for s in inputs]
        for start in range(0, len(inputs), batch_size):
            xs, ids, sizes = [], [], []
            for i in range(start, min(start + batch_size, len(inputs))):
                try:
                    x, size = self.prepare(inputs[i])
                except BadImage as e:
                    out[i]["error"] = e.reason
                    continue
                xs.append(x), ids.append(i), sizes.append(size)
            if not xs:
                continue
            for i, size, (b, s, c) in zip(ids, sizes, self.outputs(np.stack(xs))):
                keep = s >= cut[c]
                order = np.argsort(-s[keep], kind="stable")
                out[i].update(width=size[0], height=size[1], boxes_xyxy=self.to_original(b[keep][order], size),
                              scores=s[keep][order], labels=c[keep][order])
        return out

    def predict(self, inputs, batch_size: int = 8, conf: float | None = None, **_) -> list[dict]:
        """The answer for each input (a path, bytes, PIL image, HxWx3 array,
        or a list of them): {"path", "width", "height", "boxes": [{"label",
        "score", "box": [x1, y1, x2, y2]}]}, or {"path", "error"}."""
        if isinstance(inputs, (str, os.PathLike, np.ndarray, bytes)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        return [answer(d, self.classes) for d in self.detect(list(inputs), batch_size, conf)]


def answer(d: dict, classes: list[str]) -> dict:
    """The JSON answer of one image's detections (boxes rounded to 0.1 px)."""
    if "error" in d or "boxes_xyxy" not in d:
        return {k: v for k, v in d.items() if k in ("path", "error")}
    boxes = [{"label": classes[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
             for b, s, c in zip(d["boxes_xyxy"], d["scores"], d["labels"])]
    return {**({"path": d["path"]} if "path" in d else {}), "width": d["width"], "height": d["height"], "boxes": boxes}
