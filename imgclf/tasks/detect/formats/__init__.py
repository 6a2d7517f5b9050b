"""Reading detection labels: which format a folder holds, and the reader for it.

One module per format (voc, coco, yolo, instance_masks), all into the one
form of data.py (`DetDataset`); write.py writes it back out as COCO or YOLO.

Readers never stop at the first bad file: each problem (unreadable XML, NaN
coordinates, a label outside the class list, a missing image) is recorded in
`DetDataset.problems` with the file and the fix, the box or file is left out,
and `strict=True` (the default) raises one `DataError` listing them.
`imgclf.tasks.detect.check` reads with `strict=False` to report them. Hostile
files cost bounded memory and time (bounds.py).
"""

from __future__ import annotations

from pathlib import Path

from imgclf.errors import DataError
from imgclf.tasks.detect.data import FORMATS, DetDataset
from imgclf.tasks.detect.formats.bounds import MAX_JSON_BYTES
from imgclf.tasks.detect.formats.coco import coco_jsons, read_coco
from imgclf.tasks.detect.formats.instance_masks import MASK_LAYOUTS, read_masks
from imgclf.tasks.detect.formats.voc import read_voc
from imgclf.tasks.detect.formats.yolo import read_yolo, yolo_yaml


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
    if yolo_yaml(p) is not None or ((p / "images").is_dir() and (p / "labels").is_dir()):
        return "yolo"
    if any((p / i).is_dir() and (p / m).is_dir() for i, m in MASK_LAYOUTS):
        return "masks"
    if coco_jsons(p):
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
