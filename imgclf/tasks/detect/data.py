"""Detection labels in one in-memory form, whatever format they were read
from (formats/: Pascal VOC, COCO, YOLO, instance-id mask PNGs; written back
out as COCO or YOLO by formats/write.py).

The one form (`DetDataset`): per image its path, size, boxes as float
[x1, y1, x2, y2] in pixels of the stored image (0 at the left edge of the
first pixel, so a box may reach x2 == width), class indices into
`DetDataset.classes`, and for instance masks the mask's path. Coordinates are
kept to 1e-6 px: YOLO's normalised floats carry no more, and rounding every
reader alike makes a box read from any of the three formats compare equal.
Every problem a reader finds is a `Problem` (file, kind, fix) in
`DetDataset.problems`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.errors import DataError

FORMATS = ("voc", "coco", "yolo", "masks")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


@dataclass
class Problem:
    file: str
    kind: str  # unreadable | bad_coords | unknown_label | missing_image | size_mismatch | too_many_boxes | bad_mask
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


@dataclass
class DetImage:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float64, x1 y1 x2 y2 in pixels
    labels: np.ndarray  # (N,) int64, indices into DetDataset.classes
    mask_path: Path | None = None  # instance ids: 0 background, k the k-th object (k-th box)
    split: str | None = None  # train/val/test when the data says so
    source: str = ""  # the annotation file, for messages


@dataclass
class DetDataset:
    classes: list[str]
    images: list[DetImage]
    format: str
    root: Path
    problems: list[Problem] = field(default_factory=list)

    def raise_problems(self) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(str(p) for p in self.problems[:10])
        more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
        raise DataError(f"{self.root}: {len(self.problems)} problem(s) in the labels:\n  {shown}{more}",
                        "correct those files, or run `imgclf check --fix` to write a cleaned COCO copy")

    @property
    def num_boxes(self) -> int:
        return sum(len(im.boxes) for im in self.images)


def round_px(v: float) -> float:
    return round(float(v), 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def box_array(boxes: list) -> np.ndarray:
    return np.asarray(boxes, np.float64).reshape(-1, 4)
