"""Detection labels on real images: the three formats and instance masks
agree, bad labels are named, `check` finds planted faults and `fix` repairs
them without touching the user's files, and the split is stratified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.errors import DataError
from imgclf.tasks.detect.check import (
    check_dataset,
    fix_dataset,
    format_report,
    split_dataset,
    suggest_image_size,
)
from imgclf.tasks.detect.formats import detect_format, read_dataset
from imgclf.tasks.detect.formats.coco import read_coco
from imgclf.tasks.detect.formats.write import write_coco, write_yolo
from tests.conftest import DATASETS, need

BCCD, PENN = DATASETS / "bccd", DATASETS / "pennfudan"


def voc_subset(dst: Path, n: int = 12) -> Path:
    """The first n BCCD images and annotations as a VOC folder of our own."""
    need(BCCD)
    (dst / "Annotations").mkdir(parents=True)
    (dst / "JPEGImages").mkdir()
    for xml in sorted((BCCD / "Annotations").glob("*.xml"))[:n]:
        shutil.copy(xml, dst / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{xml.stem}.jpg", dst / "JPEGImages")
    return dst


def test_formats_round_trip_exactly(tmp_path):
    """BCCD VOC -> COCO -> YOLO -> read back: every box, label and size equal,
    and the VOC 1-based corners became 0-based pixel edges."""
    voc = read_dataset(need(BCCD))
    assert voc.format == "voc" and voc.classes == ["Platelets", "RBC", "WBC"] and len(voc.images) == 292
    coco = read_dataset(write_coco(voc, tmp_path / "coco" / "instances.json"))
    yolo = read_dataset(write_yolo(coco, tmp_path / "yolo"))
    assert detect_format(tmp_path / "yolo") == "yolo" and detect_format(tmp_path / "coco") == "coco"
    assert [c.format for c in (coco, yolo)] == ["coco", "yolo"]
    assert coco.classes == yolo.classes == voc.classes
    assert len(coco.images) == len(yolo.images) == 292
    for a, b, c in zip(voc.images, coco.images, yolo.images):
        assert a.path.name == b.path.name == c.path.name
        assert (a.width, a.height) == (b.width, b.height) == (c.width, c.height)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.boxes, c.boxes)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.labels, c.labels)
    first = voc.images[0]  # BloodImage_00000.xml: WBC xmin 260 ymin 177 xmax 491 ymax 376
    assert first.boxes[0].tolist() == [259.0, 176.0, 491.0, 376.0] and voc.classes[first.labels[0]] == "WBC"
    assert (BCCD / "Annotations" / "BloodImage_00000.xml").stat().st_mtime < (tmp_path / "yolo").stat().st_mtime


def test_instance_masks_give_boxes_and_keep_mask_paths():
    ds = read_dataset(need(PENN))
    assert ds.format == "masks" and len(ds.images) == 170 and ds.num_boxes == 423
    im = next(i for i in ds.images if i.path.name == "FudanPed00001.png")
    # The database's own text file says (160, 182) - (302, 431) and (420, 171) - (535, 486), 1-based inclusive.
    assert im.boxes.tolist() == [[159.0, 181.0, 302.0, 431.0], [419.0, 170.0, 535.0, 486.0]]
    assert im.mask_path.name == "FudanPed00001_mask.png"
    m = np.asarray(Image.open(im.mask_path))
    assert sorted(np.unique(m[m > 0]).tolist()) == [1, 2]


def test_split_is_stratified_reproducible_and_respects_a_given_split(tmp_path):
    ds = read_dataset(need(BCCD))
    a, b = split_dataset(ds, seed=3), split_dataset(ds, seed=3)
    assert a == b and a != split_dataset(ds, seed=4)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(292))
    for part in ("val", "test"):  # platelets are in 162 of 292 images: each part keeps that share
        share = np.mean([0 in ds.images[i].labels for i in a[part]])
        assert abs(share - 162 / 292) < 0.12, (part, share)
    voc = voc_subset(tmp_path / "voc", 12)
    stems = sorted(p.stem for p in (voc / "Annotations").glob("*.xml"))
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{s}\n" for s in stems[:8]))
    (voc / "ImageSets" / "Main" / "val.txt").write_text("".join(f"{s}\n" for s in stems[8:]))
    small = read_dataset(voc)
    s = split_dataset(small, seed=0)
    assert [small.images[i].path.stem for i in s["val"]] == stems[8:]
    assert len(s["train"]) == 8 and s["test"] == []


def test_check_finds_planted_faults_and_fix_repairs_them(tmp_path):
    voc = voc_subset(tmp_path / "voc", 6)
    xml = voc / "Annotations" / "BloodImage_00000.xml"
    text = xml.read_text()
    planted = (  # outside the image, degenerate, an exact duplicate of the WBC, an unknown label
        "<object><name>RBC</name><bndbox><xmin>600</xmin><ymin>10</ymin><xmax>700</xmax><ymax>90</ymax></bndbox></object>"
        "<object><name>RBC</name><bndbox><xmin>50</xmin><ymin>50</ymin><xmax>49</xmax><ymax>80</ymax></bndbox></object>"
        "<object><name>WBC</name><bndbox><xmin>261</xmin><ymin>177</ymin><xmax>491</xmax><ymax>376</ymax></bndbox></object>"
        "<object><name>Neutrophil</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>")
    xml.write_text(text.replace("</annotation>", planted + "</annotation>"))
    (voc / "classes.txt").write_text("Platelets\nRBC\nWBC\n")
    before = {p: p.read_bytes() for p in voc.rglob("*") if p.is_file()}

    with pytest.raises(DataError, match="Neutrophil.*classes.txt"):
        read_dataset(voc)  # strict by default
    rep = check_dataset(voc, image_size=320)
    assert [(Path(i.image).name, i.box) for i in rep.outside] == [("BloodImage_00000.jpg", [599.0, 9.0, 700.0, 90.0])]
    assert [i.box for i in rep.degenerate] == [[49.0, 49.0, 49.0, 80.0]]
    assert [(d.label, d.box) for d in rep.duplicates] == [("WBC", [260.0, 176.0, 491.0, 376.0])]
    assert [p.kind for p in rep.problems] == ["unknown_label"] and "Neutrophil" in rep.problems[0].detail
    assert not rep.clean and any("--fix" in w for w in rep.warnings)
    json.dumps(rep.to_dict())  # the report is plain data

    counts = fix_dataset(voc, tmp_path / "clean.json")
    assert counts == {"clipped": 1, "dropped_degenerate": 1, "dropped_duplicates": 1, "left_out_unknown_label": 1}
    assert {p: p.read_bytes() for p in voc.rglob("*") if p.is_file()} == before  # the user's files are untouched
    fixed = read_dataset(tmp_path / "clean.json")
    assert check_dataset(fixed, image_size=320).clean
    orig = read_dataset(voc_subset(tmp_path / "orig", 6))
    got = fixed.images[0]
    assert got.boxes.tolist() == orig.images[0].boxes.tolist() + [[599.0, 9.0, 640.0, 90.0]]
    assert [a.boxes.tolist() for a in fixed.images[1:]] == [a.boxes.tolist() for a in orig.images[1:]]
    with pytest.raises(DataError, match="overwrite"):
        fix_dataset(voc, xml)


def test_bad_labels_are_named_with_the_file_and_fix(tmp_path):
    voc = voc_subset(tmp_path / "voc", 3)
    (voc / "Annotations" / "BloodImage_00001.xml").write_text("<annotation><object>")  # truncated
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            "<annotation><filename>&lol2;</filename></annotation>")
    (voc / "Annotations" / "BloodImage_00002.xml").write_text(bomb)
    ds = read_dataset(voc, strict=False)
    assert len(ds.images) == 1
    assert [(Path(p.file).name, p.kind) for p in ds.problems] == [("BloodImage_00001.xml", "unreadable"),
                                                                    ("BloodImage_00002.xml", "unreadable")]
    assert "EntitiesForbidden" in ds.problems[1].detail

    coco = ({"images": [{"id": 1, "file_name": str(BCCD / "JPEGImages" / "BloodImage_00000.jpg"),
                                              "width": 640, "height": 480}],
                                  "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
                                                  {"id": 8, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}],
                                  "categories": [{"id": 1, "name": "cell"}]})
    f = tmp_path / "c.json"
    f.write_text(json.dumps(coco).replace("[1, 2, 3, 4]", "[1, 2, NaN, 4]", 1))  # Python's json writes NaN, others may
    with pytest.raises(DataError) as e:
        read_dataset(f)
    assert "c.json: annotation 7: bbox [1, 2, nan, 4]" in str(e.value) and "category_id 9" in str(e.value)
    with pytest.raises(DataError, match=r"c.json: \d+ bytes is over the 100 bytes limit.*max_json_bytes"):
        read_coco(f, max_json_bytes=100)
    f.write_text("{not json")
    with pytest.raises(DataError, match="c.json: not valid JSON"):
        read_dataset(f)

    yolo = write_yolo(read_dataset(voc_subset(tmp_path / "v2", 2)), tmp_path / "yolo")
    lab = min((yolo / "labels").glob("*.txt"))
    lab.write_text(lab.read_text() + "5 0.5 0.5 0.1 0.1\n0 0.5 nan 0.1 0.1\n")
    ds = read_dataset(yolo, strict=False)
    assert [(p.kind, p.file.rsplit(":", 1)[0] == str(lab)) for p in ds.problems] == [("unknown_label", True),
                                                                                     ("bad_coords", True)]
    with pytest.raises(DataError, match="no detection labels"):
        read_dataset(need(DATASETS / "cats_dogs_tiny"))


def test_small_objects_warned_at_a_small_input_size():
    ds = read_dataset(need(BCCD))
    rep = check_dataset(ds, image_size=160, near_dup="off")
    assert rep.small_per_class["Platelets"] > 0.5 * rep.boxes_per_class["Platelets"]
    assert rep.small_per_class["WBC"] < 0.01 * rep.boxes_per_class["WBC"]
    assert any("'Platelets'" in w and "--image-size" in w for w in rep.warnings)
    assert rep.sizes["Platelets"]["side_px"][1] < rep.sizes["RBC"]["side_px"][1] < rep.sizes["WBC"]["side_px"][1]
    size = suggest_image_size(ds)
    assert size % 32 == 0 and not any("'Platelets'" in w for w in check_dataset(ds, image_size=size).warnings)


def _retake(src: Path, dst: Path) -> None:
    """The same photo saved again: 90% size, another JPEG quality (other bytes, near-identical pixels)."""
    im = Image.open(src)
    im.resize((im.width * 9 // 10, im.height * 9 // 10)).save(dst, quality=70)


def test_check_finds_copies_and_leakage_across_the_split(tmp_path):
    """An image re-saved smaller into val (its annotation copied) leaks across the
    given split; a byte copy within train is a copy; check names both, and
    says the labels themselves are clean."""
    voc = voc_subset(tmp_path / "voc", 12)
    stems = sorted(p.stem for p in (voc / "Annotations").glob("*.xml"))
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{s}\n" for s in stems[:9] + ["copy_a"]))
    (voc / "ImageSets" / "Main" / "val.txt").write_text("".join(f"{s}\n" for s in stems[9:] + ["leak_b"]))
    a, b = stems[0], stems[1]
    for src, dst in ((a, "copy_a"), (b, "leak_b")):
        xml = (voc / "Annotations" / f"{src}.xml").read_text()
        (voc / "Annotations" / f"{dst}.xml").write_text(xml.replace(f"{src}.jpg", f"{dst}.jpg"))
    shutil.copy(voc / "JPEGImages" / f"{a}.jpg", voc / "JPEGImages" / "copy_a.jpg")
    _retake(voc / "JPEGImages" / f"{b}.jpg", voc / "JPEGImages" / "leak_b.jpg")

    rep = check_dataset(read_dataset(voc, strict=False), image_size=320)
    assert rep.split_given and rep.split_counts == {"train": 10, "val": 4, "test": 0}
    assert [(g.files, g.splits, g.identical) for g in rep.leaks] == [
        ([f"JPEGImages/{b}.jpg", "JPEGImages/leak_b.jpg"], ["train", "val"], False)]
    assert [(g.files, g.splits, g.identical) for g in rep.copies] == [
        ([f"JPEGImages/{a}.jpg", "JPEGImages/copy_a.jpg"], ["train", "train"], True)]
    assert rep.labels_clean and not rep.clean
    assert any("leakage" in w and "leak_b.jpg" in w for w in rep.warnings)
    text = format_report(rep)
    assert f"[near-identical] JPEGImages/{b}.jpg (train)  ~  JPEGImages/leak_b.jpg (val)" in text
    assert "leakage across splits (1 group(s))" in text and "copies within a split (1 group(s))" in text
    json.dumps(rep.to_dict())

    off = check_dataset(voc, image_size=320, near_dup="off")  # what --near-dup off skips
    assert off.leaks == off.copies == [] and "nothing (--near-dup off)" in format_report(off)


def test_check_judges_leakage_on_the_split_the_run_would_make(tmp_path):
    """Without a given split, a copy is a leak exactly when split_dataset (as
    `train` would, same seed and fractions) puts its two images apart."""
    voc = voc_subset(tmp_path / "voc", 12)
    for k in range(4):
        shutil.copy(voc / "JPEGImages" / f"BloodImage_0000{k}.jpg", voc / "JPEGImages" / f"twin{k}.jpg")
        xml = (voc / "Annotations" / f"BloodImage_0000{k}.xml").read_text()
        (voc / "Annotations" / f"twin{k}.xml").write_text(xml.replace(f"BloodImage_0000{k}.jpg", f"twin{k}.jpg"))
    ds = read_dataset(voc)
    split = split_dataset(ds, 0.25, 0.25, seed=1)
    where = {ds.images[i].path.name: s for s, items in split.items() for i in items}
    apart = sorted(f"twin{k}.jpg" for k in range(4) if where[f"twin{k}.jpg"] != where[f"BloodImage_0000{k}.jpg"])
    rep = check_dataset(ds, image_size=320, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert not rep.split_given and len(rep.leaks) + len(rep.copies) == 4
    assert sorted(Path(g.files[1]).name for g in rep.leaks) == apart and apart  # seed 1 parts at least one pair


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h grey pixels (the header only, then a tiny image-data chunk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_hostile_masks_are_named_never_decoded_and_the_rest_kept(tmp_path):
    """A mask PNG claiming 100,000 x 100,000 pixels (10 GB if decoded), an
    image doing the same, ids that skip (255 as a border value), an RGB mask:
    each a problem naming its file and the fix; the good image is kept."""
    root = tmp_path / "peds"
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for k in range(1, 6):
        shutil.copy(need(PENN) / "PNGImages" / f"FudanPed0000{k}.png", root / "PNGImages")
        shutil.copy(PENN / "PedMasks" / f"FudanPed0000{k}_mask.png", root / "PedMasks")
    (root / "PedMasks" / "FudanPed00002_mask.png").write_bytes(_png_header(100_000, 100_000))
    (root / "PNGImages" / "FudanPed00003.png").write_bytes(_png_header(100_000, 100_000))
    m = np.asarray(Image.open(PENN / "PedMasks" / "FudanPed00004_mask.png")).copy()
    m[0, :] = 255
    Image.fromarray(m).save(root / "PedMasks" / "FudanPed00004_mask.png")
    Image.open(PENN / "PNGImages" / "FudanPed00005.png").save(root / "PedMasks" / "FudanPed00005_mask.png")

    ds = read_dataset(root, strict=False)
    assert [im.path.name for im in ds.images] == ["FudanPed00001.png"] and ds.num_boxes == 2
    got = {Path(p.file).name: p for p in ds.problems}
    assert got["FudanPed00002_mask.png"].kind == "bad_mask" and "decompression" in got["FudanPed00002_mask.png"].detail
    assert got["FudanPed00003.png"].kind == "unreadable" and "decompression" in got["FudanPed00003.png"].detail
    assert got["FudanPed00004_mask.png"].kind == "bad_mask" and "255" in got["FudanPed00004_mask.png"].detail
    assert "1..N" in got["FudanPed00004_mask.png"].detail
    assert got["FudanPed00005_mask.png"].kind == "bad_mask" and "RGB" in got["FudanPed00005_mask.png"].detail
    with pytest.raises(DataError, match="4 problem"):
        read_dataset(root)


def _coco_file(path: Path, images: list, anns: str, cats: str = '[{"id": 1, "name": "cell"}]') -> Path:
    path.write_text(f'{{"images": {json.dumps(images)}, "categories": {cats}, "annotations": [{anns}]}}')
    return path


def test_hostile_coco_files_are_named_and_bounded(tmp_path):
    """A million boxes on one image, NaN/inf/overflowing coordinates,
    fields of the wrong type, a file over the size cap, nesting too deep:
    each a DataError or a problem naming the file, the rest kept."""
    img = str(need(BCCD) / "JPEGImages" / "BloodImage_00000.jpg")
    other = str(BCCD / "JPEGImages" / "BloodImage_00001.jpg")
    images = [{"id": 1, "file_name": img, "width": 640, "height": 480},
              {"id": 2, "file_name": other, "width": "wide", "height": 1e999}, 7, {"id": [3], "file_name": ["x"]}]
    million = ",".join(f'{{"id": {k}, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}}'
                       for k in range(1_000_000))
    f = _coco_file(tmp_path / "million.json", images, million + ', {"id": 0, "image_id": 2, "category_id": 1, '
                   '"bbox": [10, 20, 30, 40]}')
    ds = read_dataset(f, strict=False)
    assert [(Path(im.path).name, im.width, im.height, im.boxes.tolist()) for im in ds.images] == [
        ("BloodImage_00001.jpg", 640, 480, [[10.0, 20.0, 40.0, 60.0]])]  # garbage sizes: from the header
    kinds = [(p.kind, p.file == str(f)) for p in ds.problems]
    assert kinds == [("too_many_boxes", True), ("missing_image", True), ("missing_image", True)]
    assert "1,000,000 boxes" in ds.problems[0].detail and "image id 1" in ds.problems[0].detail

    bad = ('{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NaN, 2, 3, 4]}, '
           '{"id": 2, "image_id": 1, "category_id": 1, "bbox": [Infinity, 2, 3, 4]}, '
           '{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1e308, 2, 1e308, 4]}, '
           '{"id": 4, "image_id": 1, "category_id": [1], "bbox": [1, 2, 3, 4]}, '
           '{"id": 5, "image_id": {"a": 1}, "category_id": 1, "bbox": [1, 2, 3, 4]}, '
           '{"id": 6, "image_id": 1, "category_id": 1, "bbox": ' + "[" * 500 + "]" * 500 + '}, '
           '{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 6, 7, 8]}')
    f = _coco_file(tmp_path / "bad.json", images[:1], bad, '[{"id": 1, "name": "cell"}, {"id": "two"}, 3]')
    ds = read_dataset(f, strict=False)
    assert ds.classes == ["cell"] and ds.images[0].boxes.tolist() == [[5.0, 6.0, 12.0, 14.0]]
    assert sorted(p.kind for p in ds.problems) == ["bad_coords"] * 5 + ["unknown_label"] * 3
    assert all(len(p.detail) < 300 for p in ds.problems)  # the 500-deep bbox quoted short
    with pytest.raises(DataError, match=r"8 problem\(s\)(.|\n)*bad.json: annotation 6: bbox \[\[\[...\]\]\]"):
        read_dataset(f)

    with pytest.raises(DataError, match=r"bad.json: [\d,]+ bytes is over the 1,000 bytes limit.*max_json_bytes"):
        read_dataset(f, max_json_bytes=1000)
    deep = tmp_path / "deep.json"
    deep.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + ', "categories": []}')
    with pytest.raises(DataError, match="deep.json: JSON nested too deeply"):
        read_dataset(deep)


def test_hostile_yolo_labels_are_named_and_the_rest_kept(tmp_path):
    """Garbage lines, a binary label file, a data.yaml of nested aliases
    ("billion laughs") or nested too deeply: named, never a traceback."""
    yolo = write_yolo(read_dataset(voc_subset(tmp_path / "v", 3)), tmp_path / "yolo")
    labs = sorted((yolo / "labels").glob("*.txt"))
    good = labs[0].read_text()
    labs[0].write_text(good + "0 inf 0.5 0.1 0.1\n0 1e999 0.5 0.1 0.1\n0 0.5\nzero 0.5 0.5 0.1 0.1\n"
                       "0.5 0.5 0.5 0.1 0.1\n1e20 0.5 0.5 0.1 0.1\n-1 0.5 0.5 0.1 0.1\n\x00\x01 garbage\n")
    labs[1].write_bytes(b"\xff\xfe\x00binary" * 100)
    ds = read_dataset(yolo, strict=False)
    assert len(ds.images) == 2 and len(ds.images[0].boxes) == good.count("\n")
    assert [(Path(p.file.rsplit(":", 1)[0]).name, p.kind) for p in ds.problems] == (
        [(labs[0].name, "bad_coords")] * 5 + [(labs[0].name, "unknown_label")] * 2 + [(labs[0].name, "bad_coords")]
        + [(labs[1].name, "unreadable")])
    assert "not UTF-8" in ds.problems[-1].detail

    laughs = "names: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{k}: &l{k} [{', '.join(['*a' if k == 0 else f'*l{k - 1}'] * 10)}]\n" for k in range(9))
    (yolo / "data.yaml").write_text(laughs + "names: [*l8, *l8]\n")  # 10^10 names if expanded
    with pytest.raises(DataError, match="data.yaml: no 'names' list of class names"):
        read_dataset(yolo)
    (yolo / "data.yaml").write_text("names: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(DataError, match="data.yaml: (YAML nested too deeply|no 'names')"):
        read_dataset(yolo)
