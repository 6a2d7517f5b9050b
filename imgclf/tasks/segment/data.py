"""Semantic segmentation labels: one class id per pixel, read from

    folders  images/ + masks/ (the same file stems), classes.txt
    camvid   the SegNet/CamVid layout: train/ + trainannot/, val/ + valannot/,
             test/ + testannot/, classes.txt
    coco     a COCO instances JSON whose polygons or RLE are rasterised
             (only with --task segment: COCO with masks means instances, detect)

into one in-memory form (`SegDataset`): per image its path, its mask's path
(or its COCO annotations) and the split the data gives.

classes.txt: line k names class id k. A mask is a PNG label map (mode L, P or
I;16) whose pixel values are class ids; a palette PNG (mode P) is read by its
indices, never by its colours, since the indices are the ids (the palette is
only how viewers show them). Colour masks (RGB) need the colours: write each
line of classes.txt as `R G B name` (the order of CamVid's label_colors.txt);
each colour then maps to its line's id, and a colour in no line is a value
not in the class list. The ignore value (default 255; CamVid's void is 11)
marks pixels that are neither trained on nor scored.

This module imports no torch: the task registry sniffs data with it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import MAX_PIXELS
from imgclf.errors import DataError

FORMATS = ("folders", "camvid", "coco")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG mask has blurred ids
SPLITS = ("train", "val", "test")
IGNORE_INDEX = 255
# COCO files larger than this are refused before json.load (about 10x the file in memory).
MAX_JSON_BYTES = 1 << 30


@dataclass
class Problem:
    file: str
    kind: str  # unreadable | missing_mask | missing_image | size_mismatch | unknown_value
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


@dataclass
class SegItem:
    image: Path
    mask: Path | None  # None for COCO (rasterised from `anns`)
    split: str | None = None  # train/val/test when the data says so
    anns: list | None = None  # COCO: [(class id, segmentation, iscrowd)]
    size: tuple[int, int] | None = None  # COCO: (width, height) as the JSON says


@dataclass
class SegDataset:
    classes: list[str]
    items: list[SegItem]
    format: str
    root: Path
    ignore_index: int = IGNORE_INDEX
    colours: dict[tuple[int, int, int], int] | None = None  # RGB masks: colour -> class id
    problems: list[Problem] = field(default_factory=list)
    remap: np.ndarray | None = None  # (256,) uint8: stored id -> another class list's id (evaluate on other data)

    def raise_problems(self) -> None:
        if not self.problems:
            return
        shown = "\n  ".join(str(p) for p in self.problems[:10])
        more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
        raise DataError(f"{self.root}: {len(self.problems)} problem(s) in the masks:\n  {shown}{more}",
                        "run `imgclf check DATA --task segment` for the whole list, and correct those files")


# --- which layout is it -------------------------------------------------------------

def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file, for the files of `folder` with those extensions (not recursive)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts and p.is_file()}


def _camvid_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    return [(s, root / s, root / f"{s}annot") for s in SPLITS if (root / s).is_dir() and (root / f"{s}annot").is_dir()]


def segment_format(path: str | Path) -> str | None:
    """"camvid" or "folders" when `path` holds semantic masks in one of those
    layouts, else None. COCO is never claimed here (its masks are instances,
    detect's); `--task segment` reads it."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _camvid_pairs(p):
        return "camvid"
    if (p / "images").is_dir() and (p / "masks").is_dir():
        return "folders"
    return None


# --- classes -------------------------------------------------------------------------

def read_classes(root: Path) -> tuple[list[str], dict[tuple[int, int, int], int] | None]:
    """classes.txt: names by id, and the colour of each when lines read `R G B name`."""
    f = root / "classes.txt"
    if not f.is_file():
        raise DataError(f"{root}: no classes.txt", "write classes.txt, one class name per line: line k names id k "
                        "(or `R G B name` per line for colour masks)")
    names, colours = [], {}
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 4 and all(x.isdigit() for x in parts[:3]):
            rgb = tuple(int(x) for x in parts[:3])
            if max(rgb) > 255:
                raise DataError(f"{f}:{n}: colour {rgb} is not 8-bit RGB", "write R G B as 0-255 values")
            colours[rgb] = len(names)
            parts = parts[3:]
        names.append(" ".join(parts))
    if not names:
        raise DataError(f"{f} lists no classes", "write one class name per line")
    if colours and len(colours) != len(names):
        raise DataError(f"{f}: some lines give a colour (R G B name) and some do not, or two share a colour",
                        "give every class its own colour, or none")
    return names, colours or None


# --- readers ---------------------------------------------------------------------------

def read_dataset(path: str | Path, format: str | None = None, ignore_index: int = IGNORE_INDEX,
                 strict: bool = True) -> SegDataset:
    """Read a segmentation dataset. strict: raise one DataError listing every
    pairing problem (a mask without an image, an image without a mask)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    fmt = format or (("coco" if p.suffix.lower() == ".json" else None) if p.is_file() else segment_format(p))
    if fmt is None:
        raise DataError(f"{p}: no segmentation masks found", "expected images/ + masks/ with classes.txt, the CamVid "
                        "layout (train/ + trainannot/, val/ + valannot/, classes.txt), or a COCO .json with --task segment")
    readers = {"folders": read_folders, "camvid": read_camvid, "coco": read_coco}
    if fmt not in readers:
        raise DataError(f"format={fmt!r} is unknown", f"choose one of {', '.join(FORMATS)}")
    ds = readers[fmt](p)
    ds.ignore_index = ignore_index
    if strict:
        ds.raise_problems()
    return ds


def _pair(images: Path, masks: Path, split: str | None, ds: SegDataset) -> None:
    ims, mks = _files(images, IMAGE_EXTS), _files(masks, MASK_EXTS)
    for stem, im in ims.items():
        if stem in mks:
            ds.items.append(SegItem(im, mks[stem], split))
        else:
            ds.problems.append(Problem(str(im), "missing_mask", f"no mask {masks.name}/{stem}.png: the image is left out"))
    for stem, mk in mks.items():
        if stem not in ims:
            ds.problems.append(Problem(str(mk), "missing_image", f"no image {images.name}/{stem}.*: the mask is left out"))


def read_folders(root: Path) -> SegDataset:
    """images/ + masks/ (or images/<split>/ + masks/<split>/ for a given split)."""
    classes, colours = read_classes(root)
    ds = SegDataset(classes, [], "folders", root, colours=colours)
    subs = [s for s in SPLITS if (root / "images" / s).is_dir()]
    for s in subs or [None]:
        _pair(root / "images" / s if s else root / "images", root / "masks" / s if s else root / "masks", s, ds)
    return ds


def read_camvid(root: Path) -> SegDataset:
    classes, colours = read_classes(root)
    ds = SegDataset(classes, [], "camvid", root, colours=colours)
    for split, images, masks in _camvid_pairs(root):
        _pair(images, masks, split, ds)
    return ds


def read_coco(path: Path, max_json_bytes: int = MAX_JSON_BYTES) -> SegDataset:
    """A COCO instances JSON (or a folder of them, one per split: a file name
    holding train/val/test gives its split). Classes: "background" (id 0,
    every pixel no object covers) then the categories by id; crowd regions
    are ignored, and a later annotation paints over an earlier one."""
    files = [path] if path.is_file() else sorted((path / "annotations").glob("*.json")) or sorted(path.glob("*.json"))
    if not files:
        raise DataError(f"{path}: no COCO .json found", "pass the instances .json (or its folder)")
    ds = SegDataset([], [], "coco", path if path.is_dir() else path.parent)
    for f in files:
        if f.stat().st_size > max_json_bytes:
            raise DataError(f"{f} is {f.stat().st_size >> 20} MiB, over the {max_json_bytes >> 20} MiB limit",
                            "split it into smaller files")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            cats = sorted(d["categories"], key=lambda c: c["id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{f}: not a COCO instances file ({type(e).__name__}: {e})",
                            "pass a JSON with images, annotations and categories") from None
        names = ["background"] + [c["name"] for c in cats]
        if ds.classes and ds.classes != names:
            raise DataError(f"{f}: its categories differ from {files[0].name}'s", "use one category list in every file")
        ds.classes = names
        _coco_items(f, d, {c["id"]: k + 1 for k, c in enumerate(cats)}, ds)
    return ds


def _coco_items(f: Path, d: dict, cat_index: dict, ds: SegDataset) -> None:
    split = next((s for s in SPLITS if s in f.stem.lower()), None)
    anns: dict = {}
    for a in d.get("annotations", []):
        if a.get("category_id") not in cat_index or not a.get("segmentation"):
            continue
        anns.setdefault(a["image_id"], []).append((cat_index[a["category_id"]], a["segmentation"], a.get("iscrowd", 0)))
    for im in d.get("images", []):
        p = next((q for q in (f.parent / im["file_name"], f.parent.parent / "images" / im["file_name"],
                              f.parent / "images" / im["file_name"]) if q.is_file()), None)
        if p is None:
            ds.problems.append(Problem(str(f), "missing_image", f"image {im['file_name']!r} not found beside the JSON "
                                                                 "or in images/: its annotations are left out"))
            continue
        ds.items.append(SegItem(p, None, split, anns.get(im["id"], []), (int(im["width"]), int(im["height"]))))


# --- masks -------------------------------------------------------------------------

def decode_mask(pil: Image.Image, colours: dict | None = None, unknown: int = IGNORE_INDEX) -> np.ndarray:
    """A PIL mask as an (H, W) uint8 array of class ids. Label maps (L, P,
    I;16, I) are their values; RGB masks go through `colours` (colour -> id),
    a colour outside it becoming `unknown`."""
    if pil.mode in ("RGB", "RGBA"):
        if not colours:
            raise DataError(f"{getattr(pil, 'filename', 'a mask')}: an RGB colour mask, and classes.txt gives no colours",
                            "write each line of classes.txt as `R G B name`, or store masks as label maps (mode L or P)")
        rgb = np.asarray(pil.convert("RGB"), np.uint32)
        key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        lut_keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.uint32)
        lut_vals = np.array(list(colours.values()), np.uint8)
        order = np.argsort(lut_keys)
        pos = np.clip(np.searchsorted(lut_keys[order], key), 0, len(order) - 1)
        hit = lut_keys[order][pos] == key
        return np.where(hit, lut_vals[order][pos], np.uint8(unknown)).astype(np.uint8)
    a = np.asarray(pil)
    if a.ndim != 2:
        raise DataError(f"{getattr(pil, 'filename', 'a mask')}: mode {pil.mode} is not a label map",
                        "store masks as one-channel PNGs (mode L or P) of class ids")
    if a.size and int(a.max()) > 255:
        raise DataError(f"{getattr(pil, 'filename', 'a mask')}: value {int(a.max())} is over 255",
                        "imgclf's masks hold at most 255 classes plus the ignore value; renumber the classes")
    return a.astype(np.uint8)


def rasterise(item: SegItem, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A COCO image's annotations painted into an (H, W) label map (0 where no object is)."""
    from faster_coco_eval.core import mask as mask_utils  # deferred: only COCO data needs it

    w, h = item.size
    out = np.zeros((h, w), np.uint8)
    for cls, seg, crowd in item.anns or []:
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):  # compressed RLE, as COCO files store it
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        else:  # polygons, or RLE with a list of counts: the mask API encodes them
            rle = mask_utils.frPyObjects(seg, h, w)
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        out[mask_utils.decode(rle).astype(bool)] = ignore_index if crowd else cls
    return out


def load_mask(ds: SegDataset, item: SegItem) -> np.ndarray:
    """The item's (H, W) uint8 label map."""
    if item.mask is None:
        m = rasterise(item, ds.ignore_index)
    else:
        try:
            with Image.open(item.mask) as pil:
                if pil.width * pil.height > MAX_PIXELS:  # a hostile or broken PNG: refuse before decoding it
                    raise DataError(f"{item.mask}: {pil.width}x{pil.height} px is over the {MAX_PIXELS:,}-pixel "
                                    "limit for a mask", "save the mask at its image's size, or remove the pair")
                pil.load()
                m = decode_mask(pil, ds.colours, ds.ignore_index)
        except (OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{item.mask}: cannot be read as a mask ({e})", "replace or remove it") from None
    return m if ds.remap is None else ds.remap[m]


def remap_classes(ds: SegDataset, classes: list[str]) -> SegDataset:
    """ds read in another class list's ids, matched by name (its other values kept)."""
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise DataError(f"{ds.root}: class(es) {', '.join(unknown)} are not among the model's ({', '.join(classes)})",
                        "score data with the model's classes, or train a model on these")
    lut = np.arange(256, dtype=np.uint8)
    lut[: len(ds.classes)] = [classes.index(c) for c in ds.classes]
    if ds.ignore_index < len(classes):
        raise DataError(f"{ds.root}: the ignore value {ds.ignore_index} is a class id of the model",
                        "give this data an ignore value outside the model's class ids")
    ds.remap, ds.classes = lut, list(classes)
    return ds


def unknown_values(mask: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """Values of `mask` that name no class and are not the ignore value."""
    v = np.unique(mask)
    return [int(x) for x in v if x >= num_classes and x != ignore_index]


# --- split ----------------------------------------------------------------------------

def split_dataset(ds: SegDataset, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, list[int]]:
    """Item indices per split. A split the data gives is kept; a missing val
    (and, when the data gives neither val nor test, test) is carved from the
    rest at random, reproducibly by seed (not stratified: every image holds
    several classes, and road scenes hold most of them)."""
    given = {s: [i for i, it in enumerate(ds.items) if it.split == s] for s in SPLITS}
    pool = given["train"] + [i for i, it in enumerate(ds.items) if it.split not in SPLITS]
    want_val = 0.0 if given["val"] else val_fraction
    want_test = 0.0 if given["val"] or given["test"] else test_fraction
    order = sorted(pool)
    random.Random(seed).shuffle(order)
    n = len(ds.items)
    n_val = min(len(order), round(want_val * n))
    n_test = min(len(order) - n_val, round(want_test * n))
    out = {"train": sorted(order[n_val + n_test:]), "val": sorted(given["val"] + order[:n_val]),
           "test": sorted(given["test"] + order[n_val:n_val + n_test])}
    if not out["train"]:
        raise DataError(f"{ds.root}: no training images left after the split", "add images, or lower --val-fraction")
    return out
