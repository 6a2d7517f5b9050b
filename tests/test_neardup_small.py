"""`imgclf check` on small images (real photos downscaled to 32 px here):
planted copies found, distinct photos never paired or chained into groups,
`--fix` that refuses to drop more than its share without `--force`, and an
outlier rule that leaves ordinary small photos alone."""

import itertools
import random

import numpy as np
import pytest

from bench.bench_neardup import photos, shrink, write_copies
from imgclf.data import near_dup as nd
from imgclf.data.check import check_dataset

from .conftest import DATASETS, imgclf, need

ORIGINALS, DISTINCT = 6, 150
WHITE_ANT = "175998972.jpg"  # an ant on a white background: a photo, flagged as a graphic at 32 px before


def _sources() -> list:
    pool = photos(need(DATASETS / "hymenoptera") / "train") + photos(need(DATASETS / "cats_and_dogs_filtered") / "validation")
    pool = [p for p in pool if p.suffix.lower() != ".gif"]
    random.Random(0).shuffle(pool)
    return pool


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """DATA/{a,b}/: ORIGINALS 32 px photos, each with 6 modified copies (JPEG
    30, half size, 10% crop, brightness +-20%, mirror), and DISTINCT other
    32 px photos. Returns (DATA, {path: photo id})."""
    data = tmp_path_factory.mktemp("small") / "data"
    work = data.parent / "src"
    photo = {}
    for k, src in enumerate(_sources()[:ORIGINALS + DISTINCT]):
        cls = "ab"[k % 2]
        p = shrink(src, work / f"{src.stem}.png", 32)
        if k < ORIGINALS:
            for f in write_copies(p, data / cls, src.stem, seed=k):
                photo[f"{cls}/{f.name}"] = src.stem
        else:
            shrink(src, data / cls / f"{src.stem}.png", 32)
            photo[f"{cls}/{src.stem}.png"] = src.stem
    return data, photo


def _reported(r: dict) -> list[tuple[str, ...]]:
    return list({tuple(g["files"]) for kind in ("within_class", "across_classes", "across_splits")
                 for g in r["near_duplicates"][kind]})


def test_small_copies_found_and_distinct_small_photos_never_paired(small):
    """32 px: >= 95% of copy pairs found (crops and mirrors included), no
    group holding two different photos: the former 64-bit pHash at <= 12
    paired unrelated 32 px photos and chained them into groups."""
    data, photo = small
    r = check_dataset(data, progress=False, near_dup="hash")
    groups = _reported(r)
    pairs = {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}
    truth = {tuple(sorted(p)) for p in itertools.combinations(photo, 2) if photo[p[0]] == photo[p[1]]}
    assert len(pairs & truth) / len(truth) >= 0.95, (len(pairs & truth), len(truth))
    false = [g for g in groups if len({photo[f] for f in g}) > 1]
    assert not false, false
    assert all(len(g) <= 7 for g in groups)
    assert any("_crop10" in f for g in groups for f in g) and any("_mirror" in f for g in groups for f in g)


def test_groups_are_stars_of_verified_pairs_not_chains(tmp_path):
    """A chain of real crops, each 10% off the one before: neighbours are
    copies, the ends are not (nearly half of each side is gone). Chaining made one
    group of all; stars never put two images in one group unless both are
    verified with its centre, so the two ends never meet."""
    from PIL import Image

    from imgclf.data.images import open_image

    img = open_image(_sources()[0]).resize((320, 320), Image.LANCZOS)
    (tmp_path / "x").mkdir()
    box = [0, 0, 320, 320]
    for k in range(7):
        img.crop(tuple(box)).resize((32, 32), Image.LANCZOS).save(tmp_path / "x" / f"step{k}.png")
        box[0] += (box[2] - box[0]) // 10  # cut 10% more from the left and the top
        box[1] += (box[3] - box[1]) // 10
    for src in _sources()[1:4]:  # a second class: check needs two
        shrink(src, tmp_path / "y" / f"{src.stem}.png", 32)
    r = check_dataset(tmp_path, progress=False, near_dup="hash")
    groups = _reported(r)
    assert groups, "neighbouring crops are copies and must be found"
    assert not any({"x/step0.png", "x/step6.png"} <= set(g) for g in groups), groups
    # The grouping itself: a path 0-1-2-3-4 gives stars, never the whole path.
    got = nd.star_groups(5, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    assert all(len(g) <= 3 for g in got) and sum(map(len, got)) <= 5


def test_fix_lists_what_it_drops_and_refuses_over_the_share_without_force(small, tmp_path):
    """--fix on data where copies are 18% of the images: the report lists
    every file it would leave out, writes nothing and exits 1; --force writes."""
    data, photo = small
    out = tmp_path / "clean.csv"
    p = imgclf("check", data, "--near-dup", "hash", "--fix", "--fix-out", out, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "NOT written" in p.stdout and "--force" in p.stdout and not out.exists()
    listed = [ln.strip().split(":")[0] for ln in p.stdout.splitlines() if ": copy of " in ln]
    copies = [f for f in photo if any(f.endswith(f"_{m}.jpg") for m in ("jpeg30", "half", "crop10", "mirror"))]
    assert set(copies) <= set(listed) and len(listed) >= 0.95 * ORIGINALS * 6
    assert p.stdout.index(": copy of ") < p.stdout.index("NOT written")  # the list comes first
    p = imgclf("check", data, "--near-dup", "hash", "--fix", "--fix-out", out, "--force")
    assert out.exists() and f"imgclf train {out}" in p.stdout
    rows = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")][1:]
    assert len(rows) == len(photo) - len(listed)
    p = imgclf("check", data, "--near-dup", "hash", "--fix", "--fix-out", tmp_path / "b.csv", "--max-drop", "0.5")
    assert (tmp_path / "b.csv").exists()


def test_small_ordinary_photos_are_not_flagged_as_graphics(tmp_path):
    """Downscaled to 32 px, ordinary photos (an ant on a white background
    among them, flagged before) are not called a graphic or placeholder;
    hymenoptera's imageNotFound.gif still is, at full size and at 32 px."""
    hym = need(DATASETS / "hymenoptera")
    srcs = [hym / "train" / "ants" / WHITE_ANT] + _sources()[:80]
    for k, src in enumerate(srcs):
        shrink(src, tmp_path / "photos" / f"{k:03d}_{src.stem}.png" if k % 2 else tmp_path / "more" / f"{k:03d}.png", 32)
    gif = hym / "train" / "ants" / "imageNotFound.gif"
    shrink(gif, tmp_path / "photos" / "placeholder32.png", 32)
    (tmp_path / "photos" / "placeholder.gif").write_bytes(gif.read_bytes())
    r = check_dataset(tmp_path, progress=False, near_dup="off")
    graphics = {o["path"] for o in r["outliers"] if any("graphic or placeholder" in w for w in o["why"])}
    assert graphics == {"photos/placeholder32.png", "photos/placeholder.gif"}, graphics
