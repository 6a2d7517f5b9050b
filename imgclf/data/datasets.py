"""From a folder (or CSV) to reproducible, stratified splits and a DataLoader.

Layouts, detected in this order:
  * a CSV file of `path,label` rows (paths relative to the CSV's folder), or
    `path,labels` with several labels per image separated by ";" (an empty
    value: none of the labels): multi-label, where an item's label is a tuple;
    either with an optional third column `split` (train|val|test: used as
    given, as `imgclf check --fix` writes it);
  * DATA/train|val|validation|test/<class>/*  (used as given);
  * DATA/<class>/*  (split for you: stratified, seeded, default 80/10/10).
Splits hold paths relative to the data root, so a run can be evaluated on a
copy of the data elsewhere (`imgclf evaluate RUN DATA`).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data import UNKNOWN
from imgclf.data.images import BadImage, sniff
from imgclf.errors import DataError
from imgclf.log import get_logger

log = get_logger(__name__)

SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


@dataclass
class Splits:
    root: str  # absolute data root; split paths are relative to it
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    layout: str  # "split-folders" | "class-folders" | "csv" | "csv-split" (a CSV with a split column)
    notes: list[str] = field(default_factory=list)  # things a person should know (e.g. no test split)
    seed: int = 0
    multi_label: bool = False  # items' labels are tuples of class indices (possibly empty)
    run_id: str = ""  # the training run that recorded this split (runs.RunDir.check_one_run)

    def to_dict(self) -> dict:
        y_out = list if self.multi_label else int
        return {
            "root": self.root, "layout": self.layout, "classes": self.classes, "seed": self.seed,
            "notes": self.notes, "multi_label": self.multi_label, "run_id": self.run_id,
            **{k: [[p, y_out(y)] for p, y in getattr(self, k)] for k in ("train", "val", "test")},
        }

    @classmethod
    def from_dict(cls, d: dict, root: str | None = None) -> Splits:
        ml = bool(d.get("multi_label"))
        y_in = tuple if ml else int
        return cls(
            root=root or d["root"], classes=list(d["classes"]), layout=d["layout"], notes=list(d.get("notes", [])),
            seed=d.get("seed", 0), multi_label=ml, run_id=d.get("run_id") or "",
            **{k: [(p, y_in(y)) for p, y in d[k]] for k in ("train", "val", "test")},
        )

    @property
    def given(self) -> bool:
        """The split came with the data (folders or a CSV's split column), not from imgclf."""
        return self.layout in ("split-folders", "csv-split")

    @property
    def held_out(self) -> str:
        """Where headline metrics come from: test if the data has one, else val."""
        return "test" if self.test else "val"

    def eval_split(self, name: str | None = None) -> tuple[str, list[tuple[str, int]]]:
        """The split to evaluate on: `name`, else the held-out one."""
        name = name or self.held_out
        if name not in ("train", "val", "test"):
            raise DataError(f"--split {name!r} is unknown", "use test, val or train")
        if not getattr(self, name):
            raise DataError(f"split {name!r} is empty for this data", "choose another with --split")
        return name, getattr(self, name)

    def path(self, rel: str) -> Path:
        return Path(self.root) / rel


class Listing:
    """Walks class folders the way a split should see them, and remembers
    what it left out and why (for the split's notes): hidden folders,
    symbolic links that lead outside the data root (unless follow_links),
    linked sub-folders, folders it may not read."""

    def __init__(self, root: Path, follow_links: bool = False):
        self.root, self.follow = root, follow_links
        self.left: dict[str, list[str]] = {}  # why -> paths (relative to root)

    def skip(self, why: str, path: Path) -> None:
        self.left.setdefault(why, []).append(self._rel(path))

    def _rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def outside(self, p: Path) -> bool:
        """A link that leads outside the data root (and links are not followed)."""
        if self.follow or not p.is_symlink():
            return False
        return not Path(os.path.realpath(p)).is_relative_to(os.path.realpath(self.root))

    def class_dirs(self, folder: Path) -> list[str]:
        out = []
        for d in sorted(folder.iterdir(), key=lambda d: d.name):
            if not d.is_dir():
                continue
            if d.name.startswith("."):
                self.skip(HIDDEN, d)
            elif self.outside(d):
                self.skip(LINK_OUT, d)
            else:
                out.append(d.name)
        return out

    def files(self, folder: Path) -> list[Path]:
        """Every non-hidden file under `folder`, sorted (the same split on every machine)."""
        out, seen = [], set()
        walk = os.walk(folder, followlinks=self.follow, onerror=lambda e: self.skip(NO_ACCESS, Path(e.filename)))
        for dirpath, dirnames, filenames in walk:
            here = Path(dirpath)
            real = os.path.realpath(here)
            if real in seen:  # a link loop (--follow-links)
                dirnames[:] = []
                continue
            seen.add(real)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    self.skip(HIDDEN, here / d)
                elif (here / d).is_symlink() and not self.follow:
                    self.skip(LINK_OUT if self.outside(here / d) else LINK_DIR, here / d)
                else:
                    keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if f.startswith("."):
                    continue
                (self.skip(LINK_OUT, here / f) if self.outside(here / f) else out.append(here / f))
        return sorted(out)

    def notes(self) -> list[str]:
        out = []
        for why, paths in self.left.items():
            more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
            out.append(f"{len(paths)} {why} skipped: {', '.join(paths[:5])}{more}")
        return out


HIDDEN = "hidden folder(s) (the name starts with '.')"
LINK_OUT = "symbolic link(s) leading outside the data folder (--follow-links follows them)"
LINK_DIR = "linked sub-folder(s) inside a class (--follow-links follows them)"
NO_ACCESS = "folder(s) that cannot be read (permission denied: check its permissions)"


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _labelled(folder: Path, listing: Listing, classes: list[str]) -> list[tuple[str, int]]:
    out = []
    for i, c in enumerate(classes):
        if (folder / c).is_dir():
            out += [(str(p.relative_to(listing.root)), i) for p in listing.files(folder / c)]
    return out


def stratified_split(items: list[tuple[str, int]], fractions: tuple[float, ...], seed: int) -> list[list]:
    """Split each class separately (so every part keeps the class balance) by
    shuffling with `seed`. Returns one list per fraction plus the remainder.
    Hand-written rather than sklearn's train_test_split: that refuses classes
    with fewer than 2 items, and we need the same answer for any number of parts."""
    parts: list[list] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[int, list] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    for y in sorted(by_class):
        group = sorted(by_class[y])
        random.Random(f"{seed}-{y}").shuffle(group)
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(len(group) * f))
            n = min(n, max(0, len(group) - start - 1))  # always leave one for training
            parts[k] += group[start:start + n]
            start += n
        parts[-1] += group[start:]
    return [sorted(p) for p in parts]


def has_label(y, i: int) -> bool:
    """Whether an item's label (an int, or a tuple for multi-label) includes class i."""
    return i in y if isinstance(y, tuple) else y == i


def multi_hot(labels, num_classes: int):
    """Tuples of class indices -> float32 (N, C) 0/1 targets."""
    import numpy as np

    out = np.zeros((len(labels), num_classes), np.float32)
    for r, y in enumerate(labels):
        out[r, list(y)] = 1
    return out


def multilabel_split(items: list[tuple[str, tuple]], num_classes: int, fractions: tuple[float, ...],
                     seed: int) -> list[list]:
    """Like stratified_split for multi-label items: iterative stratification
    (Sechidis et al., 2011, via the iterative-stratification package) keeps
    each label's share as even as possible across the parts."""
    import numpy as np
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    rest, parts = sorted(items), []
    left = 1.0
    for f in fractions:
        n = int(round(len(items) * f))
        if n == 0 or len(rest) - n < 1:
            parts.append([])
            continue
        y = multi_hot([t for _, t in rest], num_classes)
        y = np.c_[y, y.sum(1) == 0]  # "no label" is stratified like a label
        split = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n, random_state=seed % 2**32)
        keep, take = next(split.split(np.zeros(len(rest)), y))
        parts.append(sorted(rest[i] for i in take))
        rest = [rest[i] for i in keep]
        left -= f
    return parts + [sorted(rest)]


def discover(data: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
             multi_label: bool = False, follow_links: bool = False) -> Splits:
    """The data's classes and splits. follow_links: also list files and
    folders reached through symbolic links that leave the data folder."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if data.is_file():
        _not_an_image(data)
        splits = _from_csv(data, val_fraction, test_fraction, seed, multi_label)
        splits.notes += class_name_notes(splits.classes)
        return splits
    if multi_label:
        raise DataError(f"{data}: --multi-label needs a CSV of path,labels (labels separated by ';')",
                        "list each image with its labels in a CSV and pass the CSV")
    root = data.resolve()
    train_dir = _find_split_dir(root, "train")
    notes: list[str] = []
    listing = Listing(root, follow_links)
    if train_dir is not None:
        val_dir, test_dir = _find_split_dir(root, "val"), _find_split_dir(root, "test")
        classes = listing.class_dirs(train_dir)
        if len(classes) < 2:
            raise DataError(f"{train_dir}: found {len(classes)} class folder(s) {classes}; a classifier needs at least 2",
                            f"put each class's images in {train_dir}/<class>/")
        train = _labelled(train_dir, listing, classes)
        val = _labelled(val_dir, listing, classes) if val_dir else []
        test = _labelled(test_dir, listing, classes) if test_dir else []
        for d in (val_dir, test_dir):
            extra = set(Listing(root, follow_links).class_dirs(d)) - set(classes) if d else set()
            if extra:
                raise DataError(f"{d}: classes {sorted(extra)} are not in {train_dir}; every split needs the same class folders")
        if not val:
            val, train = stratified_split(train, (val_fraction,), seed)
            notes.append(f"no validation folder: {len(val)} images of train/ were held out for validation")
        if not test:
            notes.append(f"no test folder: evaluating on {val_dir.name if val_dir else 'the held-out validation images'}")
        notes += _missing_classes(classes, {"val": val, "test": test}) + listing.notes() + class_name_notes(classes)
        return Splits(str(root), classes, train, val, test, "split-folders", notes, seed)
    classes = listing.class_dirs(root)
    if len(classes) < 2:
        raise DataError(
            f"{root}: found {len(classes)} class folder(s); expected DATA/<class>/<images> with at least 2 classes, "
            f"or DATA/train/<class>/..., or a CSV file of path,label")
    items = _labelled(root, listing, classes)
    val, test, train = stratified_split(items, (val_fraction, test_fraction), seed)
    return Splits(str(root), classes, train, val, test, "class-folders",
                  notes + listing.notes() + class_name_notes(classes), seed)


def _not_an_image(path: Path) -> None:
    """`imgclf train photo.gif`: say what DATA is, rather than call the image a CSV that is not UTF-8."""
    try:
        fmt = sniff(path)[0]
    except BadImage:
        return
    raise DataError(f"{path} is a {fmt} image, not a data folder or a CSV of labels",
                    "give the folder of class folders (DATA/<class>/<images>) or a CSV of path,label; "
                    "to classify one image: imgclf predict RUN IMAGE")


def class_name_notes(classes: list[str]) -> list[str]:
    """Warnings about class names that look alike or mean something else:
    Unicode twins (NFC and NFD spellings of "café" are two folders, one look),
    leading or trailing spaces, and the label of a rejected input."""
    import unicodedata


    notes, seen = [], {}
    for c in classes:
        key = unicodedata.normalize("NFC", c)
        if key in seen:
            notes.append(f"warning: classes {seen[key]!r} and {c!r} look the same but are spelled with different "
                         f"Unicode characters (NFC / NFD): merge them into one folder or label")
        seen.setdefault(key, c)
        if c != c.strip():
            notes.append(f"warning: class {c!r} has leading or trailing spaces: rename it (they are easy to miss "
                         f"and hard to type)")
    if UNKNOWN in classes:
        notes.append(f"warning: a class is named {UNKNOWN!r}, the answer for rejected inputs (--reject): rename it, "
                     f"or answers cannot tell the two apart")
    return notes


def _from_csv(path: Path, val_fraction: float, test_fraction: float, seed: int, multi_label: bool = False) -> Splits:
    root = path.parent.resolve()
    items, notes, header, splits_given = read_label_csv(path, keep_empty=multi_label)
    items, missing = [(p, lab) for p, lab in items if (root / p).exists()], [p for p, _ in items if not (root / p).exists()]
    notes += [f"{path.name}: {p} does not exist (relative to {root}); row skipped" for p in missing[:20]]
    if len(missing) > 20:
        notes.append(f"{path.name}: {len(missing) - 20} more rows name files that do not exist; skipped")
    if multi_label or header == "labels" or any(";" in lab for _, lab in items):
        return _multilabel_from_csv(path, root, items, notes, val_fraction, test_fraction, seed, splits_given)
    classes = sorted({lab for _, lab in items})
    if len(classes) < 2:
        raise DataError(f"{path}: needs at least 2 distinct labels, found {classes}",
                        "label every row with its class (path,label)")
    idx = {c: i for i, c in enumerate(classes)}
    if splits_given:
        parts = {k: [(p, idx[lab]) for p, lab in items if splits_given[p] == k] for k in ("train", "val", "test")}
        if not parts["train"]:
            raise DataError(f"{path}: no row has split 'train'", "give some rows split train, or drop the split column")
        notes += _missing_classes(classes, {"val": parts["val"], "test": parts["test"]})
        return Splits(str(root), classes, parts["train"], parts["val"], parts["test"], "csv-split", notes, seed)
    val, test, train = stratified_split([(p, idx[lab]) for p, lab in items], (val_fraction, test_fraction), seed)
    return Splits(str(root), classes, train, val, test, "csv", notes, seed)


def _multilabel_from_csv(path: Path, root: Path, items, notes: list[str], val_fraction: float, test_fraction: float,
                         seed: int, splits_given: dict[str, str]) -> Splits:
    rows = []
    for rel, lab in items:
        labels, why = parse_labels(lab)
        if why:
            notes.append(f"{path.name}: {rel}: {why}; row skipped")
        else:
            rows.append((rel, labels))
    classes = sorted({c for _, labels in rows for c in labels})
    if len(classes) < 1 or len(rows) < 3:
        raise DataError(f"{path}: a multi-label CSV needs at least 1 label and 3 usable rows, found "
                        f"{len(classes)} label(s) in {len(rows)} row(s)", "give rows as path,label1;label2")
    idx = {c: i for i, c in enumerate(classes)}
    items = [(p, tuple(sorted(idx[c] for c in labels))) for p, labels in rows]
    if splits_given:
        parts = {k: [(p, y) for p, y in items if splits_given[p] == k] for k in ("train", "val", "test")}
        return Splits(str(root), classes, parts["train"], parts["val"], parts["test"], "csv-split", notes, seed,
                      multi_label=True)
    val, test, train = multilabel_split(items, len(classes), (val_fraction, test_fraction), seed)
    return Splits(str(root), classes, train, val, test, "csv", notes, seed, multi_label=True)


def parse_labels(value: str) -> tuple[list[str], str | None]:
    """'cat;ant' -> ['cat', 'ant']; '' -> [] (none of the labels). Stray spaces,
    empty or repeated labels are refused with the reason, not guessed at."""
    if value == "":
        return [], None
    parts = value.split(";")
    if any(p != p.strip() for p in parts):
        return [], f"labels {value!r} have stray spaces; write them as {';'.join(p.strip() for p in parts)!r}"
    if any(not p for p in parts):
        return [], f"labels {value!r} have an empty label between ';'; remove the extra ';'"
    if len(set(parts)) < len(parts):
        return [], f"labels {value!r} repeat a label; list each once"
    return parts, None


SPLIT_NAMES = {n: k for k, names in SPLIT_DIRS.items() for n in names}  # "validation" -> "val"


def _csv_rows(path: Path, text: str):
    """(line number, row) of a CSV's text; a row the csv module refuses (a
    field over its 131,072-character limit, a stray quote) names its line."""
    reader = csv.reader(text.splitlines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not a CSV row ({e})",
                            "give each row as path,label (a path is at most a few hundred characters)") from None
        yield reader.line_num, row


def read_label_csv(path: Path, keep_empty: bool = False) -> tuple[list[tuple[str, str]], list[str], str, dict[str, str]]:
    """(path, label) rows of a `path,label` (or `path,labels`) CSV, a note for
    every row that was repaired or skipped (blank paths, repeated rows, a path
    given two labels), and the header's second column name ("" without one).
    A blank label is kept as "" (none of the labels) under a `path,labels`
    header or with keep_empty (--multi-label); otherwise the row is skipped.
    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is removed. The fourth part:
    {path: split} when the header names a third column `split` (empty otherwise)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})",
                        "save the file as UTF-8 (Excel: Save As > CSV UTF-8)") from None
    rows, notes, seen, first, header_name, splits, has_split = [], [], {}, True, "", {}, False
    for i, row in _csv_rows(path, text):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        cols = [c.strip().lower() for c in row[:3]]
        header, first = first and len(cols) >= 2 and cols[0] == "path" and cols[1] in ("label", "labels"), False
        if header:
            header_name, has_split = cols[1], cols[2:] == ["split"]
            continue
        if len(row) < 2:
            raise DataError(f"{path}, line {i}: expected 'path,label', got {row!r}", "give every row a path and a label")
        rel, lab = row[0].strip(), row[1] if header_name == "labels" else row[1].strip()
        rel = str(Path(rel)) if rel else rel  # "./a.jpg" and "a.jpg" are one file
        if not rel or not (lab or keep_empty or header_name == "labels"):
            notes.append(f"{path.name} line {i}: empty {'path' if not rel else 'label'}; row skipped")
            continue
        if rel in seen:
            first, first_lab = seen[rel]
            what = f"repeats line {first}" if first_lab == lab else \
                f"labels {rel} {lab!r}, line {first} labels it {first_lab!r}"
            notes.append(f"{path.name} line {i}: {what}; kept line {first} only")
            continue
        if has_split:
            given = row[2].strip().lower() if len(row) > 2 else ""
            if given not in SPLIT_NAMES:
                raise DataError(f"{path}, line {i}: split {given!r} for {rel}; the header names a split column",
                                "give every row train, val or test (or remove the split column)")
            splits[rel] = SPLIT_NAMES[given]
        seen[rel] = (i, lab)
        rows.append((rel, lab))  # absolute paths stay absolute (root / abs == abs)
    return rows, notes, header_name, splits


def _missing_classes(classes: list[str], parts: dict[str, list]) -> list[str]:
    """A note per given split that lacks a class: its metrics cannot cover it."""
    out = []
    for name, items in parts.items():
        missing = [c for i, c in enumerate(classes) if items and not any(has_label(y, i) for _, y in items)]
        if missing:
            out.append(f"class(es) {', '.join(missing)} have no images in {name}: {name} metrics cannot measure them")
    return out




def drop_files(splits: Splits, paths: set[str], names=("train", "val", "test")) -> None:
    if paths:
        for name in names:
            setattr(splits, name, [it for it in getattr(splits, name) if it[0] not in paths])
