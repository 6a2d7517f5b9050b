"""What `imgclf check` finds in segmentation masks.

`check_dataset` reads every mask once and reports: masks whose size differs
from their image's, label values not in the class list (nor the ignore
value), images without a mask and masks without an image, and each class's
share of the labelled pixels, with a warning for classes under
RARE_SHARE. Image sizes come from the file headers. With near_dup "hash"
each image is decoded once more for identical and near-identical copies
within a split and across splits (leakage), as for detection
(data/copies.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.copies import CRITERION, CopyGroup, copies_lines, copies_warnings, copy_groups, hash_or_off
from imgclf.errors import DataError
from imgclf.tasks.segment.data import (
    IGNORE_INDEX,
    Problem,
    SegDataset,
    load_mask,
    read_dataset,
    split_dataset,
    unknown_values,
)

# A class with less than this share of the labelled pixels is hard to learn
# and its IoU swings with a few images: warn, and name it.
RARE_SHARE = 0.005


@dataclass
class SegCheckReport:
    format: str
    classes: list[str]
    images: int
    ignore_index: int
    splits: dict[str, int]
    pixel_share: dict[str, float]  # of the labelled (not ignored) pixels
    ignored_share: float  # of all pixels
    size_mismatch: list[dict] = field(default_factory=list)  # {image, mask, image_size, mask_size}
    unknown_values: list[dict] = field(default_factory=list)  # {mask, values}
    missing_mask: list[str] = field(default_factory=list)  # images without a mask
    missing_image: list[str] = field(default_factory=list)  # masks without an image
    problems: list[str] = field(default_factory=list)  # anything else the reader met
    warnings: list[str] = field(default_factory=list)
    split_given: bool = False  # else the split imgclf would make (val/test fraction, seed)
    near_dup: str = "off"  # hash | off
    near_dup_criterion: str = ""
    leaks: list[CopyGroup] = field(default_factory=list)  # copies in more than one split
    copies: list[CopyGroup] = field(default_factory=list)  # copies within one split

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def clean(self) -> bool:
        return not (self.size_mismatch or self.unknown_values or self.missing_mask or self.missing_image
                    or self.problems or self.leaks)


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return None


def check_dataset(data: str | Path | SegDataset, ignore_index: int = IGNORE_INDEX, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0, format: str | None = None, near_dup: str = "hash",
                  progress: bool = False) -> SegCheckReport:
    """Read (leniently) and check segmentation data; nothing is changed.
    near_dup: hash or off (auto means hash). Leakage is judged on the given
    split, else on the one split_dataset makes with these fractions and
    seed, as `train` would."""
    near_dup = hash_or_off(near_dup, "segmentation masks")
    ds = data if isinstance(data, SegDataset) else read_dataset(data, format, ignore_index, strict=False)
    k = len(ds.classes)
    counts = np.zeros(k, np.int64)
    ignored = total = 0
    rep = SegCheckReport(ds.format, ds.classes, len(ds.items), ds.ignore_index, {}, {}, 0.0)
    _pairing(ds.problems, rep)
    for it in ds.items:
        try:
            m = load_mask(ds, it)
        except DataError as e:
            rep.problems.append(str(e))
            continue
        size = it.size or _image_size(it.image)
        if size is None:
            rep.problems.append(f"{it.image}: cannot be read as an image")
        elif (m.shape[1], m.shape[0]) != tuple(size):
            rep.size_mismatch.append({"image": str(it.image), "mask": str(it.mask or it.image),
                                      "image_size": list(size), "mask_size": [m.shape[1], m.shape[0]]})
        bad = unknown_values(m, k, ds.ignore_index)
        if bad:
            rep.unknown_values.append({"mask": str(it.mask or it.image), "values": bad})
        counts += np.bincount(m.ravel(), minlength=256)[:k]
        ignored += int((m == ds.ignore_index).sum())
        total += m.size
    labelled = max(1, int(counts.sum()))
    rep.pixel_share = {c: round(float(n) / labelled, 6) for c, n in zip(ds.classes, counts)}
    rep.ignored_share = round(ignored / max(1, total), 6)
    split: dict[str, list[int]] = {}
    try:
        split = split_dataset(ds, val_fraction, test_fraction, seed)
    except DataError as e:
        rep.problems.append(str(e))
    rep.splits = {s: len(v) for s, v in split.items()}
    rep.split_given = any(it.split for it in ds.items)
    if near_dup == "hash":
        near_duplicates(ds, split, rep, progress)
    rep.warnings = _warnings(rep)
    return rep


def near_duplicates(ds: SegDataset, split: dict[str, list[int]], rep: SegCheckReport, progress: bool) -> None:
    """Groups of identical or near-identical images into rep.leaks and
    rep.copies (files named relative to the data folder); an image that
    cannot be decoded becomes a problem."""
    where = {i: name for name, items in split.items() for i in items}
    bad, rep.leaks, rep.copies = copy_groups([it.image for it in ds.items], [_rel(ds, it.image) for it in ds.items],
                                             [where.get(i, "-") for i in range(len(ds.items))], progress)
    rep.problems += [f"{ds.items[k].image}: {why}; replace or delete the image (training cannot use it)"
                     for k, why in bad]
    rep.near_dup, rep.near_dup_criterion = "hash", CRITERION


def _rel(ds: SegDataset, path: Path) -> str:
    """The file as the user knows it: relative to the data folder (a linked file by its link's name)."""
    p = Path(path)
    for a, b in ((p, Path(ds.root)), (p.parent.resolve() / p.name, Path(ds.root).resolve())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            continue
    return p.as_posix()


def _pairing(problems: list[Problem], rep: SegCheckReport) -> None:
    for p in problems:
        if p.kind == "missing_mask":
            rep.missing_mask.append(p.file)
        elif p.kind == "missing_image":
            rep.missing_image.append(p.file)
        else:
            rep.problems.append(str(p))


def _warnings(rep: SegCheckReport) -> list[str]:
    out = []
    for name, share in rep.pixel_share.items():
        if share == 0:
            out.append(f"class {name!r} has no pixels: the model cannot learn it; label some or drop it from classes.txt")
        elif share < RARE_SHARE:
            out.append(f"class {name!r} covers {share:.2%} of the labelled pixels (under {RARE_SHARE:.1%}): "
                       "expect a low, unsteady IoU; label more of it")
    if rep.size_mismatch:
        e = rep.size_mismatch[0]
        out.append(f"{len(rep.size_mismatch)} mask(s) differ in size from their image, e.g. {e['mask']} is "
                   f"{e['mask_size'][0]}x{e['mask_size'][1]}, its image {e['image_size'][0]}x{e['image_size'][1]}: "
                   "re-export the masks at the image's size")
    if rep.unknown_values:
        vals = sorted({v for u in rep.unknown_values for v in u["values"]})
        out.append(f"{len(rep.unknown_values)} mask(s) hold values not in the class list ({len(rep.classes)} classes, "
                   f"ids 0-{len(rep.classes) - 1}; ignore value {rep.ignore_index}): {vals}, e.g. "
                   f"{rep.unknown_values[0]['mask']}. If one of them marks void, pass --ignore-index {vals[0]}; "
                   "otherwise add the classes to classes.txt")
    for what, items in (("image(s) without a mask", rep.missing_mask), ("mask(s) without an image", rep.missing_image)):
        if items:
            out.append(f"{len(items)} {what}, e.g. {items[0]}: left out of training")
    return out + copies_warnings(rep.split_given, rep.leaks, rep.copies)


def format_report(rep: SegCheckReport) -> str:
    lines = [f"segmentation data ({rep.format}): {rep.images} image(s), {len(rep.classes)} classes, "
             f"ignore value {rep.ignore_index} ({rep.ignored_share:.1%} of pixels)",
             "pixel share per class:"]
    w = max((len(c) for c in rep.classes), default=5)
    lines += [f"  {c:<{w}}  {s:7.2%}" for c, s in rep.pixel_share.items()]
    lines += copies_lines(rep.split_given, rep.splits, rep.leaks, rep.copies, rep.near_dup_criterion)
    lines += [f"warning: {m}" for m in rep.warnings]
    lines += [f"problem: {m}" for m in rep.problems]
    lines.append("clean" if rep.clean else "NOT clean: see above")
    return "\n".join(lines)
