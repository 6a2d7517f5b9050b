"""Detection through the real CLI on BCCD subsets: `imgclf train` chooses the
task from VOC labels, trains, keeps the best epoch and scores the held-out
split; `predict` answers boxes; `evaluate` scores another dataset in another
format; a run killed with SIGKILL resumes; two gloo ranks train one run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from faster_coco_eval.core import mask as mask_utils
from PIL import Image, ImageDraw

from imgclf.config import EvaluateConfig, ExportConfig
from imgclf.deploy.export import export
from imgclf.errors import ExportError
from imgclf.tasks import task_for_data
from imgclf.tasks.detect import export as det_export
from imgclf.tasks.detect.evaluate import evaluate
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.formats.write import write_yolo
from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
from imgclf.tasks.detect.torch_predictor import TorchDetPredictor
from tests.conftest import DATASETS, imgclf, need

BCCD = DATASETS / "bccd"
# mAP@.5 over BCCD's three classes on the 16 test images after the short run
# below. An untrained head scores about 0 (it starts at a 1% prior, below the
# candidate score); the run reached 0.6-0.75 on this subset.
MAP50_BOUND = 0.40
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bccd_voc(dst: Path, n_train: int = 32, n_val: int = 8, n_test: int = 16) -> Path:
    """A VOC folder of BCCD's first images, with its own train/val/test lists."""
    need(BCCD)
    (dst / "Annotations").mkdir(parents=True)
    (dst / "JPEGImages").mkdir()
    (dst / "ImageSets" / "Main").mkdir(parents=True)
    xmls = sorted((BCCD / "Annotations").glob("*.xml"))[: n_train + n_val + n_test]
    for xml in xmls:
        shutil.copy(xml, dst / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{xml.stem}.jpg", dst / "JPEGImages")
    cuts = {"train": xmls[:n_train], "val": xmls[n_train:n_train + n_val], "test": xmls[n_train + n_val:]}
    for split, files in cuts.items():
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{x.stem}\n" for x in files))
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("det")
    data = bccd_voc(root / "bccd")
    out = root / "run"
    p = subprocess.run([sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--epochs", "10",
                        "--image-size", "256"], capture_output=True, text=True, timeout=900, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    return data, out, p


def test_train_chooses_detect_from_voc_labels_and_beats_a_bound(trained):
    data, out, p = trained
    assert task_for_data(data) == "detect" and task_for_data(DATASETS / "cats_dogs_tiny") == "classify"
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "detect" and config["batch_size"] == 4 and config["model"] == "efficientnet_lite0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] == "test" and summary["test"]["images"] == 16
    assert summary["test"]["map50"] > MAP50_BOUND, p.stdout
    assert summary["test"]["ap50_per_class"]["RBC"] > 0.5
    # The kept epoch is the best by val mAP, and model.pt holds its weights.
    rows = [r for r in (out / "history.csv").read_text().splitlines()[1:]]
    assert len(rows) >= 2 and "best epoch" in p.stdout and "val mAP" in p.stdout
    evaluated = json.loads((out / "eval_test.json").read_text())
    assert evaluated["map"] == pytest.approx(summary["test"]["map"])
    assert "Platelets" in p.stdout and "boxes in 56 images" in p.stdout  # the data described once
    assert (out / "report" / "index.html").is_file()


def test_predict_answers_boxes_in_the_original_pixels(trained, tmp_path):
    data, out, _ = trained
    img = sorted((data / "JPEGImages").glob("*.jpg"))[-1]
    (ans,) = json.loads(imgclf("predict", out, img, "--format", "json").stdout)
    assert ans["width"] == 640 and ans["height"] == 480 and ans["boxes"]
    for b in ans["boxes"]:
        x1, y1, x2, y2 = b["box"]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480 and b["label"] in ("Platelets", "RBC", "WBC")
    # --conf 0.9 keeps a subset of --conf 0.1's boxes; CSV has one row per box.
    high = json.loads(imgclf("predict", out, img, "--format", "json", "--conf", "0.9").stdout)[0]["boxes"]
    low = json.loads(imgclf("predict", out, img, "--format", "json", "--conf", "0.1").stdout)[0]["boxes"]
    assert len(high) < len(low) and all(b["score"] >= 0.9 for b in high)
    rows = imgclf("predict", out, img, "--format", "csv", "--conf", "0.1").stdout.strip().splitlines()
    assert rows[0].startswith("path,label,score,x1") and len(rows) == len(low) + 1
    imgclf("predict", out, img, "--save-images", tmp_path / "drawn")
    assert len(list((tmp_path / "drawn").glob("*.jpg"))) == 1
    bad = imgclf("predict", out, img, "--top-k", "1", "--reject", "maybe", check=False)
    assert bad.returncode == 2 and "--reject" in bad.stderr


def test_evaluate_scores_another_dataset_in_another_format(trained, tmp_path):
    """The run's test images written as YOLO score what the run's own split does."""
    data, out, _ = trained
    ds = read_dataset(data)
    ds.images = [im for im in ds.images if im.split == "test"]
    for im in ds.images:
        im.split = None
    write_yolo(ds, tmp_path / "yolo")
    imgclf("evaluate", out, tmp_path / "yolo", "--no-report")
    other = json.loads((out / "eval_data.json").read_text())
    own = json.loads((out / "eval_test.json").read_text())
    assert other["images"] == 16
    assert other["map"] == pytest.approx(own["map"], abs=1e-6)
    assert set(other["ap_per_class"]) == {"Platelets", "RBC", "WBC"}


def test_killed_detection_run_resumes(tmp_path):
    data = bccd_voc(tmp_path / "bccd", 12, 4, 4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "imgclf", "train", str(data), "--out", str(out), "--epochs", "30",
           "--image-size", "192", "--patience", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and (not (out / "history.csv").exists()
                                      or len((out / "history.csv").read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.pt").exists() and (out / "last.pt").exists()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]  # the checkpoint's count (history may be ahead)
    p = imgclf("train", "--resume", "--out", out, "--epochs", "30")
    assert f"resuming {out}: {done} epochs done" in p.stdout
    epochs = [int(r.split(",")[0]) for r in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == list(range(1, 31))  # no epoch lost, none repeated
    assert (out / "model.pt").exists() and json.loads((out / "summary.json").read_text())["epochs_run"] == 30


def test_two_gloo_ranks_train_one_detection_run(tmp_path):
    data = bccd_voc(tmp_path / "bccd", 12, 4, 4)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "imgclf", "train", str(data), "--out", str(out), "--epochs", "2", "--image-size", "192"],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("epoch 1/2") == 1 and p.stdout.count("best epoch") == 1  # rank 0 alone speaks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["backend"] == "gloo"
    assert (out / "model.pt").exists() and summary["test"]["images"] == 4


@pytest.fixture(scope="module")
def penn_masks(tmp_path_factory) -> tuple[Path, Path]:
    """20 Penn-Fudan photos with their instance-id PNGs, trained 3 epochs at 192 px through the CLI."""
    penn = need(DATASETS / "pennfudan")
    data = tmp_path_factory.mktemp("penn") / "penn"
    (data / "PNGImages").mkdir(parents=True)
    (data / "PedMasks").mkdir()
    for img in sorted((penn / "PNGImages").glob("*.png"))[:20]:
        shutil.copy(img, data / "PNGImages")
        shutil.copy(penn / "PedMasks" / f"{img.stem}_mask.png", data / "PedMasks")
    out = data.parent / "run"
    imgclf("train", data, "--out", out, "--epochs", "3", "--image-size", "192")
    return data, out


def test_instance_masks_are_learnt_answered_and_scored(penn_masks):
    """Penn-Fudan's instance-id PNGs: the detector gains a mask branch, the
    answer carries each mask as COCO RLE in the image's pixels, and the
    evaluation scores the masks with the COCO evaluator ("segm")."""
    data, out = penn_masks
    assert json.loads((out / "config.json").read_text())["task"] == "detect"
    m = json.loads((out / "eval_test.json").read_text())
    assert 0 <= m["mask_map"] <= 1 and "mask_map50" in m
    img = sorted((data / "PNGImages").glob("*.png"))[0]
    (ans,) = json.loads(imgclf("predict", out, img, "--format", "json", "--conf", "0.05").stdout)
    assert ans["boxes"], ans
    for b in ans["boxes"][:5]:
        mask = mask_utils.decode({"size": b["mask"]["size"], "counts": b["mask"]["counts"].encode()})
        assert mask.shape == (ans["height"], ans["width"])
        ys, xs = mask.nonzero()
        if len(xs):  # the mask lies inside its box (pasted there)
            x1, y1, x2, y2 = b["box"]
            assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1
        # the same object as COCO polygons: drawn back, they cover the RLE's pixels
        drawn = Image.new("1", (ans["width"], ans["height"]))
        for poly in b["polygons"]:
            assert len(poly) >= 6 and len(poly) % 2 == 0
            ImageDraw.Draw(drawn).polygon(poly, fill=1)
        drawn = np.asarray(drawn, bool)
        if mask.sum() >= 100:
            assert (drawn & mask.astype(bool)).sum() / (drawn | mask.astype(bool)).sum() >= 0.85


def _mask_iou(a: dict, b: dict) -> float:
    x, y = (mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool) for m in (a, b))
    union = (x | y).sum()
    return float((x & y).sum() / union) if union else 1.0


def test_int8_of_a_mask_run_is_gated_on_the_masks_too(penn_masks, tmp_path):
    """The mask branch reads the INT8 trunk's maps, so the gate compares
    mask mAP@.5 as well as box mAP@.5 on val, and a drop of either
    over --max-drop refuses the file, naming the metric that dropped most
    (it used to compare boxes only)."""
    _, out = penn_masks
    r = export(ExportConfig(str(out), int8=True, max_drop=100, out=str(tmp_path / "a.onnx"), check_images=4,
                            calib_images=8))
    assert {"fp32_map50", "int8_map50", "fp32_mask_map50", "int8_mask_map50", "mask_map50_change_points"} <= set(r)
    box, masks = -r["map50_change_points"], -r["mask_map50_change_points"]
    with pytest.raises(ExportError, match=r"INT8 mask mAP@\.5 drops" if masks > box else r"INT8 mAP@\.5 drops"):
        export(ExportConfig(str(out), int8=True, max_drop=max(box, masks) - 0.05, out=str(tmp_path / "b.onnx"),
                            check_images=4, calib_images=8))
    assert not (tmp_path / "b.onnx").exists()


def test_instance_masks_export_to_onnx_and_answer_as_pytorch(penn_masks, monkeypatch, tmp_path):
    """`imgclf export` of a run with instance masks: the graph also gives each
    detection's 28 x 28 mask, the gate compares them with PyTorch's (mask IoU
    per matched detection), and the .onnx alone (torch unimportable) answers
    masks as COCO RLE in the photo's pixels that agree with PyTorch's, through
    predict and the server; evaluate scores them as the run does. A graph
    whose masks are wrong is refused and not written."""
    data, out = penn_masks
    r = export(ExportConfig(str(out), check_images=4))
    path = out / "model.onnx"
    assert [o.name for o in onnx.load(str(path)).graph.output][-1] == "masks" and "note" not in r
    assert r["parity_masks_compared"] == r["parity_matched"] > 0
    assert r["parity_mask_min_iou"] >= det_export.MIN_MASK_IOU and r["parity_mask_max_prob_diff"] < 1e-3
    imgs = [str(p) for p in sorted((data / "PNGImages").glob("*.png"))[:2]]
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        from imgclf.tasks import load
        print("ANSWERS", json.dumps(load({str(path)!r}).predict({imgs!r}, conf=0.1)))
        from imgclf.tasks.detect.onnx_predictor import OnnxDetPredictor
        opened = OnnxDetPredictor.__init__
        def at_0_1(self, *a, **k):  # the server answers at each class's threshold: 0.1, as above, for boxes to show
            opened(self, *a, **k)
            self.thresholds = self.thresholds * 0 + 0.1
        OnnxDetPredictor.__init__ = at_0_1
        from fastapi.testclient import TestClient
        from imgclf.deploy.serve import ServeConfig, create_app
        with TestClient(create_app(ServeConfig({str(path)!r}))) as c:
            j = c.post("/v1/predict", files={{"file": ("a.png", open({imgs[0]!r}, "rb").read())}}).json()
        print("SERVED", json.dumps(j["predictions"][0]))
        print("TORCH_FREE_OK", [m for m in ("torch", "torchvision", "timm") if sys.modules.get(m) is not None])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0 and "TORCH_FREE_OK []" in p.stdout, p.stdout + p.stderr
    got = json.loads(p.stdout.split("ANSWERS ", 1)[1].splitlines()[0])
    served = json.loads(p.stdout.split("SERVED ", 1)[1].splitlines()[0])
    want = TorchDetPredictor.from_run(out, device="cpu").predict(imgs, conf=0.1)
    assert got[0]["boxes"] and served["boxes"] == got[0]["boxes"]  # masks and all
    for g, w in zip(got, want):
        assert [b["label"] for b in g["boxes"]] == [b["label"] for b in w["boxes"]]
        for gb, wb in zip(g["boxes"], w["boxes"]):
            assert gb["mask"]["size"] == [g["height"], g["width"]]
            assert _mask_iou(gb["mask"], wb["mask"]) >= 0.9
    own = (out / "eval_test.json").read_text()
    try:
        m = evaluate(EvaluateConfig(run=str(out), report=False), pred=OnnxDetPredictor(path))
    finally:
        (out / "eval_test.json").write_text(own)
    assert abs(m["mask_map"] - json.loads(own)["mask_map"]) <= 0.01

    flipped = det_export.MaskGraph.forward
    monkeypatch.setattr(det_export.MaskGraph, "forward", lambda self, *a: 1 - flipped(self, *a))
    with pytest.raises(ExportError, match=r"mask IoU min \d"):
        export(ExportConfig(str(out), out=str(tmp_path / "bad.onnx"), check_images=4))
    assert not (tmp_path / "bad.onnx").exists()


def test_check_routes_detection_labels_and_fix_writes_a_cleaned_copy(tmp_path):
    data = bccd_voc(tmp_path / "voc", 4, 1, 1)
    xml = data / "Annotations" / "BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>RBC</name><bndbox><xmin>600</xmin>"
                                           "<ymin>10</ymin><xmax>700</xmax><ymax>90</ymax></bndbox></object></annotation>"))
    p = imgclf("check", data)
    assert "detection labels (voc)" in p.stdout and "outside the image: " in p.stdout and "not clean" in p.stdout
    report = json.loads(imgclf("check", data, "--json").stdout)
    assert report["boxes_per_class"]["RBC"] > 0 and len(report["outside"]) == 1
    p = imgclf("check", data, "--fix", "--fix-out", tmp_path / "clean.json")
    assert "clipped 1" in p.stdout and (tmp_path / "clean.json").is_file()
    assert "clean" in imgclf("check", tmp_path / "clean.json").stdout.splitlines()[-1]
    # --task classify on the same folder: read as class folders (Annotations, JPEGImages), not as boxes.
    assert "detection labels" not in imgclf("check", data, "--task", "classify", check=False).stdout
