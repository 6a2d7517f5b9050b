"""What `imgclf check` finds in detection labels, `--fix`, and the split.

`check_dataset` reports box counts per class, box sizes and aspect ratios
(with a warning for objects too small at the input size), background images,
boxes outside the image, degenerate and (near-)duplicated boxes, and every
problem the reader met (labels not in the class list, unreadable files, bad
coordinates), and identical or near-identical images: copies within a split
and leakage across the split the run would make (classification's hashing
and grouping, data/file_stats.py and data/near_dup.py). `fix_dataset` writes a cleaned COCO JSON next to nothing of the
user's: boxes clipped, degenerate and duplicated ones dropped, each change
counted. `split_dataset` stratifies by class presence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.copies import CRITERION, CopyGroup, copies_lines, copies_warnings, copy_groups, hash_or_off
from imgclf.data.datasets import multilabel_split
from imgclf.errors import DataError
from imgclf.tasks.detect.data import DetDataset, DetImage, Problem, round_px
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.formats.write import write_coco
from imgclf.tasks.detect.splits import rel

# Two boxes of one class overlapping more than this are one object labelled twice.
DUPLICATE_IOU = 0.95
# An object whose side (square root of its area) is under this many pixels
# once the image is scaled to the input size: the finest feature map of the
# detector (stride 8) gives it about one cell, so it is easily missed.
SMALL_PX = 12.0
SMALL_SHARE = 0.10  # warn when at least this share of a class is small


@dataclass
class BoxIssue:
    image: str
    index: int  # the box's position in the image's list
    label: str
    box: list[float]
    detail: str = ""


@dataclass
class DetCheckReport:
    format: str
    classes: list[str]
    images: int
    boxes: int
    image_size: int
    boxes_per_class: dict[str, int]
    images_per_class: dict[str, int]
    # per class: side (sqrt of area) in original pixels and at the input size, and aspect w/h: p5/p50/p95
    sizes: dict[str, dict[str, list[float]]]
    small_per_class: dict[str, int]
    background_images: list[str] = field(default_factory=list)
    outside: list[BoxIssue] = field(default_factory=list)
    degenerate: list[BoxIssue] = field(default_factory=list)
    duplicates: list[BoxIssue] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split_given: bool = False  # else the split imgclf would make (val/test fraction, seed)
    split_counts: dict[str, int] = field(default_factory=dict)
    near_dup: str = "off"  # hash | off
    near_dup_criterion: str = ""
    leaks: list[CopyGroup] = field(default_factory=list)  # copies in more than one split
    copies: list[CopyGroup] = field(default_factory=list)  # copies within one split

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def labels_clean(self) -> bool:
        """Nothing `--fix` repairs: no bad box, no reading problem."""
        return not (self.outside or self.degenerate or self.duplicates or self.problems)

    @property
    def clean(self) -> bool:
        return self.labels_clean and not self.leaks


def _side_and_aspect(im: DetImage) -> tuple[np.ndarray, np.ndarray]:
    w = np.clip(im.boxes[:, 2] - im.boxes[:, 0], 0, None)
    h = np.clip(im.boxes[:, 3] - im.boxes[:, 1], 0, None)
    return np.sqrt(w * h), np.where(h > 0, w / np.where(h > 0, h, 1), 0.0)


def input_scale(im: DetImage, image_size: int) -> float:
    """The factor the image is resized by: its longer side becomes image_size."""
    return image_size / max(im.width, im.height)


def suggest_image_size(ds: DetDataset, min_px: float = 16.0, quantile: float = 0.1,
                       lo: int = 320, hi: int = 1024) -> int:
    """The input size (a multiple of 32 in [lo, hi]) at which the `quantile`
    smallest boxes still span `min_px` pixels."""
    rel = [s / max(im.width, im.height) for im in ds.images for s in _side_and_aspect(im)[0] if s > 0]
    if not rel:
        return lo
    need = min_px / float(np.quantile(rel, quantile))
    return int(min(hi, max(lo, 32 * math.ceil(need / 32))))


def _pct(v: list[float]) -> list[float]:
    return [round(float(x), 2) for x in np.percentile(v, [5, 50, 95])] if v else []


def _box_issues(im: DetImage, classes: list[str], rep: DetCheckReport) -> None:
    b = im.boxes
    for i, (box, c) in enumerate(zip(b.tolist(), im.labels.tolist())):
        issue = BoxIssue(str(im.path), i, classes[c], box)
        if box[2] <= box[0] or box[3] <= box[1]:
            rep.degenerate.append(issue)
        elif box[0] < 0 or box[1] < 0 or box[2] > im.width or box[3] > im.height:
            rep.outside.append(issue)
    for i, j, v in duplicate_pairs(im):
        rep.duplicates.append(BoxIssue(str(im.path), j, classes[im.labels[j]], b[j].tolist(),
                                       f"IoU {v:.3f} with box {i}"))


def duplicate_pairs(im: DetImage, iou: float = DUPLICATE_IOU, rows: int = 256) -> list[tuple[int, int, float]]:
    """(i, j, IoU), i < j: box j repeats box i (same class, IoU > iou). Per
    class, `rows` boxes at a time against the rest: memory stays a few MB
    a block for the most boxes an image may hold (formats/bounds.py: MAX_BOXES_PER_IMAGE)."""
    import torch
    from torchvision.ops import box_iou

    out = []
    for c in np.unique(im.labels) if len(im.boxes) > 1 else []:
        idx = np.flatnonzero(im.labels == c)
        b = torch.from_numpy(im.boxes[idx])
        for a in range(0, len(idx) - 1, rows):
            m = box_iou(b[a:a + rows], b[a:]).numpy()
            ii, jj = np.nonzero(np.triu(m > iou, k=1))  # column j is box a + j: above the diagonal, i < j
            out += [(int(idx[a + i]), int(idx[a + j]), float(m[i, j])) for i, j in zip(ii.tolist(), jj.tolist())]
    return sorted(out)


def check_dataset(data: str | Path | DetDataset, image_size: int | None = None, near_dup: str = "hash",
                  val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  split: dict[str, list[int]] | None = None, progress: bool = False) -> DetCheckReport:
    """Read (leniently) and check detection labels; nothing is changed.
    near_dup: hash (decode each image once: perceptual and content hashes) or
    off. Leakage is judged on `split` (image indices per split), else on the
    one split_dataset makes with these fractions and seed, as `train` would."""
    near_dup = hash_or_off(near_dup, "detection labels")
    ds = data if isinstance(data, DetDataset) else read_dataset(data, strict=False)
    size = image_size or suggest_image_size(ds)
    k = len(ds.classes)
    sides: list[list[float]] = [[] for _ in range(k)]
    scaled: list[list[float]] = [[] for _ in range(k)]
    aspects: list[list[float]] = [[] for _ in range(k)]
    n_img = [0] * k
    rep = DetCheckReport(format=ds.format, classes=ds.classes, images=len(ds.images), boxes=ds.num_boxes,
                         image_size=size, boxes_per_class={}, images_per_class={}, sizes={}, small_per_class={},
                         problems=list(ds.problems))
    for im in ds.images:
        if len(im.boxes) == 0:
            rep.background_images.append(str(im.path))
        side, asp = _side_and_aspect(im)
        s = input_scale(im, size)
        for c, a, r in zip(im.labels.tolist(), side.tolist(), asp.tolist()):
            sides[c].append(a)
            scaled[c].append(a * s)
            aspects[c].append(r)
        for c in set(im.labels.tolist()):
            n_img[c] += 1
        _box_issues(im, ds.classes, rep)
    for c, name in enumerate(ds.classes):
        rep.boxes_per_class[name] = len(sides[c])
        rep.images_per_class[name] = n_img[c]
        rep.sizes[name] = {"side_px": _pct(sides[c]), "side_at_input": _pct(scaled[c]), "aspect": _pct(aspects[c])}
        rep.small_per_class[name] = int(sum(v < SMALL_PX for v in scaled[c]))
    split = split or split_dataset(ds, val_fraction, test_fraction, seed)
    rep.split_given = any(im.split for im in ds.images)
    rep.split_counts = {k: len(v) for k, v in split.items()}
    if near_dup == "hash":
        near_duplicates(ds, split, rep, progress)
    rep.warnings = _warnings(rep, ds)
    return rep


def near_duplicates(ds: DetDataset, split: dict[str, list[int]], rep: DetCheckReport, progress: bool) -> None:
    """Groups of identical or near-identical images into rep.leaks and
    rep.copies, through classification's scan (one decode per image: pHash
    of it and its mirror, content hash) and pair grouping; an image that
    cannot be decoded becomes a problem."""
    where = {i: name for name, items in split.items() for i in items}
    bad, rep.leaks, rep.copies = copy_groups([im.path for im in ds.images], [rel(ds, im.path) for im in ds.images],
                                             [where.get(x, "-") for x in range(len(ds.images))], progress)
    rep.problems += [Problem(str(ds.images[k].path), "unreadable", f"{why}; replace or delete the image "
                             "(training cannot use it)") for k, why in bad]
    rep.near_dup, rep.near_dup_criterion = "hash", CRITERION


def _warnings(rep: DetCheckReport, ds: DetDataset) -> list[str]:
    out = []
    for name, n in rep.boxes_per_class.items():
        if n == 0:
            out.append(f"class {name!r} has no boxes: the model cannot learn it; label some or drop it from the list")
        elif rep.small_per_class[name] >= SMALL_SHARE * n:
            out.append(f"{rep.small_per_class[name]} of {n} {name!r} boxes are under {SMALL_PX:.0f} px at input size "
                       f"{rep.image_size}: they are easily missed; a larger --image-size "
                       f"(e.g. {suggest_image_size(ds, lo=rep.image_size + 32)}) helps")
    for what, items in (("outside the image", rep.outside), ("degenerate (zero or negative area)", rep.degenerate),
                        (f"duplicated (IoU > {DUPLICATE_IOU}, same class)", rep.duplicates)):
        if items:
            out.append(f"{len(items)} box(es) {what}, e.g. {items[0].image} box {items[0].index}: "
                       "`imgclf check --fix` writes a cleaned COCO copy")
    if rep.problems:
        out.append(f"{len(rep.problems)} problem(s) reading the labels, e.g. {rep.problems[0]}")
    return out + copies_warnings(rep.split_given, rep.leaks, rep.copies)


def fix_dataset(data: str | Path | DetDataset, out: str | Path) -> dict[str, int]:
    """Write a cleaned copy of the labels as COCO JSON at `out`: boxes clipped
    to the image, degenerate ones (also those with nothing left after
    clipping) and duplicates dropped. Returns what changed, counted. Labels
    the reader had to leave out (unknown class, bad coordinates, unreadable
    files) are counted too. The user's files are never written."""
    ds = data if isinstance(data, DetDataset) else read_dataset(data, strict=False)
    out = Path(out).resolve()
    sources = {Path(im.source).resolve() for im in ds.images if im.source} | {Path(p.file.split(":")[0]).resolve()
                                                                            for p in ds.problems}
    if out in sources or out.is_relative_to(ds.root.resolve()) and out.exists():
        raise DataError(f"--fix output {out} would overwrite the user's labels", "write the cleaned copy elsewhere")
    counts = {"clipped": 0, "dropped_degenerate": 0, "dropped_duplicates": 0}
    for p in ds.problems:
        counts[f"left_out_{p.kind}"] = counts.get(f"left_out_{p.kind}", 0) + 1
    clean = DetDataset(classes=ds.classes, images=[_fixed(im, counts) for im in ds.images], format=ds.format,
                       root=ds.root)
    write_coco(clean, out)
    return counts


def _fixed(im: DetImage, counts: dict[str, int]) -> DetImage:
    b = im.boxes.copy()
    lim = np.array([im.width, im.height, im.width, im.height], np.float64)
    c = np.clip(b, 0, lim)
    moved = np.any(c != b, axis=1)
    ok = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    counts["clipped"] += int(np.sum(moved & ok))
    counts["dropped_degenerate"] += int(np.sum(~ok))
    c = np.vectorize(round_px)(c) if len(c) else c
    kept = DetImage(path=im.path, width=im.width, height=im.height, boxes=c[ok].reshape(-1, 4),
                    labels=im.labels[ok], mask_path=None, split=im.split, source=im.source)
    dup = {j for _, j, _ in duplicate_pairs(kept)}
    counts["dropped_duplicates"] += len(dup)
    keep = [i for i in range(len(kept.boxes)) if i not in dup]
    kept.boxes, kept.labels = kept.boxes[keep].reshape(-1, 4), kept.labels[keep]
    return kept


def split_dataset(ds: DetDataset, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, list[int]]:
    """Image indices per split. A split the data gives (VOC ImageSets, YOLO
    data.yaml, COCO files named by split) is kept; a missing val (or test)
    is carved from train. Stratified by which classes each image holds
    (background images are a stratum of their own), reproducible by seed."""
    given = {s: [i for i, im in enumerate(ds.images) if im.split == s] for s in ("train", "val", "test")}
    unassigned = [i for i, im in enumerate(ds.images) if im.split not in given]
    pool = given["train"] + unassigned
    want = [("val", 0.0 if given["val"] else val_fraction), ("test", 0.0 if given["val"] or given["test"] else test_fraction)]
    total = len(pool)
    fracs = tuple(f * len(ds.images) / total if total else 0.0 for _, f in want)
    items = [(str(i), tuple(sorted(set(ds.images[i].labels.tolist())))) for i in pool]
    parts = multilabel_split(items, len(ds.classes), fracs, seed) if pool else [[], [], []]
    out = {"train": sorted(int(i) for i, _ in parts[-1])}
    for (name, _), part in zip(want, parts[:-1]):
        out[name] = sorted(given[name] + [int(i) for i, _ in part])
    return out


def format_summary(rep: DetCheckReport) -> list[str]:
    """The lines `train` says once: boxes per class, their sizes at the input
    size, background images, and the warnings."""
    lines = [f"{rep.boxes} boxes in {rep.images} images: " + ", ".join(
        f"{c} {rep.boxes_per_class[c]}" for c in rep.classes)]
    lines += [f"  {c}: side p5/p50/p95 {'/'.join(f'{v:g}' for v in rep.sizes[c]['side_at_input'])} px at "
              f"{rep.image_size} px, aspect w/h p50 {rep.sizes[c]['aspect'][1]:g}" for c in rep.classes
              if rep.sizes.get(c, {}).get("side_at_input")]
    if rep.background_images:
        lines.append(f"{len(rep.background_images)} image(s) without boxes, kept as background")
    return lines + [f"warning: {w}" for w in rep.warnings]


def format_report(rep: DetCheckReport) -> str:
    """`imgclf check` on detection labels, as text."""
    lines = [f"detection labels ({rep.format}): {len(rep.classes)} classes, {rep.images} images"] + format_summary(rep)
    for what, items in (("outside the image", rep.outside), ("degenerate", rep.degenerate),
                        ("duplicated", rep.duplicates)):
        lines += [f"  {what}: {i.image} box {i.index} ({i.label} {[round(v, 1) for v in i.box]}) {i.detail}".rstrip()
                  for i in items[:10]]
        if len(items) > 10:
            lines.append(f"  ... and {len(items) - 10} more {what}")
    lines += [f"  problem: {p}" for p in rep.problems[:20]]
    if len(rep.problems) > 20:
        lines.append(f"  ... and {len(rep.problems) - 20} more problems")
    lines += _copies_lines(rep)
    if rep.labels_clean:
        lines.append("clean" if rep.clean else "labels clean; images leak across the split (see above)")
    else:
        lines.append("not clean: `imgclf check DATA --fix` writes a cleaned COCO copy (your files are never changed)")
    return "\n".join(lines)


def _copies_lines(rep: DetCheckReport) -> list[str]:
    return copies_lines(rep.split_given, rep.split_counts, rep.leaks, rep.copies, rep.near_dup_criterion)
