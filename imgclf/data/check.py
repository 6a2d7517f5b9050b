"""`imgclf check DATA`: what is in a dataset and what is wrong with it,
before any compute is spent: counts, formats, sizes, unreadable files, exact
duplicates (within a class, across classes, across splits), imbalance, and
outliers worth a look (odd format or colour mode, near-blank placeholders)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from imgclf.data.datasets import Splits, discover, file_hash
from imgclf.data.images import BadImage, open_image, sniff


def _image_stats(path: Path) -> dict:
    """Format, mode, size and how 'photo-like' the pixels are, from a small
    thumbnail (decoding at reduced scale keeps this fast on big JPEGs)."""
    from PIL import Image

    fmt, mode, size = sniff(path)  # BadImage for non-images, with the reason
    img = open_image(path, draft_size=64)
    with Image.open(path) as raw:
        frames = getattr(raw, "n_frames", 1)
    img.thumbnail((64, 64))
    a = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
    _, counts = np.unique(a, axis=0, return_counts=True)
    # A graphic has few distinct colours and a flat area covering most of it
    # (hymenoptera's imageNotFound.gif: 161 colours, one covering 77%). Photos
    # on a white background can be flat too, but have hundreds of colours
    # from noise and shading (the flattest ant photo there: 529, 81%).
    return {"format": fmt, "mode": mode, "size": size, "frames": frames, "std": float(a.std()),
            "flat": float(counts.max() / len(a)), "colours": int(len(counts))}


def check_dataset(data: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True) -> dict:
    """Everything `imgclf check` reports, as one dict (`--json` prints it)."""
    s: Splits = discover(data, val_fraction, test_fraction, seed)
    given = s.layout == "split-folders"
    entries = [(name, rel, y) for name in ("train", "val", "test") for rel, y in getattr(s, name)]
    bad, stats, by_hash = _scan(s, entries, progress)
    counts = {c: {n: 0 for n in ("train", "val", "test")} for c in s.classes}
    for name, rel, y in entries:
        if rel in stats:
            for i in (y if isinstance(y, tuple) else (y,)):  # multi-label: an image counts for each of its labels
                counts[s.classes[i]][name] += 1
    totals = {c: sum(v.values()) for c, v in counts.items()}
    dups = _duplicates(by_hash, s.classes, given)
    widths = [st["size"][0] for st in stats.values()] or [0]
    heights = [st["size"][1] for st in stats.values()] or [0]
    return {
        "root": s.root, "layout": s.layout, "classes": s.classes, "counts": counts, "totals": totals,
        "images": len(stats), "formats": dict(Counter(st["format"] for st in stats.values())),
        "modes": dict(Counter(st["mode"] for st in stats.values())),
        "size_range": {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)]},
        "bad_files": bad, "duplicates": dups, "outliers": _outliers(stats),
        "warnings": _warnings(totals, dups, s.notes), "notes": s.notes, "split_given": given,
    }


def _scan(s: Splits, entries: list, progress: bool) -> tuple[list[dict], dict, dict]:
    """Per readable file its statistics and content hash; the unreadable ones with why."""
    from imgclf.progress import Progress

    bad, stats, by_hash = [], {}, defaultdict(list)
    with Progress(total=len(entries), desc="checking", unit="img", enabled=progress) as bar:
        for name, rel, y in entries:
            p = s.path(rel)
            try:
                stats[rel] = _image_stats(p)
                by_hash[file_hash(p)].append((name, rel, y))
            except BadImage as e:
                bad.append({"path": rel, "reason": e.reason})
            except Exception as e:  # anything PIL throws is a bad file, not a crash of check
                bad.append({"path": rel, "reason": f"unreadable: {e}"})
            bar.update()
    return bad, stats, by_hash


def _duplicates(by_hash: dict, classes: list[str], given: bool) -> dict:
    dups = {"within_class": [], "across_classes": [], "across_splits": []}
    for group in by_hash.values():
        if len(group) < 2:
            continue
        files = [rel for _, rel, _ in group]
        multi_label = len({y for _, _, y in group}) > 1
        multi_split = given and len({n for n, _, _ in group}) > 1
        if multi_label:
            dups["across_classes"].append({"files": files, "labels": [
                ";".join(classes[i] for i in y) if isinstance(y, tuple) else classes[y] for _, _, y in group]})
        if multi_split:
            dups["across_splits"].append({"files": files, "splits": [n for n, _, _ in group]})
        if not multi_label and not multi_split:
            dups["within_class"].append({"files": files})
    return dups


def _outliers(stats: dict) -> list[dict]:
    fmts = Counter(st["format"] for st in stats.values())
    modes = Counter(st["mode"] for st in stats.values())
    n = max(1, len(stats))
    outliers = []
    for rel, st in stats.items():
        why = []
        # "Differs from nearly all others": a format or mode held by under 2% of the files.
        if fmts[st["format"]] / n < 0.02 and len(fmts) > 1:
            why.append(f"format {st['format']} ({fmts[st['format']]} of {n} files; most are {fmts.most_common(1)[0][0]})")
        if modes[st["mode"]] / n < 0.02 and len(modes) > 1:
            why.append(f"colour mode {st['mode']} ({modes[st['mode']]} of {n}; most are {modes.most_common(1)[0][0]})")
        if st["std"] < 8:
            why.append(f"near-blank (pixel std {st['std']:.1f})")
        elif st["flat"] >= 0.5 and st["colours"] < 300:
            why.append(f"few colours ({st['colours']}), one covering {st['flat']:.0%}: "
                       "a graphic or placeholder rather than a photo?")
        if st["frames"] > 1:
            why.append(f"animated ({st['frames']} frames; only the first is used)")
        if why:
            outliers.append({"path": rel, "why": why})
    return outliers


def _warnings(totals: dict, dups: dict, notes: list[str]) -> list[str]:
    big, small = max(totals.values() or [0]), min(totals.values() or [0])
    warnings = []
    if small and big / small >= 1.5:
        warnings.append(f"class imbalance: largest class has {big / small:.1f}x the images of the smallest; "
                        f"consider --class-weights auto or --balanced-sampler")
    for c, t in totals.items():
        if t < 10:
            warnings.append(f"class {c!r} has only {t} readable images; aim for at least 50")
    if dups["across_splits"]:
        warnings.append(f"{len(dups['across_splits'])} file(s) appear in more than one split: test/val figures are inflated (leakage)")
    if dups["across_classes"]:
        warnings.append(f"{len(dups['across_classes'])} identical file(s) carry different labels")
    # Rows the CSV reader repaired or skipped, and classes a given split lacks.
    warnings += [n for n in notes if "row skipped" in n or "kept line" in n or "have no images in" in n]
    return warnings


def format_report(r: dict) -> str:
    L = [f"{r['root']} ({r['layout']}): {r['images']} readable images, {len(r['classes'])} classes", ""]
    cols = ["train", "val", "test"]
    w = max(8, *(len(c) for c in r["classes"]))
    head = "given split" if r["split_given"] else "split imgclf would make"
    L.append(f"{'class':<{w}} " + " ".join(f"{c:>7}" for c in cols) + f" {'total':>7}   ({head})")
    for c in r["classes"]:
        L.append(f"{c:<{w}} " + " ".join(f"{r['counts'][c][k]:>7}" for k in cols) + f" {r['totals'][c]:>7}")
    L += ["", "formats: " + ", ".join(f"{k} {v}" for k, v in sorted(r["formats"].items(), key=lambda kv: -kv[1])),
          "modes:   " + ", ".join(f"{k} {v}" for k, v in sorted(r["modes"].items(), key=lambda kv: -kv[1])),
          f"sizes:   width {r['size_range']['width'][0]}-{r['size_range']['width'][1]}, "
          f"height {r['size_range']['height'][0]}-{r['size_range']['height'][1]} px"]
    for note in r["notes"]:
        if note not in r["warnings"]:
            L.append(f"note: {note}")
    if r["bad_files"]:
        L += ["", f"unreadable files ({len(r['bad_files'])}; training skips them):"]
        L += [f"  {b['path']}: {b['reason']}" for b in r["bad_files"]]
    for kind, title in (("across_splits", "in more than one split (leakage)"),
                        ("across_classes", "identical files with different labels"),
                        ("within_class", "exact duplicates within a class")):
        d = r["duplicates"][kind]
        if d:
            L += ["", f"duplicates {title} ({len(d)}):"]
            L += ["  " + "  ==  ".join(g["files"]) for g in d[:20]]
            if len(d) > 20:
                L.append(f"  ... and {len(d) - 20} more")
    if r["outliers"]:
        L += ["", f"worth a look ({len(r['outliers'])}):"]
        L += [f"  {o['path']}: {'; '.join(o['why'])}" for o in r["outliers"][:50]]
    if r["warnings"]:
        L += [""] + [f"warning: {w}" for w in r["warnings"]]
    if not (r["bad_files"] or r["outliers"] or r["warnings"] or any(r["duplicates"].values())):
        L += ["", "no problems found"]
    return "\n".join(L)
