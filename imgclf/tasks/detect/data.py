"""Detection labels: Pascal VOC, COCO, YOLO and instance-id mask PNGs, read
into one in-memory form and written back out as COCO or YOLO.

The one form (`DetDataset`): per image its path, size, boxes as float
[x1, y1, x2, y2] in pixels of the stored image (0 at the left edge of the
first pixel, so a box may reach x2 == width), class indices into
`DetDataset.classes`, and for instance masks the mask's path. Coordinates are
kept to 1e-6 px: YOLO's normalised floats carry no more, and rounding every
reader alike makes a box read from any of the three formats compare equal.

Readers never stop at the first bad file: each problem (unreadable XML, NaN
coordinates, a label outside the class list, a missing image) is recorded in
`DetDataset.problems` with the file and the fix, the box or file is left out,
and `strict=True` (the default) raises one `DataError` listing them.
`imgclf.tasks.detect.check` reads with `strict=False` to report them.

Hostile files cost bounded memory and time: every file is size-capped before
it is parsed, an image may hold at most MAX_BOXES_PER_IMAGE boxes, images and
masks are sized from their headers (a PNG claiming 100,000 x 100,000 pixels is
never decoded), nesting too deep for the parsers is a DataError, and a
field's value is quoted shortened (reprlib) in messages.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import MAX_PIXELS, BadImage, sniff
from imgclf.errors import DataError
from imgclf.io import atomic_write_text

FORMATS = ("voc", "coco", "yolo", "masks")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
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
# Folder pairs (images, instance-id masks) the mask reader knows.
MASK_LAYOUTS = (("PNGImages", "PedMasks"), ("images", "instance_masks"))


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


def _box_array(boxes: list) -> np.ndarray:
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def _finite(vals) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)


_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxlist, _brief.maxdict, _brief.maxstring, _brief.maxother = 2, 6, 4, 40, 40


def brief(v) -> str:
    """A value from a label file as a message quotes it: short, whatever its size or depth."""
    return _brief.repr(v)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def _dim(v) -> int:
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


def _size_or_problem(img: Path, source: str, ds: DetDataset) -> tuple[int, int] | None:
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
            raise DataError(f"{path}: {_mb(size)} is over the {_mb(max_bytes)} limit for {what}",
                            "this is no label file of a usual dataset; check it, or split it")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})",
                        "save it as UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: {what} cannot be read ({e.strerror or e})", "check the file") from None


def _too_many(ds: DetDataset, source: str, n: int, where: str) -> bool:
    if n <= MAX_BOXES_PER_IMAGE:
        return False
    ds.problems.append(Problem(source, "too_many_boxes", f"{where} has {n:,} boxes, over the limit of "
                               f"{MAX_BOXES_PER_IMAGE:,} for one image; split the image into tiles or correct the "
                               "labels (the image is left out)"))
    return True


# --- which format is it ----------------------------------------------------------

def _coco_jsons(folder: Path) -> list[Path]:
    found = []
    for d in (folder, folder / "annotations"):
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            with open(p, "rb") as f:
                head = f.read(4096)
            if b'"images"' in head or b'"annotations"' in head or b'"categories"' in head or p.parent.name == "annotations":
                found.append(p)
    return found


def detect_format(path: str | Path) -> str | None:
    """Which detection format `path` holds ("voc", "coco", "yolo", "masks"), or
    None when it holds none of them (a classification folder, say)."""
    p = Path(path)
    if p.is_file():
        return {".json": "coco", ".yaml": "yolo", ".yml": "yolo"}.get(p.suffix.lower())
    if not p.is_dir():
        return None
    if (p / "Annotations").is_dir() and any((p / "Annotations").glob("*.xml")):
        return "voc"
    if _yolo_yaml(p) is not None or ((p / "images").is_dir() and (p / "labels").is_dir()):
        return "yolo"
    if any((p / i).is_dir() and (p / m).is_dir() for i, m in MASK_LAYOUTS):
        return "masks"
    if _coco_jsons(p):
        return "coco"
    return None


def read_dataset(path: str | Path, format: str | None = None, strict: bool = True,
                 max_json_bytes: int = MAX_JSON_BYTES) -> DetDataset:
    """Read detection labels from a folder (or a COCO .json / YOLO .yaml file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    fmt = format or detect_format(p)
    if fmt is None:
        raise DataError(f"{p}: no detection labels found",
                        "expected Pascal VOC (Annotations/*.xml + JPEGImages/), COCO (a .json with images, "
                        "annotations, categories), YOLO (data.yaml, images/, labels/) or PNGImages/ + PedMasks/")
    readers = {"voc": read_voc, "coco": lambda q: read_coco(q, max_json_bytes=max_json_bytes),
               "yolo": read_yolo, "masks": read_masks}
    if fmt not in readers:
        raise DataError(f"format={fmt!r} is unknown", f"choose one of {', '.join(FORMATS)}")
    ds = readers[fmt](p)
    if strict:
        ds.raise_problems()
    return ds


def _class_file(root: Path) -> list[str] | None:
    for name in ("classes.txt", "labels.txt"):
        f = root / name
        if f.is_file():
            return [ln.strip() for ln in read_text(f, "a class list").splitlines() if ln.strip()]
    return None


# --- Pascal VOC -------------------------------------------------------------------

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

    listed = _class_file(root)
    ds = DetDataset(classes=list(listed or []), images=[], format="voc", root=root)
    splits, pending = _voc_splits(root), []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            if xml.stat().st_size > MAX_TEXT_BYTES:
                raise ValueError(f"{_mb(xml.stat().st_size)}, over the {_mb(MAX_TEXT_BYTES)} limit for one "
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
        w, h = _dim(float(tree.findtext("size/width") or 0)), _dim(float(tree.findtext("size/height") or 0))
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        size = _size_or_problem(img, str(xml), ds)
        if size is None:
            return None
        w, h = size
    if _too_many(ds, str(xml), sum(1 for _ in tree.iter("object")), "it"):
        return None
    boxes, names = [], []
    for k, obj in enumerate(tree.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            c = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            c = [float("nan")] * 4
        if not _finite(c):
            ds.problems.append(Problem(str(xml), "bad_coords", f"object {k} ({brief(name)}) has a missing or "
                                       "non-numeric corner; correct its <bndbox> (the box is left out)"))
            continue
        boxes.append([round_px(c[0] - 1), round_px(c[1] - 1), round_px(c[2]), round_px(c[3])])
        names.append(name)
    return (DetImage(path=img, width=w, height=h, boxes=_box_array(boxes), labels=np.zeros(0, np.int64),
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


# --- COCO -------------------------------------------------------------------------

def _load_json(path: Path, max_bytes: int) -> dict:
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path}: {_mb(size)} is over the {_mb(max_bytes)} limit for a COCO file",
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
    files = [path] if path.is_file() else _coco_jsons(path)
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
    w, h = _dim(im.get("width")), _dim(im.get("height"))
    if w <= 0 or h <= 0:
        size = _size_or_problem(p, str(f), ds)
        if size is None:
            return None
        w, h = size
    anns = by_image.get(im.get("id"), []) if _is_id(im.get("id")) else []
    if _too_many(ds, str(f), len(anns), f"image id {brief(im.get('id'))} ({brief(name)})"):
        return None
    boxes, labels = [], []
    for k, a in anns:
        bb, x2y2 = a.get("bbox"), None
        if isinstance(bb, list) and len(bb) == 4 and _finite(bb):
            x2y2 = (float(bb[0]) + float(bb[2]), float(bb[1]) + float(bb[3]))
        if x2y2 is None or not _finite(x2y2):  # x + w can overflow to inf
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
    return DetImage(path=p, width=w, height=h, boxes=_box_array(boxes), labels=np.asarray(labels, np.int64),
                    source=str(f))


# --- YOLO -------------------------------------------------------------------------

def _yolo_yaml(folder: Path) -> Path | None:
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        if (folder / name).is_file():
            return folder / name
    return None


def _yolo_names(cfg: dict, f: Path) -> list[str]:
    names = cfg.get("names")
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            names = None
    # Only text or numbers: str() of a YAML alias tree ("billion laughs") would grow exponentially.
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int, float)) for n in names):
        raise DataError(f"{f}: no 'names' list of class names", "add `names: [class0, class1, ...]` to it")
    return [str(n) for n in names]


def _yolo_image_lists(cfg: dict, base: Path) -> list[tuple[Path, str | None]]:
    """(image, split) for every image the data.yaml's train/val/test name,
    or every image under images/ when it names none."""
    out: dict[Path, str | None] = {}
    for s in SPLITS:
        entries = cfg.get(s)
        entries = [entries] if isinstance(entries, str) else entries if isinstance(entries, list) else []
        for e in (e for e in entries if isinstance(e, str)):
            src = base / e
            if src.is_dir():
                found = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
            elif src.suffix == ".txt" and src.is_file():
                found = [base / ln.strip() for ln in read_text(src, "a YOLO image list").splitlines() if ln.strip()]
            else:
                found = []
            for p in found:
                out[p] = s if p not in out else None
    if out:
        return list(out.items())
    if (base / "images").is_dir():
        return [(p, None) for p in sorted((base / "images").rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    return []


def _yolo_label_path(img: Path) -> Path:
    parts = list(img.parts)
    i = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if i is None:
        return img.with_suffix(".txt")
    return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")


def read_yolo(path: Path) -> DetDataset:
    """YOLO: data.yaml (read with PyYAML's safe_load: no Python objects from
    the file), images/ and labels/ (one `class xc yc w h` line per box,
    normalised to the image; a polygon line counts as its extents). An
    image without a label file is a background image."""
    import yaml

    f = path if path.is_file() else _yolo_yaml(path)
    base = path if path.is_dir() else path.parent
    cfg: dict = {}
    if f is not None:
        try:
            cfg = yaml.safe_load(read_text(f, "a YOLO data.yaml", 1 << 20)) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{f}: not readable YAML ({brief(str(e))})", "repair the data.yaml") from None
        except RecursionError:
            raise DataError(f"{f}: YAML nested too deeply to read", "write data.yaml as `names: [...]`, "
                            "`train: images/train`, `val: images/val`") from None
        if not isinstance(cfg, dict):
            raise DataError(f"{f}: not a YOLO data.yaml (a mapping with names, train, val)",
                            "write it as `names: [...]`, `train: images/train`, `val: images/val`")
        if cfg.get("path"):
            base = (f.parent / str(cfg["path"])).resolve()
        classes = _yolo_names(cfg, f)
    else:
        classes = _class_file(base)
        if classes is None:
            raise DataError(f"{base}: a YOLO folder without data.yaml or classes.txt",
                            "add data.yaml with `names: [...]` listing the classes in id order")
    ds = DetDataset(classes=classes, images=[], format="yolo", root=base)
    for img, split in _yolo_image_lists(cfg, base):
        item = _yolo_image(img, ds)
        if item is not None:
            item.split = split
            ds.images.append(item)
    return ds


def _yolo_image(img: Path, ds: DetDataset) -> DetImage | None:
    if not img.is_file():
        ds.problems.append(Problem(str(img), "missing_image", "listed in data.yaml but missing; add it or unlist it"))
        return None
    lab = _yolo_label_path(img)
    size = _size_or_problem(img, str(lab), ds)
    if size is None:
        return None
    w, h = size
    boxes, labels = [], []
    try:
        lines = read_text(lab, "a YOLO label file").splitlines() if lab.is_file() else []
    except DataError as e:
        ds.problems.append(Problem(str(lab), "unreadable", f"{e.message.removeprefix(f'{lab}: ')}; {e.fix} "
                                   "(the image is left out)"))
        return None
    if _too_many(ds, str(lab), sum(1 for ln in lines if ln.strip()), "it"):
        return None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            vals = [float(v) for v in line.split()]
        except ValueError:
            vals = []
        if len(vals) < 5 or not _finite(vals) or vals[0] != int(vals[0]) or (len(vals) > 5 and len(vals) % 2 == 0):
            ds.problems.append(Problem(f"{lab}:{n}", "bad_coords", f"{brief(line)} is not `class xc yc w h` (or a "
                                       "polygon) in finite numbers; correct the line (the box is left out)"))
            continue
        c = int(vals[0])
        if not 0 <= c < len(ds.classes):
            ds.problems.append(Problem(f"{lab}:{n}", "unknown_label", f"class {c} is outside names (0-"
                                       f"{len(ds.classes) - 1}); add the class to data.yaml or correct the id"))
            continue
        if len(vals) == 5:
            xc, yc, bw, bh = vals[1:]
            x1, y1, x2, y2 = (xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h
        else:
            xs, ys = np.asarray(vals[1::2]) * w, np.asarray(vals[2::2]) * h
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
        boxes.append([round_px(x1), round_px(y1), round_px(x2), round_px(y2)])
        labels.append(c)
    return DetImage(path=img, width=w, height=h, boxes=_box_array(boxes), labels=np.asarray(labels, np.int64),
                    source=str(lab))


# --- instance-id masks ------------------------------------------------------------

def read_masks(root: Path, class_name: str | None = None) -> DetDataset:
    """Images beside per-image instance-id PNGs (0 background, k the k-th
    object), as Penn-Fudan's PNGImages/ + PedMasks/. One class, named by
    classes.txt when present. Each box is its mask's extent: x2 is one past
    the last column that holds the id. Instance k is box k-1, so the ids must
    run 1..N. A mask is sized from its header and decoded only when it
    matches its image, so a PNG claiming huge dimensions costs nothing."""
    img_dir, mask_dir = next((root / i, root / m) for i, m in MASK_LAYOUTS if (root / i).is_dir() and (root / m).is_dir())
    classes = _class_file(root) or [class_name or "object"]
    ds = DetDataset(classes=classes[:1], images=[], format="masks", root=root)
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        mp = next((q for q in (mask_dir / f"{img.stem}_mask.png", mask_dir / f"{img.stem}.png") if q.is_file()), None)
        if mp is None:
            ds.problems.append(Problem(str(img), "missing_image", f"no mask {img.stem}_mask.png in {mask_dir}; "
                                       "add it (the image is left out)"))
            continue
        size = _size_or_problem(img, str(img), ds)
        m = _read_mask(mp, size, ds) if size is not None else None
        if m is None:
            continue
        ids = np.unique(m[m > 0])
        if _too_many(ds, str(mp), len(ids), "it") or not _ids_in_order(mp, ids, ds):
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
        return _box_array([])
    ids, inv = np.unique(mask[ys, xs], return_inverse=True)
    lo, hi = np.full((len(ids), 2), np.iinfo(np.int64).max), np.full((len(ids), 2), -1)
    pts = np.stack([xs, ys], 1)
    np.minimum.at(lo, inv, pts)
    np.maximum.at(hi, inv, pts)
    return np.concatenate([lo, hi + 1], 1).astype(np.float64)


# --- writers ----------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _rel(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(p.resolve())


def to_coco(ds: DetDataset, base: Path | None = None) -> dict:
    """The COCO instances dict: category ids 1..K in class order, image ids
    1..N; file_name relative to `base` (the JSON's folder) when given."""
    images, anns = [], []
    for i, im in enumerate(ds.images, 1):
        images.append({"id": i, "file_name": _rel(im.path, base) if base else str(im.path),
                       "width": int(im.width), "height": int(im.height)})
        for b, c in zip(im.boxes.tolist(), im.labels.tolist()):
            w, h = round_px(b[2] - b[0]), round_px(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], w, h],
                         "area": round_px(max(w, 0) * max(h, 0)), "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(ds.classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def write_coco(ds: DetDataset, out: str | Path) -> Path:
    """Write `ds` as one COCO JSON at `out` (atomically); images stay where they are."""
    out = Path(out)
    _atomic_write(out, json.dumps(to_coco(ds, out.parent)))
    return out


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)  # a hard link costs no space; across file systems, copy
    except OSError:
        shutil.copy2(src, dst)


def write_yolo(ds: DetDataset, out: str | Path) -> Path:
    """Write `ds` as a YOLO folder: images/[split/], labels/[split/], data.yaml.
    Images are hard-linked (or copied), never moved."""
    import yaml

    out = Path(out)
    seen: dict[str, int] = {}
    for im in ds.images:
        name = im.path.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # same file name from two folders
            name = f"{im.path.stem}_{seen[name]}{im.path.suffix}"
        sub = Path(im.split) if im.split else Path()
        _place(im.path, out / "images" / sub / name)
        lines = []
        for (x1, y1, x2, y2), c in zip(im.boxes.tolist(), im.labels.tolist()):
            w, h = im.width, im.height
            lines.append(f"{c} {(x1 + x2) / 2 / w!r} {(y1 + y2) / 2 / h!r} {(x2 - x1) / w!r} {(y2 - y1) / h!r}")
        _atomic_write(out / "labels" / sub / (Path(name).stem + ".txt"), "".join(ln + "\n" for ln in lines))
    # No "path" key: Ultralytics resolves a relative one against the working
    # directory, not the yaml's folder; without it both read from the folder.
    cfg: dict = {"names": {i: n for i, n in enumerate(ds.classes)}}
    splits = sorted({im.split for im in ds.images if im.split})
    # No split given: train and val both name images/ (what Ultralytics needs);
    # read back, an image listed under two splits has none.
    cfg.update({s: f"images/{s}" for s in splits} if splits else {"train": "images", "val": "images"})
    _atomic_write(out / "data.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out
