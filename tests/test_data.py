"""Splits (stratified, reproducible, disjoint), layouts, and `imgclf check`."""

import shutil
from collections import Counter

import pytest

from imgclf.data.check import check_dataset, format_report
from imgclf.data.datasets import discover
from imgclf.errors import DataError

from .conftest import DATASETS, imgclf, need


def test_class_folder_split_is_stratified_reproducible_disjoint():
    data = need(DATASETS / "dogs_vs_cats_2k_fullres")
    a = discover(data, 0.1, 0.1, seed=0)
    b = discover(data, 0.1, 0.1, seed=0)
    c = discover(data, 0.1, 0.1, seed=1)
    assert a.layout == "class-folders" and a.classes == ["cats", "dogs"]
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)  # same seed, same split
    assert a.test != c.test  # another seed, another split
    sets = [set(p for p, _ in s) for s in (a.train, a.val, a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 2000
    for part, n in ((a.train, 800), (a.val, 100), (a.test, 100)):
        assert Counter(y for _, y in part) == {0: n, 1: n}  # 80/10/10 of each class


def test_given_split_folders_used_as_is(tiny):
    s = discover(tiny)
    assert s.layout == "split-folders" and len(s.train) == 200 and len(s.val) == 100 and not s.test
    assert any("no test folder" in n for n in s.notes)
    assert s.eval_split()[0] == "val"


def test_csv_layout(tmp_path, tiny):
    files = sorted((tiny / "train" / "cats").iterdir())[:40] + sorted((tiny / "train" / "dogs").iterdir())[:40]
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in files]  # absolute paths
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path / "labels.csv")
    assert s.layout == "csv" and s.classes == ["cats", "dogs"]
    assert len(s.train) + len(s.val) + len(s.test) == 80


def test_helpful_error_for_flat_folder(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="class folder"):
        discover(tmp_path)


def test_check_hymenoptera_flags_placeholder_gif():
    r = check_dataset(need(DATASETS / "hymenoptera"), progress=False)
    assert r["totals"] == {"ants": 124 + 70, "bees": 121 + 83}
    assert r["counts"]["ants"]["train"] == 124 and r["counts"]["bees"]["val"] == 83
    flagged = {o["path"]: " ".join(o["why"]) for o in r["outliers"]}
    assert "train/ants/imageNotFound.gif" in flagged
    assert "GIF" in flagged["train/ants/imageNotFound.gif"]
    assert len(flagged) <= 5  # a look-list, not noise


def test_check_reports_bad_files_duplicates_and_leakage(tmp_path, tiny):
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            (tmp_path / split / c).mkdir(parents=True)
            for f in sorted((tiny / split / c).iterdir())[:6]:
                shutil.copy(f, tmp_path / split / c / f.name)
    leak = sorted((tiny / "train" / "cats").iterdir())[0]
    shutil.copy(leak, tmp_path / "val" / "cats" / "leaked.jpg")  # same file in train and val
    shutil.copy(leak, tmp_path / "train" / "dogs" / "mislabelled.jpg")  # same file, other class
    shutil.copy(leak, tmp_path / "train" / "cats" / "again.jpg")  # duplicate within class
    (tmp_path / "train" / "dogs" / "notes.jpg").write_text("not an image")
    r = check_dataset(tmp_path, progress=False)
    assert [b["path"] for b in r["bad_files"]] == ["train/dogs/notes.jpg"]
    assert r["duplicates"]["across_splits"] and r["duplicates"]["across_classes"]
    assert any("leakage" in w for w in r["warnings"])
    text = imgclf("check", tmp_path).stdout
    assert "leakage" in text and "notes.jpg" in text and "not an image" in text
    assert format_report(r) in text


def test_csv_split_column_used_as_given(tmp_path, tiny):
    cats, dogs = sorted((tiny / "train" / "cats").iterdir())[:6], sorted((tiny / "train" / "dogs").iterdir())[:6]
    rows = ["path,label,split"] + [f"{p},{p.parent.name},{'train' if k < 4 else 'validation' if k == 4 else 'test'}"
                                   for k, p in list(enumerate(cats)) + list(enumerate(dogs))]
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    s = discover(tmp_path / "labels.csv")
    assert s.layout == "csv-split" and s.given
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 2)
    assert {p for p, _ in s.val} == {str(cats[4]), str(dogs[4])}
    (tmp_path / "bad.csv").write_text("\n".join(rows[:3] + [f"{cats[5]},cats,holdout"]))
    with pytest.raises(DataError, match=r"bad.csv, line 4: split 'holdout'"):
        discover(tmp_path / "bad.csv")


def _two_classes(root, tiny, n=4):
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for f in sorted((tiny / "train" / c).iterdir())[:n]:
            shutil.copy(f, root / c / f.name)
    return root


def test_links_leaving_the_data_hidden_and_linked_folders_are_skipped_and_noted(tmp_path, tiny):
    import os

    d = _two_classes(tmp_path / "d", tiny)
    outside = _two_classes(tmp_path / "elsewhere", tiny, n=2)
    os.symlink(outside / "cats", d / "etc")  # a class folder that is a link out of the data
    os.symlink(outside / "dogs" / sorted(os.listdir(outside / "dogs"))[0], d / "dogs" / "link.jpg")  # a file link out
    (d / "...").mkdir()  # a hidden class folder
    shutil.copy(next((tiny / "train" / "cats").iterdir()), d / "..." / "x.jpg")
    (d / "cats" / "more").mkdir()
    os.symlink(d / "cats" / "more", d / "dogs" / "sub")  # a linked sub-folder inside a class
    s = discover(d)
    assert s.classes == ["cats", "dogs"]
    files = {p for part in (s.train, s.val, s.test) for p, _ in part}
    assert "dogs/link.jpg" not in files and len(files) == 8
    notes = "\n".join(s.notes)
    assert "2 symbolic link(s) leading outside the data folder (--follow-links follows them) skipped: " in notes
    assert "etc" in notes and "dogs/link.jpg" in notes
    assert "1 hidden folder(s) (the name starts with '.') skipped: ..." in notes
    assert "1 linked sub-folder(s) inside a class (--follow-links follows them) skipped: dogs/sub" in notes
    followed = discover(d, follow_links=True)
    assert followed.classes == ["cats", "dogs", "etc"]
    assert "dogs/link.jpg" in {p for part in (followed.train, followed.val, followed.test) for p, _ in part}
    r = imgclf("check", d, "--near-dup", "off")
    assert "symbolic link(s) leading outside the data folder" in r.stdout


def test_a_class_with_no_readable_images_is_refused_and_flagged_by_check(tmp_path, tiny):
    from imgclf.data.check import check_dataset
    from imgclf.training.train import check_files

    d = _two_classes(tmp_path / "d", tiny, n=6)
    (d / "ants").mkdir()
    for i in range(6):
        (d / "ants" / f"{i}.jpg").write_text("not an image")
    s = discover(d)
    assert s.classes == ["ants", "cats", "dogs"]
    with pytest.raises(DataError, match="class.es. ants have no readable training images, so the model could never "
                                        "predict them"):
        check_files(s)
    r = check_dataset(d, near_dup="off", progress=False)
    assert any("class 'ants' has no readable training images" in w for w in r["warnings"])


def test_class_names_that_mislead_are_warned(tmp_path, tiny):
    import unicodedata

    src = sorted((tiny / "train" / "cats").iterdir())[:2]
    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"), " cats ", "unknown"):
        (tmp_path / name).mkdir()
        for f in src:
            shutil.copy(f, tmp_path / name / f.name)
    notes = "\n".join(discover(tmp_path).notes)
    assert "look the same but are spelled with different Unicode characters (NFC / NFD)" in notes
    assert "class ' cats ' has leading or trailing spaces" in notes
    assert "a class is named 'unknown', the answer for rejected inputs" in notes
    r = imgclf("check", tmp_path, "--near-dup", "off")
    assert "NFC / NFD" in r.stdout and "leading or trailing spaces" in r.stdout


def test_csv_field_over_the_limit_names_the_line(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,cat\n" + "b" * 200_000 + ".jpg,dog\n")
    with pytest.raises(DataError, match=r"labels.csv, line 3: not a CSV row \(field larger than field limit"):
        discover(tmp_path / "labels.csv")


def test_an_image_given_as_data_is_told_what_data_is(tiny):
    photo = sorted((tiny / "train" / "cats").iterdir())[0]
    p = imgclf("train", photo, check=False)
    assert p.returncode == 2 and "is a JPEG image, not a data folder or a CSV of labels" in p.stderr
    assert "UTF-8" not in p.stderr and "imgclf predict RUN IMAGE" in p.stderr


def test_an_unreadable_class_folder_says_permission_denied(tmp_path, tiny):
    """chmod 000 on a class folder: "permission denied", not "empty". Root
    reads anything, so as root the commands run without the capabilities
    that bypass file permissions (setpriv)."""
    import os
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be taken away")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    d = _two_classes(tmp_path / "d", tiny, n=10)
    (d / "dogs").chmod(0)
    try:
        for cmd in ("check", "train"):
            p = subprocess.run([*prefix, sys.executable, "-m", "imgclf", cmd, str(d), "--near-dup" if cmd == "check"
                                else "--no-evaluate", *(["off"] if cmd == "check" else ["--out", str(tmp_path / "r")])],
                               capture_output=True, text=True, timeout=300)
            assert "folder(s) that cannot be read (permission denied: check its permissions) skipped: dogs" in (
                p.stdout + p.stderr), (cmd, p.stdout, p.stderr)
        assert p.returncode == 2 and "dogs have no readable training images" in p.stderr
    finally:
        (d / "dogs").chmod(0o755)
