"""Semantic segmentation on real CamVid road scenes (../shared/datasets/camvid):
the mask readers agree, check finds planted faults, a short training beats a
bound and survives kill -9 + --resume, and the answers (predict, evaluate,
--save-masks) are what a user reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.errors import DataError
from imgclf.tasks import task_for_data, verbs
from imgclf.tasks.segment.check import check_dataset
from imgclf.tasks.segment.data import load_mask, read_dataset, split_dataset
from imgclf.tasks.segment.predictor import palette
from tests.conftest import imgclf

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "camvid"
if not CAMVID.is_dir():
    CAMVID = Path("/work/shared/datasets/camvid")
pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/datasets/camvid")
CLASSES = (CAMVID / "classes.txt").read_text().split() if CAMVID.is_dir() else []
VOID = 11


def _stems(split: str, n: int) -> list[str]:
    return sorted(p.stem for p in (CAMVID / split).glob("*.jpg"))[:n]


def _camvid_subset(dst: Path, n_train: int, n_val: int) -> Path:
    """A CamVid-layout copy of the first n_train / n_val frames (links: no image is copied)."""
    dst.mkdir(parents=True)
    shutil.copy(CAMVID / "classes.txt", dst)
    for split, n in (("train", n_train), ("val", n_val)):
        (dst / split).mkdir()
        (dst / f"{split}annot").mkdir()
        for s in _stems(split, n):
            (dst / split / f"{s}.jpg").symlink_to(CAMVID / split / f"{s}.jpg")
            (dst / f"{split}annot" / f"{s}.png").symlink_to(CAMVID / f"{split}annot" / f"{s}.png")
    return dst


def _folders(dst: Path, stems: list[str], classes_txt: str, mask_of) -> Path:
    """images/ + masks/ with masks written by mask_of(label map) -> PIL image."""
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    (dst / "classes.txt").write_text(classes_txt)
    for s in stems:
        (dst / "images" / f"{s}.jpg").symlink_to(CAMVID / "train" / f"{s}.jpg")
        mask_of(np.asarray(Image.open(CAMVID / "trainannot" / f"{s}.png"))).save(dst / "masks" / f"{s}.png")
    return dst


def _read_all(root: Path, ignore: int = VOID) -> dict[str, np.ndarray]:
    ds = read_dataset(root, ignore_index=ignore)
    return {it.image.stem: load_mask(ds, it) for it in ds.items}


# --- data ------------------------------------------------------------------------

def test_the_task_is_chosen_from_the_data(tmp_path):
    assert task_for_data(CAMVID) == "segment"
    pennfudan = CAMVID.parent / "pennfudan"
    if pennfudan.is_dir():  # instance masks are detection, not semantic masks
        assert task_for_data(pennfudan) == "detect"
    root = _folders(tmp_path / "f", _stems("train", 1), "\n".join(CLASSES), lambda m: Image.fromarray(m))
    assert task_for_data(root) == "segment"


def test_every_class_has_its_own_colour_and_only_void_is_black():
    """CamVid's class 0 is Sky: drawn black it would look like void (and darken overlays)."""
    from imgclf.tasks.segment.predictor import colour_mask

    cols = palette(32)
    assert len({tuple(c) for c in cols}) == 32 and not (cols == 0).all(axis=1).any()
    m = np.array([[0, 1, 11, 255]], np.uint8)  # Sky, Building, void (--ignore-index 11), 255
    rgb = colour_mask(m, 11)
    assert (rgb[0, :2] != 0).any(axis=1).all() and (rgb[0, 2:] == 0).all()


def test_label_maps_palette_pngs_and_colour_masks_read_the_same(tmp_path):
    stems = _stems("train", 3)
    truth = {s: np.asarray(Image.open(CAMVID / "trainannot" / f"{s}.png")) for s in stems}
    names = "\n".join(CLASSES)
    pal = palette(256)

    def as_palette_png(m):  # mode P: the indices are the ids; the colours only show them
        im = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
        im.putpalette(pal.ravel().tolist())
        return im

    lines = "\n".join(f"{r} {g} {b} {c}" for (r, g, b), c in zip(pal[:len(CLASSES)].tolist(), CLASSES))
    label = _read_all(_folders(tmp_path / "label", stems, names, lambda m: Image.fromarray(m)))
    paletted = _read_all(_folders(tmp_path / "pal", stems, names, as_palette_png))
    coloured = _read_all(_folders(tmp_path / "rgb", stems, lines, lambda m: Image.fromarray(pal[m])))
    assert Image.open(next((tmp_path / "pal" / "masks").iterdir())).mode == "P"
    for s in stems:
        assert np.array_equal(label[s], truth[s])
        assert np.array_equal(paletted[s], truth[s])
        # void's colour is in no line of classes.txt: read as the ignore value, which is 11 here
        assert np.array_equal(coloured[s], truth[s])
    assert (truth[stems[0]] == VOID).any()


def test_coco_rle_is_rasterised_to_the_same_label_map(tmp_path):
    from faster_coco_eval.core import mask as mask_utils

    stems = _stems("train", 2)
    images, anns = [], []
    for k, s in enumerate(stems):
        m = np.asarray(Image.open(CAMVID / "trainannot" / f"{s}.png"))
        images.append({"id": k, "file_name": f"{s}.jpg", "width": m.shape[1], "height": m.shape[0]})
        for c in range(len(CLASSES)):
            if (m == c).any():
                rle = mask_utils.encode(np.asfortranarray((m == c).astype(np.uint8)))
                anns.append({"id": len(anns) + 1, "image_id": k, "category_id": c + 1, "iscrowd": 0,
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    # a polygon painted last, over the RLE regions: a Car rectangle x 10-49, y 20-39 in the first frame
    anns.append({"id": len(anns) + 1, "image_id": 0, "category_id": CLASSES.index("Car") + 1, "iscrowd": 0,
                 "segmentation": [[10, 20, 50, 20, 50, 40, 10, 40]]})
    (tmp_path / "images").mkdir()
    for s in stems:
        (tmp_path / "images" / f"{s}.jpg").symlink_to(CAMVID / "train" / f"{s}.jpg")
    f = tmp_path / "instances_train.json"
    f.write_text(json.dumps({"images": images, "annotations": anns,
                             "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]}))
    ds = read_dataset(f)
    assert ds.classes == ["background", *CLASSES] and {it.split for it in ds.items} == {"train"}
    for it in ds.items:
        m = np.asarray(Image.open(CAMVID / "trainannot" / f"{it.image.stem}.png"))
        want = np.where(m == VOID, 0, m + 1)  # void: no object, background
        if it.image.stem == stems[0]:
            want[20:40, 10:50] = CLASSES.index("Car") + 1
        assert np.array_equal(load_mask(ds, it), want)


def test_given_splits_are_kept_and_a_missing_one_is_carved_reproducibly(tmp_path):
    ds = read_dataset(CAMVID, ignore_index=VOID)
    parts = split_dataset(ds, seed=0)
    assert len(parts["train"]) == 367 and len(parts["val"]) == 101 and not parts["test"]
    root = _folders(tmp_path / "f", _stems("train", 20), "\n".join(CLASSES), lambda m: Image.fromarray(m))
    ds = read_dataset(root, ignore_index=VOID)
    a, b, c = split_dataset(ds, 0.2, 0.1, seed=1), split_dataset(ds, 0.2, 0.1, seed=1), split_dataset(ds, 0.2, 0.1, 2)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 4, 2)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(20))


# --- check -----------------------------------------------------------------------

def test_check_finds_planted_size_mismatch_unknown_values_and_unpaired_files(tmp_path):
    stems = _stems("train", 5)
    root = _folders(tmp_path / "f", stems, "\n".join(CLASSES), lambda m: Image.fromarray(m))
    masks = root / "masks"
    m = np.asarray(Image.open(masks / f"{stems[0]}.png"))
    Image.fromarray(m).resize((240, 180), Image.NEAREST).save(masks / f"{stems[0]}.png")  # half size
    m = np.asarray(Image.open(masks / f"{stems[1]}.png")).copy()
    m[:10, :10] = 42  # a value no class has
    Image.fromarray(m).save(masks / f"{stems[1]}.png")
    (masks / f"{stems[2]}.png").unlink()  # an image without its mask
    shutil.copy(masks / f"{stems[3]}.png", masks / "orphan.png")  # a mask without its image

    rep = check_dataset(root, ignore_index=VOID)
    assert not rep.clean
    assert [Path(e["mask"]).name for e in rep.size_mismatch] == [f"{stems[0]}.png"]
    assert rep.size_mismatch[0]["mask_size"] == [240, 180] and rep.size_mismatch[0]["image_size"] == [480, 360]
    assert [(Path(u["mask"]).name, u["values"]) for u in rep.unknown_values] == [(f"{stems[1]}.png", [42])]
    assert [Path(p).name for p in rep.missing_mask] == [f"{stems[2]}.jpg"]
    assert [Path(p).name for p in rep.missing_image] == ["orphan.png"]
    assert abs(sum(rep.pixel_share.values()) - 1) < 1e-3
    text = "\n".join(rep.warnings)
    assert "--ignore-index 42" in text and "240x180" in text
    # with CamVid's void left at the default ignore value, 11 is an unknown value in every mask
    rep = check_dataset(root)
    assert {v for u in rep.unknown_values for v in u["values"]} == {11, 42}


def test_a_hostile_mask_png_is_named_and_the_rest_still_checked(tmp_path):
    """A 144-megapixel mask (a few hundred KB as PNG) is refused before it is
    decoded, with its name and the fix; the other pairs are still checked."""
    stems = _stems("train", 3)
    root = _folders(tmp_path / "f", stems, "\n".join(CLASSES), lambda m: Image.fromarray(m))
    Image.new("L", (12_000, 12_000), 0).save(root / "masks" / f"{stems[0]}.png")
    rep = check_dataset(root, ignore_index=VOID)
    assert not rep.clean
    assert len(rep.problems) == 1 and f"{stems[0]}.png" in rep.problems[0] and "pixel limit" in rep.problems[0]
    assert not rep.size_mismatch and abs(sum(rep.pixel_share.values()) - 1) < 1e-3  # the two others were read


def test_check_names_a_frame_planted_in_train_and_val(tmp_path):
    """A CamVid subset with one training frame planted again in val, once
    as the same bytes and once re-encoded smaller: `imgclf check` reports
    the leak by the files' names (as for classification and detection);
    --near-dup off does not search, and embed is refused with the fix."""
    data = _camvid_subset(tmp_path / "cv", 4, 2)  # consecutive frames: near-identical within train
    frame = _stems("train", 200)[-1]  # a frame from another part of the drive, with none of its neighbours
    (data / "train" / f"{frame}.jpg").symlink_to(CAMVID / "train" / f"{frame}.jpg")
    (data / "trainannot" / f"{frame}.png").symlink_to(CAMVID / "trainannot" / f"{frame}.png")
    shutil.copy(CAMVID / "train" / f"{frame}.jpg", data / "val" / "planted_same.jpg")
    Image.open(CAMVID / "train" / f"{frame}.jpg").resize((400, 300)).save(data / "val" / "planted_small.jpg",
                                                                          quality=70)
    for name in ("planted_same", "planted_small"):
        shutil.copy(CAMVID / "trainannot" / f"{frame}.png", data / "valannot" / f"{name}.png")
        if name == "planted_small":
            Image.open(data / "valannot" / f"{name}.png").resize((400, 300), Image.NEAREST).save(
                data / "valannot" / f"{name}.png")

    rep = check_dataset(data, ignore_index=VOID)
    assert not rep.clean and len(rep.leaks) == 1, rep.leaks
    g = rep.leaks[0]
    assert sorted(zip(g.files, g.splits)) == [(f"train/{frame}.jpg", "train"), ("val/planted_same.jpg", "val"),
                                              ("val/planted_small.jpg", "val")]
    p = imgclf("check", data, "--ignore-index", VOID)
    leak = p.stdout.split("leakage across splits (1 group(s)):", 1)[1].splitlines()[1]
    assert f"train/{frame}.jpg (train)" in leak and "val/planted_same.jpg (val)" in leak
    assert "val/planted_small.jpg (val)" in leak and "near-identical" in leak
    assert "span the given split (leakage" in p.stdout and "NOT clean" in p.stdout
    off = imgclf("check", data, "--ignore-index", VOID, "--near-dup", "off").stdout
    assert "leakage across splits" not in off and "nothing (--near-dup off)" in off
    refused = imgclf("check", data, "--near-dup", "embed", check=False)
    assert refused.returncode != 0 and "--near-dup embed" in refused.stderr + refused.stdout


def test_check_warns_about_classes_under_half_a_percent(tmp_path):
    stems = _stems("train", 3)

    def rare_pedestrians(m):  # all but 40 pedestrian pixels of each frame become road
        m = m.copy()
        ys, xs = np.nonzero(m == 9)
        m[ys[40:], xs[40:]] = 3
        return Image.fromarray(m)

    rep = check_dataset(_folders(tmp_path / "f", stems, "\n".join(CLASSES), rare_pedestrians), ignore_index=VOID)
    assert rep.clean and 0 < rep.pixel_share["Pedestrian"] < 0.005
    warned = {c for c in CLASSES if any(f"{c!r}" in w for w in rep.warnings)}
    assert warned == {c for c, v in rep.pixel_share.items() if v < 0.005} and "Pedestrian" in warned
    assert "Road" not in warned


def test_training_refuses_values_outside_the_class_list_and_names_the_fix(tmp_path):
    from imgclf.config import TrainConfig

    data = _camvid_subset(tmp_path / "cv", 4, 2)
    with pytest.raises(DataError) as e:
        verbs("segment").train(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, image_size=64))
    assert "--ignore-index 11" in e.value.fix


# --- training, resume, answers -------------------------------------------------------

TRAIN = """
import logging
import sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from imgclf.config import TrainConfig
from imgclf.tasks import verbs
verbs("segment").train(TrainConfig(data=sys.argv[1], out=sys.argv[2], ignore_index=11, image_size=128,
                                   epochs=3, seed=0, resume=sys.argv[3] == "resume"))
"""


def _train(data: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(data), str(out), "resume" if resume else "new"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run killed (SIGKILL) after its first epoch's checkpoint, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("seg")
    data, out = _camvid_subset(tmp / "cv", 24, 8), tmp / "run"
    p = _train(data, out)
    t0 = time.time()
    while not (out / "last.pt").exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = len(__import__("torch").load(out / "last.pt", weights_only=True)["history"])
    assert not (out / "model.pt").exists()
    p = _train(data, out, resume=True)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log
    return data, out, killed_at, log


def test_a_short_training_beats_a_bound_and_resumes_after_kill_9(trained):
    data, out, killed_at, log = trained
    assert killed_at < 3 and f"resuming {out}: {killed_at} epochs done" in log
    hist = (out / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in hist[1:]] == ["1", "2", "3"]
    ev = json.loads((out / "eval_val.json").read_text())
    # 24 frames, 3 epochs at 128 px on a frozen trunk: always-"Road" scores an mIoU near 0.03
    assert ev["miou"] > 0.15 and ev["pixel_accuracy"] > 0.55
    assert set(ev["iou_per_class"]) == set(CLASSES) and ev["ignore_index"] == VOID
    assert json.loads((out / "config.json").read_text())["task"] == "segment"


def test_predict_answers_shares_and_a_full_size_mask_and_saves_masks(trained, tmp_path):
    data, out, _, _ = trained
    task = verbs("segment")
    model = task.load(out, device="cpu")
    img = next((data / "val").iterdir())
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"hello")
    res = model.predict([str(img), str(bad)])
    assert res[0]["mask"].shape == (360, 480) and res[0]["mask"].dtype == np.uint8
    assert abs(sum(res[0]["classes"].values()) - 1) < 1e-3 and set(res[0]["classes"]) <= set(CLASSES)
    assert "error" in res[1] and "mask" not in res[1]
    j = json.loads(task.format_answers(res, "json"))
    import base64
    import io
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(j[0]["mask_png"]))))
    assert np.array_equal(back, res[0]["mask"])
    assert task.save_masks(res, model.classes, tmp_path / "masks") == 1
    saved = sorted((tmp_path / "masks").iterdir())
    assert [p.suffix for p in saved] == [".png", ".jpg"]
    assert np.array_equal(np.asarray(Image.open(saved[0])), res[0]["mask"])
    assert Image.open(saved[1]).size == (480, 360)


def test_evaluate_on_another_dataset_scores_every_image(trained):
    from imgclf.config import EvaluateConfig

    data, out, _, _ = trained
    m = verbs("segment").evaluate(EvaluateConfig(run=str(out), data=str(data), split="val", device="cpu"))
    same = json.loads((out / "eval_val.json").read_text())
    assert m["n"] == 8 and abs(m["miou"] - same["miou"]) < 1e-9
    assert (out / "report" / "index.html").read_text().count("<img") >= 2


def test_two_gloo_ranks_train_one_run(tmp_path):
    """`imgclf train --nproc-per-node 2`: torchrun, two CPU processes (gloo),
    each a share of every batch and of validation; rank 0 writes the run."""
    data, out = _camvid_subset(tmp_path / "cv", 8, 4), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--ignore-index", "11",
                        "--image-size", "64", "--epochs", "2", "--nproc-per-node", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["backend"] == "gloo"
    assert summary["epochs_run"] == 2 and (out / "model.pt").exists()
    ev = json.loads((out / "eval_val.json").read_text())
    assert ev["n"] == 4 and 0 <= ev["miou"] <= 1
