"""COCO instances JSON, checked field by field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgclf.errors import DataError
from imgclf.tasks.detect.data import SPLITS, DetDataset, DetImage, Problem, box_array, round_px
from imgclf.tasks.detect.formats.bounds import MAX_JSON_BYTES, brief, dim, finite, mb, size_or_problem, too_many


def coco_jsons(folder: Path) -> list[Path]:
    found = []
    for d in (folder, folder / "annotations"):
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            with open(p, "rb") as f:
                head = f.read(4096)
            if b'"images"' in head or b'"annotations"' in head or b'"categories"' in head or p.parent.name == "annotations":
                found.append(p)
    return found


def _load_json(path: Path, max_bytes: int) -> dict:
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path}: {mb(size)} is over the {mb(max_bytes)} limit for a COCO file",
                        "split it into smaller files, or raise the limit (max_json_bytes) if it is genuine")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({brief(str(e))})", "repair or re-export the COCO file") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (no COCO file nests more than a few levels)",
                        "re-export the COCO file from the labelling tool") from None
    if not isinstance(d, dict) or not isinstance(d.get("images"), list) or not isinstance(d.get("categories"), list):
        raise DataError(f"{path}: not a COCO instances file (needs lists 'images', 'annotations', 'categories')",
                        "export the labels as COCO instances JSON")
    return d


def _coco_image_path(file_name: str, json_path: Path) -> Path | None:
    base = json_path.parent
    for d in (base, base / "images", base.parent, base.parent / "images"):
        p = d / file_name
        if p.is_file():
            return p
    return None


def read_coco(path: Path, max_json_bytes: int = MAX_JSON_BYTES) -> DetDataset:
    """COCO instances JSON (one file, or a folder of them named by split).
    Read with the json module and checked here field by field:
    pycocotools' COCO() (and faster-coco-eval's) builds indexes but neither
    validates nor says which annotation is bad. Crowd regions (iscrowd=1)
    are not objects to learn and are left out."""
    files = [path] if path.is_file() else coco_jsons(path)
    root = path if path.is_dir() else path.parent
    ds = DetDataset(classes=[], images=[], format="coco", root=root)
    for f in files:
        split = next((s for s in SPLITS if s in f.stem.lower()), None) if len(files) > 1 else None
        _read_coco_file(f, ds, split, max_json_bytes)
    return ds


def _is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _coco_classes(d: dict, f: Path, ds: DetDataset) -> dict:
    cats = []
    for k, c in enumerate(d["categories"]):
        if isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c["id"], bool) \
                and isinstance(c.get("name", ""), (str, int)):
            cats.append(c)
        else:
            ds.problems.append(Problem(str(f), "unknown_label", f"categories[{k}] = {brief(c)} is not "
                                       '{"id": integer, "name": text}; correct it (its boxes are left out)'))
    cats.sort(key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    if ds.classes and names != ds.classes:
        raise DataError(f"{f}: its categories {names} differ from {ds.classes} in the other COCO files",
                        "give every split file the same category list")
    ds.classes = names
    return {c["id"]: i for i, c in enumerate(cats)}


def _read_coco_file(f: Path, ds: DetDataset, split: str | None, max_bytes: int) -> None:
    d = _load_json(f, max_bytes)
    cat_index = _coco_classes(d, f, ds)
    by_image: dict = {}
    anns = d.get("annotations") or []
    for k, a in enumerate(anns if isinstance(anns, list) else []):
        if not isinstance(a, dict) or a.get("iscrowd", 0):
            continue
        if not _is_id(a.get("image_id")):
            ds.problems.append(Problem(str(f), "bad_coords", f"annotations[{k}]: image_id {brief(a.get('image_id'))} "
                                       "is not an id; correct it (the box is left out)"))
            continue
        by_image.setdefault(a["image_id"], []).append((k, a))
    for n, im in enumerate(d["images"]):
        item = _coco_image(im, n, f, ds, by_image, cat_index)
        if item is not None:
            item.split = split
            ds.images.append(item)


def _coco_image(im, n: int, f: Path, ds: DetDataset, by_image: dict, cat_index: dict) -> DetImage | None:
    name = im.get("file_name") if isinstance(im, dict) else None
    p = _coco_image_path(name, f) if isinstance(name, str) and name else None
    if p is None:
        ds.problems.append(Problem(str(f), "missing_image", f"images[{n}]: {brief(name if name else im)} is not an "
                                   f"image beside {f.name} nor in images/; put it there or correct file_name"))
        return None
    w, h = dim(im.get("width")), dim(im.get("height"))
    if w <= 0 or h <= 0:
        size = size_or_problem(p, str(f), ds)
        if size is None:
            return None
        w, h = size
    anns = by_image.get(im.get("id"), []) if _is_id(im.get("id")) else []
    if too_many(ds, str(f), len(anns), f"image id {brief(im.get('id'))} ({brief(name)})"):
        return None
    boxes, labels = [], []
    for k, a in anns:
        bb, x2y2 = a.get("bbox"), None
        if isinstance(bb, list) and len(bb) == 4 and finite(bb):
            x2y2 = (float(bb[0]) + float(bb[2]), float(bb[1]) + float(bb[3]))
        if x2y2 is None or not finite(x2y2):  # x + w can overflow to inf
            ds.problems.append(Problem(str(f), "bad_coords", f"annotation {brief(a.get('id', k))}: bbox {brief(bb)} "
                                       "is not 4 finite numbers [x, y, w, h]; correct it (the box is left out)"))
            continue
        cat = a.get("category_id")
        if not _is_id(cat) or cat not in cat_index:
            ds.problems.append(Problem(str(f), "unknown_label", f"annotation {brief(a.get('id', k))}: category_id "
                                       f"{brief(cat)} is not in 'categories'; add the category or correct the id"))
            continue
        boxes.append([round_px(bb[0]), round_px(bb[1]), round_px(x2y2[0]), round_px(x2y2[1])])
        labels.append(cat_index[cat])
    return DetImage(path=p, width=w, height=h, boxes=box_array(boxes), labels=np.asarray(labels, np.int64),
                    source=str(f))
