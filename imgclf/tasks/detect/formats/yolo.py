"""YOLO: data.yaml (PyYAML's safe_load), images/ and labels/."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.errors import DataError
from imgclf.tasks.detect.data import IMAGE_EXTS, SPLITS, DetDataset, DetImage, Problem, box_array, round_px
from imgclf.tasks.detect.formats.bounds import brief, class_file, finite, read_text, size_or_problem, too_many


def yolo_yaml(folder: Path) -> Path | None:
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

    f = path if path.is_file() else yolo_yaml(path)
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
        classes = class_file(base)
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
    size = size_or_problem(img, str(lab), ds)
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
    if too_many(ds, str(lab), sum(1 for ln in lines if ln.strip()), "it"):
        return None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            vals = [float(v) for v in line.split()]
        except ValueError:
            vals = []
        if len(vals) < 5 or not finite(vals) or vals[0] != int(vals[0]) or (len(vals) > 5 and len(vals) % 2 == 0):
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
    return DetImage(path=img, width=w, height=h, boxes=box_array(boxes), labels=np.asarray(labels, np.int64),
                    source=str(lab))
