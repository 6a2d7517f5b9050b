"""Near-duplicates in `imgclf check`: recall and precision on real photos with
modified copies made here (JPEG 30, half size, 10% crop, brightness +-20%,
mirror), the kind of each group, and `--fix` writing a split that `train` reads."""

import csv
import itertools
import shutil

import pytest

from bench.bench_neardup import write_copies
from imgclf.data.datasets import discover
from imgclf.data_engine.near_dup import check_dataset

from .conftest import DATASETS, imgclf, need

ORIGINALS = 4  # per class, each with 6 modified copies


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """hymenoptera photos as DATA/train|val/{ants,bees}: 8 originals with their
    copies in train, 24 unrelated photos; one copy leaked into val, one
    mirrored copy filed under the other class. Returns (DATA, {path: photo id},
    {"leaks": [...], "relabelled": [...]})."""
    hym = need(DATASETS / "hymenoptera")
    data = tmp_path_factory.mktemp("neardup") / "data"
    photo, planted = {}, {"leaks": [], "relabelled": []}
    for c, other in (("ants", "bees"), ("bees", "ants")):
        files = sorted(f for f in (hym / "train" / c).iterdir() if f.suffix.lower() == ".jpg")
        for k, src in enumerate(files[:ORIGINALS]):
            for f in write_copies(src, data / "train" / c, src.stem, seed=k):
                photo[str(f.relative_to(data))] = src.name
        for k, src in enumerate(files[ORIGINALS:ORIGINALS + 12]):
            dst = data / ("val" if k % 2 else "train") / c / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            photo[str(dst.relative_to(data))] = src.name
        first = files[0].stem
        leak = data / "val" / c / f"{first}_jpeg30.jpg"  # a copy in val: leakage
        (data / "train" / c / leak.name).rename(leak)
        photo[str(leak.relative_to(data))] = photo.pop(f"train/{c}/{leak.name}")
        planted["leaks"].append(str(leak.relative_to(data)))
        second = files[1].stem
        wrong = data / "train" / other / f"{second}_mirror.jpg"  # the same photo, the other label
        wrong.parent.mkdir(parents=True, exist_ok=True)
        (data / "train" / c / wrong.name).rename(wrong)
        photo[str(wrong.relative_to(data))] = photo.pop(f"train/{c}/{wrong.name}")
        planted["relabelled"].append(str(wrong.relative_to(data)))
    return data, photo, planted


def _pairs_of(r: dict) -> set[tuple[str, str]]:
    groups = {tuple(g["files"]) for kind in ("within_class", "across_classes", "across_splits")
              for g in r["near_duplicates"][kind]}
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


def _score(r: dict, photo: dict) -> tuple[float, float]:
    """(recall of copy pairs, false share of reported pairs)."""
    truth = {tuple(sorted(p)) for p in itertools.combinations(photo, 2) if photo[p[0]] == photo[p[1]]}
    reported = _pairs_of(r)
    return len(reported & truth) / len(truth), len(reported - truth) / max(1, len(reported))


@pytest.mark.parametrize("method", ["embed", "hash"])
def test_near_duplicates_recall_precision_and_kinds(copies, method):
    """At least 95% of copy pairs found, at most 1% of reported pairs false,
    10% crops included: hash (pHashes of each image's crops and mirror,
    verified by pixels) and embed alike."""
    data, photo, planted = copies
    r = check_dataset(data, progress=False, near_dup=method)
    recall, false = _score(r, photo)
    assert recall >= 0.95 and false <= 0.01, (method, recall, false)
    nd = r["near_duplicates"]
    leaked = {f for g in nd["across_splits"] for f in g["files"] if f.startswith("val/")}
    assert leaked == set(planted["leaks"])
    for f in planted["relabelled"]:  # in a conflict group with its original, under the other label
        group = next(g for g in nd["across_classes"] if f in g["files"])
        assert f"train/{group['labels'][group['files'].index(f)]}/" in f
        assert any(photo[g] == photo[f] and not g.startswith(f.rsplit("/", 1)[0]) for g in group["files"])
    assert any("leakage" in w for w in r["warnings"]) and any("different labels" in w for w in r["warnings"])


def test_fix_writes_clean_split_that_train_reads(copies, tmp_path):
    """--fix: one image per photo, the leaked copy gone from val, the conflicting
    rows commented out for a person; the data folder is untouched; training on
    the CSV finds its features in the cache `check --near-dup embed` filled."""
    data, photo, planted = copies
    before = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*"))
    out = tmp_path / "clean.csv"
    p = imgclf("check", data, "--near-dup", "embed", "--fix", "--fix-out", out, "--force")  # copies: most of it
    assert "cleaned split: " + str(out) in p.stdout and f"imgclf train {out}" in p.stdout
    assert sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")) == before
    text = out.read_text()
    rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
    assert rows[0] == ["path", "label", "split"]
    rel = lambda path: str((out.parent / path).resolve().relative_to(data.resolve()))  # noqa: E731
    kept = {rel(r[0]): (r[1], r[2]) for r in rows[1:]}
    conflicted = {photo[f] for f in planted["relabelled"]}
    # One image per photo, and none of a photo given two labels.
    assert sorted(photo[f] for f in kept) == sorted(set(photo.values()) - conflicted)
    assert not set(planted["leaks"]) & set(kept)
    assert all(kept[f][1] == f.split("/")[0] for f in kept)
    commented = [ln for ln in text.splitlines() if ln.startswith("#") and not ln.startswith("# ")]  # rows, not notes
    assert {f for f in photo if photo[f] in conflicted} == {rel(ln[1:].split(",")[0]) for ln in commented}
    s = discover(out)
    assert s.layout == "csv-split" and len(s.train) + len(s.val) == len(kept)
    run = tmp_path / "run"
    # check's embeddings are Lite0's (its cosine threshold was measured with them): training on that backbone
    t = imgclf("train", out, "--out", run, "--model", "efficientnet_lite0", "--epochs", "5", "--no-evaluate")
    n = len(s.train)
    assert f"{n}/{n} train images from cache" in t.stdout, t.stdout
    assert (run / "model.pt").exists()


def test_class_folders_copies_that_would_straddle_the_split(tmp_path, tiny):
    """With no given split, copies the split imgclf makes would put on both
    sides are leakage too: warned, and --fix keeps one of each (no split column)."""
    data = tmp_path / "flat"
    for c in ("cats", "dogs"):
        (data / c).mkdir(parents=True)
        for f in sorted((tiny / "train" / c).iterdir())[:20]:
            shutil.copy(f, data / c / f.name)
    src = sorted((tiny / "train" / "cats").iterdir())[0]
    made = write_copies(src, tmp_path / "copies", "copy", seed=0)
    for f in made[1:]:
        if "_crop10" not in f.name:
            shutil.copy(f, data / "cats" / f.name)
    group = {f"cats/{f.name}" for f in made if (data / "cats" / f.name).exists()} | {f"cats/{src.name}"}

    def parts(seed):  # how many of imgclf's splits the copies land in
        s = discover(data, seed=seed)
        return sum(bool(group & {p for p, _ in getattr(s, n)}) for n in ("train", "val", "test"))

    seed = next(k for k in range(20) if parts(k) > 1)
    r = check_dataset(data, seed=seed, progress=False, near_dup="hash", fix=tmp_path / "clean.csv", force=True)
    assert r["near_duplicates"]["straddling"] == 1 and any("both sides" in w for w in r["warnings"])
    rows = [ln.split(",") for ln in (tmp_path / "clean.csv").read_text().splitlines() if not ln.startswith("#")]
    assert rows[0] == ["path", "label"] and len(rows) - 1 == 40 and r["fix"]["copy"] == 5
    assert sum(src.name in p or "copy_" in p for p, _ in rows[1:]) == 1


def test_embed_without_a_detector_says_where_to_get_one(tiny):
    """data/check.py sits below the data engine, so it cannot build the
    embedding detector itself: asked for `embed` without one, it says which
    function passes it, before scanning anything."""
    from imgclf.data import check
    from imgclf.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check.check_dataset(tiny, progress=False, near_dup="embed")
    assert "data_engine.near_dup.check_dataset" in e.value.fix


def test_auto_embeds_where_features_are_cached_else_hashes(copies, tmp_path):
    """`--near-dup auto` (the default): with nothing in the feature cache it
    searches by hash and pixels, without loading a model; once `embed` has
    filled the cache, the embedding is a lookup, and auto uses it."""
    data, photo, _ = copies
    r = check_dataset(data, progress=False, cache_dir=str(tmp_path / "empty-cache"))
    assert r["near_duplicates"]["method"] == "hash"
    check_dataset(data, progress=False, near_dup="embed")
    r = check_dataset(data, progress=False)
    assert r["near_duplicates"]["method"] == "embed" and "embeddings" in r["near_duplicates"]["criterion"]
    assert _score(r, photo)[0] >= 0.95
