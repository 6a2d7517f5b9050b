"""`imgclf check DATA`: what is in a dataset and what is wrong with it,
before any compute is spent: counts, formats, sizes, unreadable files, exact
and near duplicates (within a class, across classes, across splits),
imbalance, and outliers worth a look (odd format or colour mode, near-blank
placeholders). `--fix` writes a cleaned split as a CSV (never touching the
user's files).

Each file's statistics come from file_stats.py; --fix is check_fix.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data import near_dup as nd
from imgclf.data.check_fix import MAX_DROP, format_fix, label_name, write_clean_csv
from imgclf.data.datasets import Splits, discover
from imgclf.data.file_stats import FileStats, scan_files
from imgclf.errors import ConfigError

# "A graphic or placeholder": one colour covers at least FLAT_MIN of the
# thumbnail and the rest has under GRAPHIC_MAX_VARIETY distinct colours per
# pixel (hymenoptera's imageNotFound.gif: 0.17 at full size, 0.23 at 32 px;
# photos on a white background: 0.68-0.80; docs/benchmarks.md, "Near-duplicates").
FLAT_MIN = 0.5
GRAPHIC_MAX_VARIETY = 0.4

KINDS = (("across_splits", "leakage across splits"), ("across_classes", "different labels"),
         ("within_class", "within a class"))


def check_dataset(data: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  progress: bool = True, near_dup: str = "auto", fix: str | Path | None = None,
                  embed_pairs=None, follow_links: bool = False, max_drop: float = MAX_DROP,
                  force: bool = False) -> dict:
    """Everything `imgclf check` reports, as one dict (`--json` prints it).
    near_dup: auto (embed where embed_pairs says its features are cached,
    else hash) | hash | embed (hash or embedding) | off (see
    data/near_dup.py); fix: write a cleaned split to this CSV path, unless it
    would leave out more than `max_drop` of the images and not `force`.
    embed_pairs: the embedding detector `embed` needs (data_engine/near_dup.py:
    EmbeddingPairs; its check_dataset passes it)."""
    if near_dup == "embed" and embed_pairs is None:
        raise ConfigError("near_dup='embed' needs an embedding detector (embed_pairs)",
                          "call imgclf.data_engine.near_dup.check_dataset, which passes one, or use near_dup='hash'")
    s: Splits = discover(data, val_fraction, test_fraction, seed, follow_links=follow_links)
    given = s.given
    entries = [(name, rel, y) for name in ("train", "val", "test") for rel, y in getattr(s, name)]
    bad, stats = _scan(s, entries, progress, near_dup != "off")
    counts = {c: {n: 0 for n in ("train", "val", "test")} for c in s.classes}
    for k in np.flatnonzero(stats.ok):
        name, _, y = entries[k]
        for i in (y if isinstance(y, tuple) else (y,)):  # multi-label: an image counts for each of its labels
            counts[s.classes[i]][name] += 1
    totals = {c: sum(v.values()) for c, v in counts.items()}
    exact = _exact_groups(entries, stats)
    dups = _kinds(exact, s.classes, given)
    near = _near_duplicates(s, entries, stats, near_dup, embed_pairs, progress)
    copies = exact + near.pop("_groups")
    sizes = stats.size[stats.ok] if stats.ok.any() else np.zeros((1, 2), np.int32)
    return {
        "root": s.root, "layout": s.layout, "classes": s.classes, "counts": counts, "totals": totals,
        "images": int(stats.ok.sum()), "formats": stats.counts("format"), "modes": stats.counts("mode"),
        "size_range": {"width": [int(sizes[:, 0].min()), int(sizes[:, 0].max())],
                       "height": [int(sizes[:, 1].min()), int(sizes[:, 1].max())]},
        "bad_files": bad, "duplicates": dups, "near_duplicates": near, "outliers": _outliers(entries, stats),
        "warnings": _warnings(totals, dups, near, s.notes, counts), "notes": s.notes, "split_given": given,
        "fix": write_clean_csv(s, data, fix, copies, bad, entries, stats, max_drop, force) if fix else None,
    }


def _scan(s: Splits, entries: list, progress: bool, hashes: bool) -> tuple[list[dict], FileStats]:
    bad, stats = scan_files((s.path(rel) for _, rel, _ in entries), len(entries), progress, hashes)
    return [{"path": entries[k][1], "reason": r} for k, r in bad], stats


def _exact_groups(entries: list, stats: FileStats) -> list[list[tuple]]:
    """Groups of byte-identical readable files, from the content-hash column."""
    idx = np.flatnonzero(stats.ok)
    _, inv, counts = np.unique(stats.content[idx], return_inverse=True, return_counts=True)
    groups: dict[int, list] = {}
    for k, g in zip(idx, inv):
        if counts[g] > 1:
            groups.setdefault(int(g), []).append(entries[k])
    return list(groups.values())


def _kinds(groups: list[list[tuple]], classes: list[str], given: bool) -> dict:
    """Groups of (split, path, label) by what they break: a group with several
    labels is a conflict, one in several given splits is leakage (both at
    once is listed under both), any other is a copy within a class."""
    dups = {"within_class": [], "across_classes": [], "across_splits": []}
    for group in groups:
        entry = {"files": [rel for _, rel, _ in group], "labels": [label_name(classes, y) for _, _, y in group]}
        if given:  # a split imgclf would make is no property of the data
            entry["splits"] = [n for n, _, _ in group]
        multi_label = len({y for _, _, y in group}) > 1
        multi_split = given and len({n for n, _, _ in group}) > 1
        if multi_label:
            dups["across_classes"].append(entry)
        if multi_split:
            dups["across_splits"].append(entry)
        if not multi_label and not multi_split:
            dups["within_class"].append(entry)
    return dups


def _near_duplicates(s: Splits, entries: list, stats: FileStats, method: str, embed_pairs,
                     progress: bool) -> dict:
    """Groups of near-identical images, other than groups of identical files
    (listed as exact duplicates); "_groups" (all of them) is for --fix.
    Every pair in a group is proven by two signals (data/near_dup.py), and
    groups are stars of such pairs, never chains."""
    if method == "off":
        return {"method": "off", **_kinds([], s.classes, s.given), "_groups": []}
    where = np.flatnonzero(stats.ok & (stats.size.min(1) >= nd.MIN_SIDE))
    too_small = int(stats.ok.sum() - len(where))
    if method == "auto":  # the embedding where its features are already cached, else hash and pixels
        method = "embed" if embed_pairs is not None and embed_pairs.cached(stats.content[where]) else "hash"
    i, j, _ = nd.verified_hash_pairs(stats.phash[where], stats.thumb[where])
    desc = (f"pHash of each image, its mirror and 90% crops within {nd.HASH_MAX_DISTANCE} of 64 bits, "
            f"verified by 32 px grey pixels correlating >= {nd.PIXEL_MIN_CORR}")
    if method == "embed":  # the backbone may not read every file the header check passed
        kept, ei, ej, _ = embed_pairs(s.root, [entries[k][1:] for k in where], progress)
        ei, ej = kept[ei], kept[ej]
        ok = nd.pixel_similarity(stats.thumb[where], ei, ej) >= embed_pairs.min_corr
        i, j = np.concatenate([i, ei[ok]]), np.concatenate([j, ej[ok]])
        desc += f"; or {embed_pairs.criterion}"
    comps = nd.star_groups(len(where), i, j)
    found = [[entries[where[k]] for k in g] for g in comps]
    near = [f for f, g in zip(found, comps) if len({stats.content[where[k]] for k in g}) > 1]
    # With no given split, copies that imgclf's own split would put on both sides leak just the same.
    straddling = 0 if s.given else sum(len({n for n, _, _ in g}) > 1 for g in found)
    return {"method": method, "criterion": desc, "groups": len(near), **_kinds(near, s.classes, s.given),
            "straddling": straddling, "too_small": too_small, "_groups": found}


def _outliers(entries: list, stats: FileStats) -> list[dict]:
    ok = stats.ok
    n = max(1, int(ok.sum()))
    fmts, modes = stats.counts("format"), stats.counts("mode")
    top_f, top_m = max(fmts, key=fmts.get, default=""), max(modes, key=modes.get, default="")
    # "Differs from nearly all others": a format or mode held by under 2% of the files.
    rare_f = {stats.names["format"].index(f) for f, c in fmts.items() if c / n < 0.02 and len(fmts) > 1}
    rare_m = {stats.names["mode"].index(m) for m, c in modes.items() if c / n < 0.02 and len(modes) > 1}
    graphic = (stats.flat >= FLAT_MIN) & (stats.variety < GRAPHIC_MAX_VARIETY)
    flagged = ok & (np.isin(stats.fmt, list(rare_f)) | np.isin(stats.mode, list(rare_m)) | (stats.std < 8) |
                    graphic | (stats.frames > 1))
    outliers = []
    for k in np.flatnonzero(flagged):
        fmt, mode = stats.names["format"][stats.fmt[k]], stats.names["mode"][stats.mode[k]]
        why = []
        if stats.fmt[k] in rare_f:
            why.append(f"format {fmt} ({fmts[fmt]} of {n} files; most are {top_f})")
        if stats.mode[k] in rare_m:
            why.append(f"colour mode {mode} ({modes[mode]} of {n}; most are {top_m})")
        if stats.std[k] < 8:
            why.append(f"near-blank (pixel std {stats.std[k]:.1f})")
        elif graphic[k]:
            why.append(f"one colour covering {stats.flat[k]:.0%} and few others ({stats.colours[k]} in all): "
                       "a graphic or placeholder rather than a photo?")
        if stats.frames[k] > 1:
            why.append(f"animated ({stats.frames[k]} frames; only the first is used)")
        if why:
            outliers.append({"path": entries[k][1], "why": why})
    return outliers


def _warnings(totals: dict, dups: dict, near: dict, notes: list[str], counts: dict | None = None) -> list[str]:
    big, small = max(totals.values() or [0]), min(totals.values() or [0])
    warnings = [f"class {c!r} has no readable training images: `imgclf train` refuses it (the model could never "
                f"predict it); add images, or remove the class" for c, n in (counts or {}).items() if not n["train"]]
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
    if near["across_splits"]:
        warnings.append(f"{len(near['across_splits'])} group(s) of near-identical photos span splits: test/val "
                        f"figures are inflated (leakage); `imgclf check --fix` writes a split without them")
    if near.get("straddling"):
        warnings.append(f"{near['straddling']} group(s) of copies would fall on both sides of the split imgclf makes "
                        f"(leakage); `imgclf check --fix` keeps one of each")
    if near["across_classes"]:
        warnings.append(f"{len(near['across_classes'])} group(s) of near-identical photos carry different labels")
    # Rows the CSV reader repaired or skipped, and classes a given split lacks.
    warnings += [n for n in notes if "row skipped" in n or "kept line" in n or "have no images in" in n
                 or "cannot be read" in n]
    warnings += [n.removeprefix("warning: ") for n in notes if n.startswith("warning: ")]
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
    for key, word, sep in (("duplicates", "identical files", "  ==  "), ("near_duplicates", "near-duplicates", "  ~  ")):
        tagged = _tagged(r[key])
        if tagged:
            L += ["", f"{word} ({len(tagged)} group(s)):"]
            L += [f"  [{', '.join(tags)}] " + sep.join(_member(g, i) for i in range(len(g["files"])))
                  for g, tags in tagged[:20]]
            if len(tagged) > 20:
                L.append(f"  ... and {len(tagged) - 20} more")
    near = r["near_duplicates"]
    L += ["", f"near-duplicates searched by: {near.get('criterion', 'nothing (--near-dup off)')}"]
    if near.get("too_small"):
        L.append(f"  ({near['too_small']} image(s) under {nd.MIN_SIDE} px on a side were not compared: "
                 f"too small to tell a copy from a look-alike)")
    if r.get("fix"):
        L += ["", format_fix(r["fix"])]
    if r["outliers"]:
        L += ["", f"worth a look ({len(r['outliers'])}):"]
        L += [f"  {o['path']}: {'; '.join(o['why'])}" for o in r["outliers"][:50]]
    if r["warnings"]:
        L += [""] + [f"warning: {w}" for w in r["warnings"]]
    if not (r["bad_files"] or r["outliers"] or r["warnings"] or any(r["duplicates"].values())
            or r["near_duplicates"].get("groups")):
        L += ["", "no problems found"]
    return "\n".join(L)


def _tagged(d: dict) -> list[tuple[dict, list[str]]]:
    """Each group once, with every kind it is (leakage first)."""
    out: dict[tuple, tuple[dict, list[str]]] = {}
    for kind, tag in KINDS:
        for g in d.get(kind, []):
            out.setdefault(tuple(g["files"]), (g, []))[1].append(tag)
    return list(out.values())


def _member(g: dict, i: int) -> str:
    """A group member as listed: its path, with its label or split where those differ."""
    extra = [v[i] for v in (g["labels"], g.get("splits", [])) if len(set(v)) > 1]
    return g["files"][i] + (f" ({', '.join(extra)})" if extra else "")
