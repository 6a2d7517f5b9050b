"""The segmentation answer, shared by every engine (PyTorch in
torch_predictor.py; an exported graph later): the resize that prepares an
image, the label map brought back to the original image's size, and the
answer.

    SegPredictor.prepare(src)  -> uint8 (h, w, 3), longer side image_size, aspect kept; and the original (w, h)
    SegPredictor.outputs(batch) -> uint8 (N, h, w) label maps at the input's size (argmax of the logits)
    SegPredictor.label_maps(xs, sizes) -> a label map per image at its original size
    SegPredictor.predict(inputs) -> [{"path", "width", "height", "classes": {name: pixel share}, "mask": (H, W) uint8}]
    mask_png(mask, n) -> bytes: the label map as a palette PNG (pixel values: class ids), as answers carry it

An engine that has the logits (PyTorch) resizes them before the argmax
(`label_maps`); one that returns label maps is resized back with nearest
neighbour, the documented way for an exported graph. No torch here.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from imgclf.data.images import MAX_PIXELS, BadImage, Source, open_image
from imgclf.errors import ConfigError, ModelFileError
from imgclf.inference.batches import as_inputs, blank_answers, prepared_batches

ANSWER_KEYS = ("path", "width", "height", "classes", "mask")


def base_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(w, h) with the longer side at image_size, aspect kept: the network is
    fully convolutional, so no padding and no crop (nothing of the image is lost)."""
    s = image_size / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def prepare_image(img: Image.Image, image_size: int) -> np.ndarray:
    """An RGB PIL image -> uint8 (h, w, 3) at the base size (bilinear): what
    training, evaluation and every engine see."""
    return np.asarray(img.resize(base_size(*img.size, image_size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map to (w, h) with nearest neighbour (ids are never blended)."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize(tuple(size), Image.NEAREST))


class SegPredictor:
    """Shared by the engines: batching, bad inputs, the answer."""

    task = "segment"
    classes: list[str]
    image_size: int
    source: str
    arch: str = "segmenter"
    metadata: dict
    # What the server's /v1/model shows for every model; a segmenter has no
    # temperature, unknown-input scorer, multi-label decisions or thresholds.
    temperature, has_unknown, multi_label, reject, int8, thresholds = 1.0, False, False, None, False, None

    def set_reject(self, setting) -> None:
        if setting not in (None, "", "off"):
            raise ConfigError(f"--reject {setting}: a segmentation model has no unknown-input score", "drop --reject")

    def warm_up(self) -> None:
        """Build whatever the first call would (a server calls this before it says ready)."""

    def self_check(self) -> None:
        """One real inference on a blank image at load: a damaged or crafted
        model that fails at run time, or answers ids its classes do not name,
        is refused now rather than on every request."""
        s = self.image_size
        try:
            m = np.asarray(self.outputs(np.zeros((1, s, s, 3), np.uint8)))
        except Exception as e:  # any runtime's own error types
            raise ModelFileError(f"{self.source}: the model fails on a blank {s}x{s} image ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                                 "train or export the run again") from None
        if m.shape != (1, s, s) or (m.size and int(m.max()) >= len(self.classes)):
            raise ModelFileError(f"{self.source}: the model's label map ({m.shape}, ids up to "
                                 f"{int(m.max()) if m.size else '-'}) does not fit a {s}x{s} input and its "
                                 f"{len(self.classes)} classes", "train or export the run again")

    def prepare(self, src: Source, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        img = open_image(src, None, max_pixels)
        try:
            return prepare_image(img, self.image_size), img.size
        except Exception as e:  # PIL's many error types for odd modes and sizes
            raise BadImage(getattr(src, "name", None) or str(src)[:200], f"cannot resize this image ({e})") from None

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, h, w, 3) -> uint8 (N, h, w) label maps."""
        raise NotImplementedError

    def label_maps(self, xs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Prepared images (any mix of shapes) -> label maps at their original (w, h)."""
        out: list[np.ndarray | None] = [None] * len(xs)
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            by_shape.setdefault(x.shape, []).append(i)
        for idx in by_shape.values():
            for i, m in zip(idx, self.outputs(np.stack([xs[i] for i in idx]))):
                out[i] = resize_mask(m, sizes[i])
        return out

    def segment(self, inputs, batch_size: int = 8) -> list[dict]:
        """Per input: {"width", "height", "mask"} (the label map at the
        original size), or {"error": reason} for a bad input."""
        out = blank_answers(inputs)
        for ids, got in prepared_batches(inputs, self.prepare, batch_size, out):
            sizes = [size for _, size in got]
            for i, size, m in zip(ids, sizes, self.label_maps([x for x, _ in got], sizes)):
                out[i].update(width=size[0], height=size[1], mask=m)
        return out

    def predict(self, inputs, batch_size: int = 8, **_) -> list[dict]:
        """The answer for each input (a path, bytes, PIL image, HxWx3 array,
        or a list of them): {"path", "width", "height", "classes": {name:
        share of the image's pixels}, "mask": uint8 (H, W) class ids}, or
        {"path", "error"}."""
        return [answer(d, self.classes) for d in self.segment(as_inputs(inputs), batch_size)]


def class_shares(mask: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Each class's share of the image's pixels (classes with none left out).
    Counted by PIL's histogram of the uint8 map: np.bincount would first copy
    it at 8 bytes a pixel, which a server answering large photos cannot spare."""
    n = Image.fromarray(np.ascontiguousarray(mask, np.uint8)).histogram()[: len(classes)]
    total = max(1, mask.size)
    return {c: round(float(k) / total, 6) for c, k in zip(classes, n) if k}


def answer(d: dict, classes: list[str]) -> dict:
    if "error" in d or "mask" not in d:
        return {k: v for k, v in d.items() if k in ("path", "error")}
    return {**({"path": d["path"]} if "path" in d else {}), "width": d["width"], "height": d["height"],
            "classes": class_shares(d["mask"], classes), "mask": d["mask"]}


# --- drawing: label maps as colours (predict --save-masks, the report) ---------------

def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per class: Pascal VOC's bit-interleaved
    palette, which keeps neighbouring ids apart in colour, from its second
    entry: VOC's first is black, which void pixels keep, so class 0 (Sky in
    CamVid) is never drawn as black nor confused with void."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colour_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 (H, W, 3): each class its palette colour, other values (void) black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = palette(num_classes)
    return lut[mask]


def overlay(img: Image.Image, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """The image with the label map's colours blended over it (void pixels left clear)."""
    rgb = np.asarray(img.convert("RGB").resize((mask.shape[1], mask.shape[0])), np.float32)
    col = colour_mask(mask, num_classes).astype(np.float32)
    a = np.where((mask < num_classes)[..., None], alpha, 0.0)
    return Image.fromarray((rgb * (1 - a) + col * a).round().astype(np.uint8))


def mask_png(mask: np.ndarray, num_classes: int) -> bytes:
    """The label map as PNG bytes (label_png): what JSON answers carry, base64.
    zlib's fastest level: label maps are long runs of a few values, so its
    PNGs stay far under a byte a pixel, and it is quicker than the default
    on a large photo's map."""
    buf = io.BytesIO()
    label_png(mask, num_classes).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def label_png(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A palette PNG (mode P) of the label map: its pixel values are the class
    ids (what a program reads back), its palette the colours a viewer shows."""
    m = np.ascontiguousarray(mask, np.uint8)
    im = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    pal = np.zeros((256, 3), np.uint8)
    pal[:num_classes] = palette(num_classes)
    im.putpalette(pal.ravel().tolist())
    return im
