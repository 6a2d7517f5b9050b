"""Identical and near-identical images among a task's files, grouped and
tagged with their splits: what `imgclf check` reports for detection and
segmentation data (classification's check, data/check.py, adds embeddings,
pixel verification and labels of its own).

One decode per image through data/file_stats.py's `scan_files`; a pair is the
same photo when its bytes are identical, or when its perceptual hashes (of
each image, its mirror and 90% crops) are close and its pixels correlate,
as classification's hash search proves pairs (data/near_dup.py). Groups are
stars of such pairs, never chains: frames of one video a second apart would
otherwise chain a whole sequence into one group. A group whose files sit in
more than one split is leakage: val/test figures are inflated by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data import near_dup as nd
from imgclf.data.file_stats import scan_files
from imgclf.errors import ConfigError

CRITERION = (f"identical bytes, or pHash of each image, its mirror and 90% crops within {nd.HASH_MAX_DISTANCE} of "
             f"64 bits, verified by 32 px grey pixels correlating >= {nd.PIXEL_MIN_CORR}")


@dataclass
class CopyGroup:
    """Images that are the same photo: byte-identical files, or pixels within
    the perceptual-hash distance of each other (or of a mirror)."""
    files: list[str]
    splits: list[str]  # each file's split (the given one, or the one the run would make)
    identical: bool  # every file byte-identical

    @property
    def leak(self) -> bool:
        return len(set(self.splits)) > 1


def hash_or_off(near_dup: str, what: str) -> str:
    """--near-dup for data that is not a classifier's: auto means hash
    (embeddings are classification's), embed is refused with the fix."""
    if near_dup == "auto":
        return "hash"
    if near_dup not in ("hash", "off"):
        raise ConfigError(f"--near-dup {near_dup}: {what} are checked with hash or off",
                          "use --near-dup hash (or off); embed is for classification data")
    return near_dup


def copy_groups(paths: Sequence[Path], names: Sequence[str], splits: Sequence[str], progress: bool = False
                ) -> tuple[list[tuple[int, str]], list[CopyGroup], list[CopyGroup]]:
    """The files `paths` (shown as `names`, in `splits`) scanned once:
    (unreadable as (index, why), groups across splits, groups within one)."""
    bad, stats = scan_files(iter(paths), len(paths), progress)
    ok = np.flatnonzero(stats.ok)
    big = np.flatnonzero(stats.size[ok].min(1) >= nd.MIN_SIDE)  # smaller images are not compared by pixels
    i, j, _ = nd.verified_hash_pairs(stats.phash[ok][big], stats.thumb[ok][big])
    i, j = big[i], big[j]
    _, first, same = np.unique(stats.content[ok], return_index=True, return_inverse=True)
    twins = np.flatnonzero(first[same] != np.arange(len(ok)))  # byte-identical to an earlier file
    i, j = np.concatenate([i, first[same][twins]]), np.concatenate([j, twins])
    leaks, copies = [], []
    for comp in nd.star_groups(len(ok), i, j):
        k = ok[comp]
        g = CopyGroup(files=[names[x] for x in k], splits=[splits[x] for x in k],
                      identical=len({stats.content[x] for x in k}) == 1)
        (leaks if g.leak else copies).append(g)
    return bad, leaks, copies


def copies_lines(split_given: bool, split_counts: dict[str, int], leaks: list[CopyGroup], copies: list[CopyGroup],
                 criterion: str) -> list[str]:
    """The report's lines: the split, each group with its files and their splits, how they were searched."""
    which = "given split" if split_given else "split imgclf would make"
    lines = [f"split ({which}): " + ", ".join(f"{k} {v}" for k, v in split_counts.items())]
    for word, groups in (("leakage across splits", leaks), ("copies within a split", copies)):
        if groups:
            lines.append(f"{word} ({len(groups)} group(s)):")
            lines += [f"  [{'identical' if g.identical else 'near-identical'}] "
                      + "  ~  ".join(f"{f} ({s})" for f, s in zip(g.files, g.splits)) for g in groups[:20]]
            if len(groups) > 20:
                lines.append(f"  ... and {len(groups) - 20} more")
    lines.append(f"near-duplicates searched by: {criterion or 'nothing (--near-dup off)'}")
    return lines


def copies_warnings(split_given: bool, leaks: list[CopyGroup], copies: list[CopyGroup]) -> list[str]:
    which = "given split" if split_given else "split imgclf would make"
    out = []
    if leaks:
        out.append(f"{len(leaks)} group(s) of identical or near-identical images span the {which} (leakage: "
                   f"val/test figures are inflated), e.g. {' ~ '.join(leaks[0].files[:3])}; remove the copies, "
                   "or keep each group in one split")
    if copies:
        out.append(f"{len(copies)} group(s) of identical or near-identical images within a split, e.g. "
                   f"{' ~ '.join(copies[0].files[:3])}: they count twice; remove the copies if unintended")
    return out
