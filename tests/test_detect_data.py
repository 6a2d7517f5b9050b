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
    split_dataset,
    suggest_image_size,
)
from imgclf.tasks.detect.data import (
    detect_format,
    read_coco,
    read_dataset,
    write_coco,
    write_yolo,
)
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
    rep = check_dataset(ds, image_size=160)
    assert rep.small_per_class["Platelets"] > 0.5 * rep.boxes_per_class["Platelets"]
    assert rep.small_per_class["WBC"] < 0.01 * rep.boxes_per_class["WBC"]
    assert any("'Platelets'" in w and "--image-size" in w for w in rep.warnings)
    assert rep.sizes["Platelets"]["side_px"][1] < rep.sizes["RBC"]["side_px"][1] < rep.sizes["WBC"]["side_px"][1]
    size = suggest_image_size(ds)
    assert size % 32 == 0 and not any("'Platelets'" in w for w in check_dataset(ds, image_size=size).warnings)
