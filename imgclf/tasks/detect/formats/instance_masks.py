"""Instance-id mask PNGs beside their images (Penn-Fudan's PNGImages/ + PedMasks/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import BadImage, sniff
from imgclf.tasks.detect.data import IMAGE_EXTS, DetDataset, DetImage, Problem, box_array
from imgclf.tasks.detect.formats.bounds import brief, class_file, size_or_problem, too_many

# Folder pairs (images, instance-id masks) the mask reader knows.
MASK_LAYOUTS = (("PNGImages", "PedMasks"), ("images", "instance_masks"))


def read_masks(root: Path, class_name: str | None = None) -> DetDataset:
    """Images beside per-image instance-id PNGs (0 background, k the k-th
    object), as Penn-Fudan's PNGImages/ + PedMasks/. One class, named by
    classes.txt when present. Each box is its mask's extent: x2 is one past
    the last column that holds the id. Instance k is box k-1, so the ids must
    run 1..N. A mask is sized from its header and decoded only when it
    matches its image, so a PNG claiming huge dimensions costs nothing."""
    img_dir, mask_dir = next((root / i, root / m) for i, m in MASK_LAYOUTS if (root / i).is_dir() and (root / m).is_dir())
    classes = class_file(root) or [class_name or "object"]
    ds = DetDataset(classes=classes[:1], images=[], format="masks", root=root)
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        mp = next((q for q in (mask_dir / f"{img.stem}_mask.png", mask_dir / f"{img.stem}.png") if q.is_file()), None)
        if mp is None:
            ds.problems.append(Problem(str(img), "missing_image", f"no mask {img.stem}_mask.png in {mask_dir}; "
                                       "add it (the image is left out)"))
            continue
        size = size_or_problem(img, str(img), ds)
        m = _read_mask(mp, size, ds) if size is not None else None
        if m is None:
            continue
        ids = np.unique(m[m > 0])
        if too_many(ds, str(mp), len(ids), "it") or not _ids_in_order(mp, ids, ds):
            continue
        ds.images.append(DetImage(path=img, width=size[0], height=size[1], boxes=mask_boxes(m),
                                  labels=np.zeros(len(ids), np.int64), mask_path=mp, source=str(mp)))
    return ds


def _read_mask(mp: Path, size: tuple[int, int], ds: DetDataset) -> np.ndarray | None:
    """The instance-id array of a mask that matches its image's size, else None and a problem."""
    try:
        _, mode, msize = sniff(mp)
        if msize != size:
            ds.problems.append(Problem(str(mp), "size_mismatch", f"mask is {msize[0]}x{msize[1]}, its image "
                                       f"{size[0]}x{size[1]}; re-save the mask at the image's size"))
            return None
        if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise BadImage(str(mp), f"colour mode {mode}: instance ids are one channel")
        with Image.open(mp) as im:
            m = np.asarray(im)
    except BadImage as e:
        ds.problems.append(Problem(str(mp), "bad_mask", f"{e.reason}; save the mask as a one-channel PNG of instance "
                                   "ids (0 background, 1..N the objects) at its image's size (the image is left out)"))
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        ds.problems.append(Problem(str(mp), "unreadable", f"corrupt or truncated mask ({brief(str(e))}); re-save it "
                                   "(the image is left out)"))
        return None
    return m.astype(np.int64) if m.dtype == bool else m


def _ids_in_order(mp: Path, ids: np.ndarray, ds: DetDataset) -> bool:
    """Instance k is box k-1 (segmentation pairs them): ids must be 1..N."""
    if np.array_equal(ids, np.arange(1, len(ids) + 1)):
        return True
    extra = ids[ids != np.arange(1, len(ids) + 1)]
    ds.problems.append(Problem(str(mp), "bad_mask", f"instance ids {brief(ids.tolist())} do not run 1..{len(ids)} "
                               f"(first out of order: {int(extra[0])}); number the objects 1..N (0 is background; a "
                               "border or void value such as 255 must be 0) (the image is left out)"))
    return False


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2 + 1, y2 + 1) of each nonzero id in an instance-id
    mask, in increasing id order: one pass over the pixels (per-id passes
    would cost ids x pixels)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return box_array([])
    ids, inv = np.unique(mask[ys, xs], return_inverse=True)
    lo, hi = np.full((len(ids), 2), np.iinfo(np.int64).max), np.full((len(ids), 2), -1)
    pts = np.stack([xs, ys], 1)
    np.minimum.at(lo, inv, pts)
    np.maximum.at(hi, inv, pts)
    return np.concatenate([lo, hi + 1], 1).astype(np.float64)
