"""A DetDataset written back out: one COCO JSON, or a YOLO folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from imgclf.io import atomic_write_text
from imgclf.tasks.detect.data import DetDataset, round_px


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
