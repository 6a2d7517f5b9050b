"""`imgclf check --fix`: the cleaned split as a CSV beside the data (one image
per group of copies, conflicting labels left for a person, the user's files
never touched), refused when it would leave out more than --max-drop."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data import near_dup as nd
from imgclf.data.datasets import Splits
from imgclf.data.file_stats import FileStats
from imgclf.errors import DataError
from imgclf.io import atomic_write_text

# --fix leaves out at most this share of the images unless forced: more is
# likelier a detector gone wrong on this data than that much real copying.
MAX_DROP = 0.05


def label_name(classes: list[str], y) -> str:
    """A label as the CSV writes it: multi-label sets joined by ';'."""
    return ";".join(classes[i] for i in y) if isinstance(y, tuple) else classes[y]


SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


def clean_entries(entries: list[tuple], groups: list[list[tuple]], pixels: dict, given: bool
                  ) -> tuple[list[tuple], dict]:
    """The entries (split, path, label) to keep, and why each other one goes.
    Per group of copies (exact or near, merged where they overlap): one label ->
    keep one image, from the earliest split (train, then val, then test: a leak
    leaves the evaluation side) and with the most pixels; several labels ->
    keep none (which label is right is for a person to say)."""

    index = {e[1]: k for k, e in enumerate(entries)}
    i = [index[g[0][1]] for g in groups for _ in g[1:]]
    j = [index[e[1]] for g in groups for e in g[1:]]
    why, n_conflicts = {}, 0
    for comp in nd.groups(len(entries), np.array(i, np.int64), np.array(j, np.int64)):
        members = [entries[k] for k in comp]
        if len({y for _, _, y in members}) > 1:
            n_conflicts += 1
            for m in members:
                why[m[1]] = f"conflict {n_conflicts}"
            continue
        keep = min(members, key=lambda m: (SPLIT_RANK[m[0]], -pixels[m[1]], m[1]))
        for m in members:
            if m is not keep:
                why[m[1]] = f"leak of {keep[1]}" if given and m[0] != keep[0] else f"copy of {keep[1]}"
    return [e for e in entries if e[1] not in why], why


def default_fix_path(data: str | Path) -> Path:
    """Next to the data: PHOTOS_clean.csv beside the folder PHOTOS, LABELS_clean.csv beside LABELS.csv."""
    d = Path(data).expanduser().resolve()
    return d.with_name(f"{d.stem if d.is_file() else d.name}_clean.csv")


def write_clean_csv(s: Splits, data: str | Path, out: str | Path, groups: list[list[tuple]], bad: list[dict],
                    all_entries: list[tuple], stats: FileStats, max_drop: float = MAX_DROP,
                    force: bool = False) -> dict:
    """Write the cleaned split as a `path,label[,split]` CSV (paths relative to
    its folder; the split column when the data came with one), atomically.
    Rows with conflicting labels are written commented out at the end for a
    person to decide. The user's images and files are never touched. Returns
    what it drops, and why, either way; writes nothing (refused) when that is
    more than `max_drop` of the readable images, unless `force`."""
    import os


    out = Path(out).expanduser().resolve()
    if Path(data).is_file() and out == Path(data).resolve():
        raise DataError(f"--fix-out {out} is the input CSV; imgclf never overwrites your files",
                        "name another file, or leave --fix-out out to write next to the data")
    entries = [all_entries[k] for k in np.flatnonzero(stats.ok)]
    members = {rel for g in groups for _, rel, _ in g}  # only copies need their pixel counts
    pixels = {all_entries[k][1]: int(stats.size[k].prod()) for k in np.flatnonzero(stats.ok)
              if all_entries[k][1] in members}
    kept, why = clean_entries(entries, groups, pixels, s.given)
    counts = {k: sum(v.startswith(k) for v in why.values()) for k in ("copy", "leak", "conflict")}
    share = len(why) / max(1, len(entries))
    result = {"path": str(out), "kept": len(kept), "of": len(entries) + len(bad), **counts, "unreadable": len(bad),
              "dropped": [{"path": rel, "why": v} for rel, v in why.items()], "share": share, "max_drop": max_drop,
              "refused": None}
    if share > max_drop and not force:
        return {**result, "refused": f"it would leave out {len(why)} of {len(entries)} readable images "
                                     f"({share:.1%}), more than --max-drop {max_drop:.0%}"}
    cells = lambda n, rel, y: [os.path.relpath(s.path(rel), out.parent), label_name(s.classes, y), n][:3 if s.given else 2]  # noqa: E731
    lines = [f"# imgclf check --fix of {s.root}: {len(kept)} of {len(entries) + len(bad)} images kept; dropped "
             f"{counts['copy']} copies within a split, {counts['leak']} copies of training images from val/test "
             f"(leakage), {counts['conflict']} with conflicting labels (at the end), {len(bad)} unreadable",
             _csv_line(["path", "labels" if s.multi_label else "label"] + (["split"] if s.given else []))]
    lines += [_csv_line(cells(*e)) for e in kept]
    conflicts = sorted((e for e in entries if why.get(e[1], "").startswith("conflict")),
                       key=lambda e: int(why[e[1]].split()[1]))
    if conflicts:
        lines.append("# The same photo with different labels: left out. To keep one, remove the '#' of its right row.")
    for k, e in enumerate(conflicts):
        if k == 0 or why[e[1]] != why[conflicts[k - 1][1]]:
            lines.append(f"# {why[e[1]]}:")
        lines.append("#" + _csv_line(cells(*e)))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return result


def _csv_line(cells: list[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


FIX_LISTED = 50  # dropped files listed by the text report (--json lists all)


def format_fix(f: dict) -> str:
    L = [f"--fix leaves out {len(f['dropped'])} image(s) ({f['share']:.1%} of the readable ones):"]
    L += [f"  {d['path']}: {d['why']}" for d in f["dropped"][:FIX_LISTED]]
    if len(f["dropped"]) > FIX_LISTED:
        L.append(f"  ... and {len(f['dropped']) - FIX_LISTED} more (--json lists them all)")
    if f["refused"]:
        return "\n".join(L + [f"cleaned split NOT written: {f['refused']}. Look at the list above; if it is "
                               f"right, rerun with --force (or raise --max-drop)"])
    return "\n".join(L + [
        f"cleaned split: {f['path']}\n  kept {f['kept']} of {f['of']} images: dropped {f['copy']} copies within "
        f"a split, {f['leak']} copies of training images from val/test, {f['conflict']} with conflicting labels "
        f"(commented out at the end of the file), {f['unreadable']} unreadable\n"
        f"  train on it: imgclf train {f['path']}"])
