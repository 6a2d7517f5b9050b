"""Pascal VOC: Annotations/*.xml and JPEGImages/, read with defusedxml."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.tasks.detect.data import IMAGE_EXTS, SPLITS, DetDataset, DetImage, Problem, box_array, round_px
from imgclf.tasks.detect.formats.bounds import (
    MAX_TEXT_BYTES,
    brief,
    class_file,
    dim,
    finite,
    mb,
    read_text,
    size_or_problem,
    too_many,
)


def _voc_splits(root: Path) -> dict[str, str]:
    out = {}
    for s in SPLITS:
        f = root / "ImageSets" / "Main" / f"{s}.txt"
        if f.is_file():
            out.update({ln.split()[0]: s for ln in read_text(f, "a VOC split list").splitlines() if ln.strip()})
    return out


def read_voc(root: Path) -> DetDataset:
    """Pascal VOC: Annotations/*.xml and JPEGImages/. VOC corners are 1-based
    and inclusive (the devkit's definition), so x1 = xmin - 1, x2 = xmax.
    Parsed with defusedxml: it refuses entity expansion (billion laughs) and
    external entities, which the standard library's parser would follow."""
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import ParseError, parse

    listed = class_file(root)
    ds = DetDataset(classes=list(listed or []), images=[], format="voc", root=root)
    splits, pending = _voc_splits(root), []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            if xml.stat().st_size > MAX_TEXT_BYTES:
                raise ValueError(f"{mb(xml.stat().st_size)}, over the {mb(MAX_TEXT_BYTES)} limit for one "
                                 "annotation")
            tree = parse(str(xml)).getroot()
        except (ParseError, DefusedXmlException, OSError, ValueError, RecursionError) as e:
            ds.problems.append(Problem(str(xml), "unreadable", f"not readable XML ({type(e).__name__}: "
                                       f"{brief(str(e))}); fix or delete the file (its image is left out)"))
            continue
        item = _voc_image(xml, tree, root, ds)
        if item is not None:
            item[0].split = splits.get(xml.stem)
            pending.append(item)
    _voc_finish(ds, pending, listed is not None)
    return ds


def _voc_image(xml: Path, tree, root: Path, ds: DetDataset):
    fname = (tree.findtext("filename") or "").strip()
    img = root / "JPEGImages" / Path(fname).name if fname else None
    if img is None or not img.is_file():
        cands = [p for p in (root / "JPEGImages").glob(xml.stem + ".*") if p.suffix.lower() in IMAGE_EXTS]
        img = cands[0] if cands else None
    if img is None:
        ds.problems.append(Problem(str(xml), "missing_image", f"its image {fname or xml.stem} is not in "
                                   f"{root / 'JPEGImages'}; add it or delete the annotation"))
        return None
    try:
        w, h = dim(float(tree.findtext("size/width") or 0)), dim(float(tree.findtext("size/height") or 0))
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        size = size_or_problem(img, str(xml), ds)
        if size is None:
            return None
        w, h = size
    if too_many(ds, str(xml), sum(1 for _ in tree.iter("object")), "it"):
        return None
    boxes, names = [], []
    for k, obj in enumerate(tree.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            c = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            c = [float("nan")] * 4
        if not finite(c):
            ds.problems.append(Problem(str(xml), "bad_coords", f"object {k} ({brief(name)}) has a missing or "
                                       "non-numeric corner; correct its <bndbox> (the box is left out)"))
            continue
        boxes.append([round_px(c[0] - 1), round_px(c[1] - 1), round_px(c[2]), round_px(c[3])])
        names.append(name)
    return (DetImage(path=img, width=w, height=h, boxes=box_array(boxes), labels=np.zeros(0, np.int64),
                     source=str(xml)), names)


def _voc_finish(ds: DetDataset, pending: list, listed: bool) -> None:
    if not listed:
        ds.classes = sorted({n for _, names in pending for n in names})
    index = {c: i for i, c in enumerate(ds.classes)}
    for im, names in pending:
        keep = [i for i, n in enumerate(names) if n in index]
        for i, n in enumerate(names):
            if n not in index:
                ds.problems.append(Problem(im.source, "unknown_label", f"object {i} is labelled {brief(n)}, not in the "
                                           f"class list {ds.classes}; add it to classes.txt or rename the object"))
        im.boxes, im.labels = im.boxes[keep], np.asarray([index[names[i]] for i in keep], np.int64)
        ds.images.append(im)
