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
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.errors import DataError
from imgclf.io import atomic_write_text

FORMATS = ("voc", "coco", "yolo", "masks")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
# A COCO instances file larger than this is refused before json.load (which
# holds about 10x the file size in memory); pass max_json_bytes to raise it.
MAX_JSON_BYTES = 1 << 30
# Folder pairs (images, instance-id masks) the mask reader knows.
MASK_LAYOUTS = (("PNGImages", "PedMasks"), ("images", "instance_masks"))


@dataclass
class Problem:
    file: str
    kind: str  # unreadable | bad_coords | unknown_label | missing_image | size_mismatch
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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.size


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
            return [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return None


# --- Pascal VOC -------------------------------------------------------------------

def _voc_splits(root: Path) -> dict[str, str]:
    out = {}
    for s in SPLITS:
        f = root / "ImageSets" / "Main" / f"{s}.txt"
        if f.is_file():
            out.update({ln.split()[0]: s for ln in f.read_text().splitlines() if ln.strip()})
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
            tree = parse(str(xml)).getroot()
        except (ParseError, DefusedXmlException, OSError) as e:
            ds.problems.append(Problem(str(xml), "unreadable", f"not readable XML ({type(e).__name__}: {e}); "
                                       "fix or delete the file (its image is left out)"))
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
        w, h = int(float(tree.findtext("size/width") or 0)), int(float(tree.findtext("size/height") or 0))
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        w, h = image_size(img)
    boxes, names = [], []
    for k, obj in enumerate(tree.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            c = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            c = [float("nan")] * 4
        if not _finite(c):
            ds.problems.append(Problem(str(xml), "bad_coords", f"object {k} ({name}) has a missing or "
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
                ds.problems.append(Problem(im.source, "unknown_label", f"object {i} is labelled {n!r}, not in the "
                                           f"class list {ds.classes}; add it to classes.txt or rename the object"))
        im.boxes, im.labels = im.boxes[keep], np.asarray([index[names[i]] for i in keep], np.int64)
        ds.images.append(im)


# --- COCO -------------------------------------------------------------------------

def _load_json(path: Path, max_bytes: int) -> dict:
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path}: {size / 1e6:.0f} MB is over the {max_bytes / 1e6:.0f} MB limit for a COCO file",
                        "split it into smaller files, or raise the limit (max_json_bytes) if it is genuine")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})", "repair or re-export the COCO file") from None
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


def _coco_classes(d: dict, f: Path, ds: DetDataset) -> dict:
    cats = sorted((c for c in d["categories"] if isinstance(c, dict) and "id" in c), key=lambda c: c["id"])
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
    for k, a in enumerate(d.get("annotations") or []):
        if not isinstance(a, dict) or a.get("iscrowd", 0):
            continue
        by_image.setdefault(a.get("image_id"), []).append((k, a))
    for im in d["images"]:
        p = _coco_image_path(str(im.get("file_name", "")), f)
        if p is None:
            ds.problems.append(Problem(str(f), "missing_image", f"image id {im.get('id')}: {im.get('file_name')!r} "
                                       f"is not beside {f.name} nor in images/; put it there"))
            continue
        w, h = int(im.get("width") or 0), int(im.get("height") or 0)
        if w <= 0 or h <= 0:
            w, h = image_size(p)
        boxes, labels = [], []
        for k, a in by_image.get(im.get("id"), []):
            bb = a.get("bbox")
            if not (isinstance(bb, list) and len(bb) == 4 and _finite(bb)):
                ds.problems.append(Problem(str(f), "bad_coords", f"annotation {a.get('id', k)}: bbox {bb!r} is not "
                                           "4 finite numbers [x, y, w, h]; correct it (the box is left out)"))
                continue
            if a.get("category_id") not in cat_index:
                ds.problems.append(Problem(str(f), "unknown_label", f"annotation {a.get('id', k)}: category_id "
                                           f"{a.get('category_id')!r} is not in 'categories'; add the category or "
                                           "correct the id"))
                continue
            x, y, bw, bh = (float(v) for v in bb)
            boxes.append([round_px(x), round_px(y), round_px(x + bw), round_px(y + bh)])
            labels.append(cat_index[a["category_id"]])
        ds.images.append(DetImage(path=p, width=w, height=h, boxes=_box_array(boxes),
                                  labels=np.asarray(labels, np.int64), split=split, source=str(f)))


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
            names = [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            names = None
    if not isinstance(names, list) or not names:
        raise DataError(f"{f}: no 'names' list of classes", "add `names: [class0, class1, ...]` to it")
    return [str(n) for n in names]


def _yolo_image_lists(cfg: dict, base: Path) -> list[tuple[Path, str | None]]:
    """(image, split) for every image the data.yaml's train/val/test name,
    or every image under images/ when it names none."""
    out: dict[Path, str | None] = {}
    for s in SPLITS:
        entries = cfg.get(s)
        for e in ([entries] if isinstance(entries, str) else entries or []):
            src = base / e
            if src.is_dir():
                found = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
            elif src.suffix == ".txt" and src.is_file():
                found = [base / ln.strip() for ln in src.read_text().splitlines() if ln.strip()]
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
            cfg = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{f}: not readable YAML ({e})", "repair the data.yaml") from None
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
    w, h = image_size(img)
    lab = _yolo_label_path(img)
    boxes, labels = [], []
    lines = lab.read_text(encoding="utf-8").splitlines() if lab.is_file() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            vals = [float(v) for v in line.split()]
        except ValueError:
            vals = []
        if len(vals) < 5 or not _finite(vals) or vals[0] != int(vals[0]) or (len(vals) > 5 and len(vals) % 2 == 0):
            ds.problems.append(Problem(f"{lab}:{n}", "bad_coords", "expected `class xc yc w h` (or a polygon) as "
                                       "finite numbers; correct the line (the box is left out)"))
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
    the last column that holds the id. Instance k is box k-1."""
    img_dir, mask_dir = next((root / i, root / m) for i, m in MASK_LAYOUTS if (root / i).is_dir() and (root / m).is_dir())
    classes = _class_file(root) or [class_name or "object"]
    ds = DetDataset(classes=classes[:1], images=[], format="masks", root=root)
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        mp = next((q for q in (mask_dir / f"{img.stem}_mask.png", mask_dir / f"{img.stem}.png") if q.is_file()), None)
        if mp is None:
            ds.problems.append(Problem(str(img), "missing_image", f"no mask {img.stem}_mask.png in {mask_dir}; "
                                       "add it (the image is left out)"))
            continue
        m = np.asarray(Image.open(mp))
        w, h = image_size(img)
        if m.shape[:2] != (h, w):
            ds.problems.append(Problem(str(mp), "size_mismatch", f"mask is {m.shape[1]}x{m.shape[0]}, its image "
                                       f"{w}x{h}; re-save the mask at the image's size"))
            continue
        ds.images.append(DetImage(path=img, width=w, height=h, boxes=mask_boxes(m),
                                  labels=np.zeros(len(np.unique(m[m > 0])), np.int64), mask_path=mp, source=str(mp)))
    return ds


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2 + 1, y2 + 1) of each nonzero id in an instance-id
    mask, in increasing id order."""
    out = []
    for k in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == k)
        out.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return _box_array(out)


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
    cfg: dict = {"path": ".", "names": {i: n for i, n in enumerate(ds.classes)}}
    splits = sorted({im.split for im in ds.images if im.split})
    # No split given: train and val both name images/ (what Ultralytics needs);
    # read back, an image listed under two splits has none.
    cfg.update({s: f"images/{s}" for s in splits} if splits else {"train": "images", "val": "images"})
    _atomic_write(out / "data.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return out
