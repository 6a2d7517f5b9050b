"""The detection answer, shared by every engine (PyTorch in
torch_predictor.py; exported graphs beside it): the letterbox that prepares an
image and the boxes given back in the original image's pixels.

    DetPredictor.prepare(src)   -> uint8 (S, S, 3), and the original (w, h)   Preprocess "pad": the one letterbox
    DetPredictor.outputs(batch) -> per image: boxes (K, 4) in input pixels, scores (K,), labels (K,)
                                   [, masks (K, 28, 28): box-relative probabilities, for instance masks]
    DetPredictor.predict(inputs) -> [{"path", "width", "height", "boxes": [{"label", "score", "box"[, "mask"]}]}]

An instance mask is answered as COCO RLE ({"size": [h, w], "counts"}) in the
original image's pixels.

A box is [x1, y1, x2, y2] in the original image's pixels (0 at the left edge
of the first pixel). Kept are the detections at or above their class's
threshold: each class's F1-optimal score on val, chosen at training time and
stored with the weights, or one `conf` for all. No torch here: an exported
detector is served without it.
"""

from __future__ import annotations

import contourpy
import numpy as np
from PIL import Image

from imgclf.data.images import MAX_PIXELS, BadImage, Source, open_image
from imgclf.data.preprocess import Preprocess, pad_geometry, resize_image
from imgclf.errors import ConfigError, ModelFileError
from imgclf.inference.batches import as_inputs, blank_answers, prepared_batches

ANSWER_KEYS = ("path", "width", "height", "boxes")
MAX_DETECTIONS = 100  # per image, best first: what COCO's AP counts (maxDets 100), and plenty for an answer


class DetPredictor:
    """Shared by the engines: batching, bad inputs, thresholds, the answer."""

    task = "detect"
    classes: list[str]
    preprocess: Preprocess
    thresholds: np.ndarray  # per class: a detection at or above it is answered
    source: str
    arch: str = "detector"
    metadata: dict
    # What the server's /v1/model shows for every model; a detector has no
    # temperature, unknown-input scorer or multi-label decisions.
    temperature, has_unknown, multi_label, reject, int8 = 1.0, False, False, None, False

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

    def set_reject(self, setting) -> None:
        if setting not in (None, "", "off"):
            raise ConfigError(f"--reject {setting}: a detector has no unknown-input score", "drop --reject")

    def warm_up(self) -> None:
        """Build whatever the first call would (a server calls this before it says ready)."""

    def self_check(self) -> None:
        """One real inference on a blank image at load: a damaged or crafted
        model that fails at run time, or answers classes its metadata does not
        name, is refused now rather than on every request."""
        s = self.preprocess.size
        try:
            (b, sc, c, *_), = self.outputs(np.zeros((1, s, s, 3), np.uint8))
        except Exception as e:  # any runtime's own error types
            raise ModelFileError(f"{self.source}: the model fails on a blank {s}x{s} image ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                                 "export the run again with `imgclf export RUN`") from None
        ok = np.shape(b) == (len(sc), 4) and np.shape(c) == np.shape(sc) and np.all(np.isfinite(b))
        if not ok or len(self.thresholds) != len(self.classes) or np.any((c < 0) | (c >= len(self.classes))):
            raise ModelFileError(f"{self.source}: the model's boxes, scores and labels do not fit its "
                                 f"{len(self.classes)} classes", "export the run again with `imgclf export RUN`")

    def detect(self, inputs, batch_size: int = 8, conf: float | None = None) -> list[dict]:
        """Per input: boxes (original pixels), scores and class indices at or
        above the cut-offs, best first; a bad input gives {"error": reason}."""
        cut = self.cutoffs(conf)
        out = blank_answers(inputs)
        for ids, got in prepared_batches(inputs, self.prepare, batch_size, out):
            for i, (_, size), o in zip(ids, got, self.outputs(np.stack([x for x, _ in got]))):
                out[i].update(self.found(o, size, cut))
        return out

    def found(self, out: tuple, size: tuple[int, int], cut: np.ndarray) -> dict:
        """One image's network output (boxes in input pixels, scores, labels)
        -> the detections at or above their cut-off, best first, in the
        original (width, height) image's pixels."""
        b, s, c, *m = out
        keep = np.flatnonzero(s >= cut[c])
        keep = keep[np.argsort(-s[keep], kind="stable")][:MAX_DETECTIONS]
        boxes = self.to_original(b[keep], size)
        found = {"width": size[0], "height": size[1], "boxes_xyxy": boxes, "scores": s[keep], "labels": c[keep]}
        if m:  # instance masks: box-relative probabilities, pasted into the original pixels
            found["masks"] = paste(m[0][keep], boxes, *size)
        return found

    def predict(self, inputs, batch_size: int = 8, conf: float | None = None, **_) -> list[dict]:
        """The answer for each input (a path, bytes, PIL image, HxWx3 array,
        or a list of them): {"path", "width", "height", "boxes": [{"label",
        "score", "box": [x1, y1, x2, y2]}]}, or {"path", "error"}."""
        return [answer(d, self.classes) for d in self.detect(as_inputs(inputs), batch_size, conf)]


def answer(d: dict, classes: list[str]) -> dict:
    """The JSON answer of one image's detections (boxes rounded to 0.1 px)."""
    if "error" in d or "boxes_xyxy" not in d:
        return {k: v for k, v in d.items() if k in ("path", "error")}
    boxes = [{"label": classes[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
             for b, s, c in zip(d["boxes_xyxy"], d["scores"], d["labels"])]
    for b, m in zip(boxes, d.get("masks", [])):
        b["mask"], b["polygons"] = rle(m), polygons(m)
    return {**({"path": d["path"]} if "path" in d else {}), "width": d["width"], "height": d["height"], "boxes": boxes}


def paste(probs: np.ndarray, boxes: np.ndarray, width: int, height: int, threshold: float = 0.5) -> list[np.ndarray]:
    """Instance masks: 28 x 28 box-relative probabilities -> (height, width)
    bool masks in the original pixels (bilinear into each box, as Mask R-CNN pastes)."""
    out = []
    for p, b in zip(probs, boxes):
        m = np.zeros((height, width), bool)
        x1, y1, x2, y2 = int(np.floor(b[0])), int(np.floor(b[1])), int(np.ceil(b[2])), int(np.ceil(b[3]))
        if x2 > x1 and y2 > y1:
            img = Image.fromarray(np.asarray(p, np.float32), mode="F").resize((x2 - x1, y2 - y1), Image.BILINEAR)
            cx1, cy1 = max(x1, 0), max(y1, 0)
            crop = np.asarray(img)[cy1 - y1: min(y2, height) - y1, cx1 - x1: min(x2, width) - x1]
            m[cy1:cy1 + crop.shape[0], cx1:cx1 + crop.shape[1]] = crop >= threshold
        out.append(m)
    return out


def polygons(mask: np.ndarray, min_area: float = 1.0) -> list[list[float]]:
    """A bool mask's outer boundaries as COCO polygons ([x1, y1, x2, y2, ...]
    on the image's pixel edges, 0.1 px), largest first. Holes stay in the RLE
    only: a COCO polygon cannot carry them. Traced by contourpy (matplotlib's
    contour engine, numpy its only dependency) at the 0.5 level of the padded
    mask, so corners are cut at 45 degrees; straight runs keep their ends only."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return []
    y0, x0 = int(ys.min()), int(xs.min())
    z = np.pad(mask[y0:ys.max() + 1, x0:xs.max() + 1], 1).astype(np.float32)  # closed at the image's edges
    out = []
    for line in contourpy.contour_generator(z=z, line_type=contourpy.LineType.Separate).lines(0.5):
        x, y = line[:, 0], line[:, 1]
        area = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if area < min_area:  # a hole (traced the other way round: negative) or a speck
            continue
        pts = line[:-1]  # closed: the last point repeats the first
        d = np.diff(np.vstack([pts[-1:], pts, pts[:1]]), axis=0)
        pts = pts[(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]) != 0] + (x0 - 0.5, y0 - 0.5)  # corners only
        out.append((area, [round(float(v), 1) for v in pts.ravel()]))
    return [p for _, p in sorted(out, key=lambda t: -t[0])]


def rle(mask: np.ndarray) -> dict:
    """A bool mask as COCO RLE ({"size": [h, w], "counts": str}), the COCO format itself."""
    from faster_coco_eval.core import mask as mask_utils  # deferred: only answers with masks need it

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    c = r["counts"]
    return {"size": [int(v) for v in r["size"]], "counts": c.decode() if isinstance(c, bytes) else c}
