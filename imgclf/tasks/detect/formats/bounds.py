"""Hostile label files cost bounded memory and time, whatever the format:
every file is size-capped before it is parsed, an image may hold at most
MAX_BOXES_PER_IMAGE boxes, images are sized from their headers (a PNG
claiming 100,000 x 100,000 pixels is never decoded), and a field's value is
quoted shortened (reprlib) in messages. Each reader (voc, coco, yolo,
instance_masks) reads through these."""

from __future__ import annotations

import math
import reprlib
from pathlib import Path

from imgclf.data.images import MAX_PIXELS, BadImage, sniff
from imgclf.errors import DataError
from imgclf.tasks.detect.data import DetDataset, Problem

# A COCO instances file larger than this is refused before json.load (which
# holds about 10x the file size in memory); pass max_json_bytes to raise it.
MAX_JSON_BYTES = 1 << 30
# One image's labels: COCO's densest images hold under 100 objects, dense
# retail or aerial sets some thousands. Beyond this an image is refused
# (check's duplicate search and training's matching grow with its square).
MAX_BOXES_PER_IMAGE = 10_000
# A text label file (VOC XML, YOLO .txt, data.yaml, classes.txt, split lists):
# MAX_BOXES_PER_IMAGE polygon lines of a few hundred points fit well within.
MAX_TEXT_BYTES = 64 << 20


def finite(vals) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)


_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxlist, _brief.maxdict, _brief.maxstring, _brief.maxother = 2, 6, 4, 40, 40


def brief(v) -> str:
    """A value from a label file as a message quotes it: short, whatever its size or depth."""
    return _brief.repr(v)


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def dim(v) -> int:
    """A width or height from a label file, or 0 (then the image header says)."""
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        0 < v <= MAX_PIXELS else 0


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels;
    BadImage (naming the file and why) for what is no image or too big to be
    decoded (over images.MAX_PIXELS)."""
    _, _, (w, h) = sniff(path)
    if w * h > MAX_PIXELS:
        raise BadImage(str(path), f"{w}x{h} = {w * h:,} pixels is over the limit of {MAX_PIXELS:,} "
                                  "(decompression bomb?)")
    return w, h


def size_or_problem(img: Path, source: str, ds: DetDataset) -> tuple[int, int] | None:
    try:
        return image_size(img)
    except BadImage as e:
        ds.problems.append(Problem(source, "unreadable", f"its image {img} cannot be used ({e.reason}); replace "
                                   "it or delete the annotation (the image is left out)"))
        return None


def read_text(path: Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A small text file (UTF-8), or DataError naming it, why and the fix."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {mb(size)} is over the {mb(max_bytes)} limit for {what}",
                            "this is no label file of a usual dataset; check it, or split it")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})",
                        "save it as UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: {what} cannot be read ({e.strerror or e})", "check the file") from None


def too_many(ds: DetDataset, source: str, n: int, where: str) -> bool:
    if n <= MAX_BOXES_PER_IMAGE:
        return False
    ds.problems.append(Problem(source, "too_many_boxes", f"{where} has {n:,} boxes, over the limit of "
                               f"{MAX_BOXES_PER_IMAGE:,} for one image; split the image into tiles or correct the "
                               "labels (the image is left out)"))
    return True


def class_file(root: Path) -> list[str] | None:
    for name in ("classes.txt", "labels.txt"):
        f = root / name
        if f.is_file():
            return [ln.strip() for ln in read_text(f, "a class list").splitlines() if ln.strip()]
    return None
