"""Detection's parts on real BCCD images: the model, its augmentation and the
COCO metrics. Training through `imgclf train` is tests/test_detect_cli.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.loop import AugmentedImages
from imgclf.tasks.detect.metrics import coco_metrics
from imgclf.tasks.detect.model import HEADS, Detector, detection_loss, train_transform
from tests.conftest import DATASETS, need


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with `make test`'s two workers on two cores, two
    threads each made a detection training step about 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bccd() -> DetDataset:
    return read_dataset(need(DATASETS / "bccd"))


def test_augmentation_moves_boxes_with_the_pixels(bccd):
    """A box drawn into the image as a solid patch is found under the
    transformed box after scale jitter, crop and flip."""
    from torchvision import tv_tensors

    torch.manual_seed(0)
    img = torch.zeros(3, 480, 640, dtype=torch.uint8)
    img[:, 100:200, 300:420] = 255
    target = {"boxes": tv_tensors.BoundingBoxes([[300, 100, 420, 200]], format="XYXY", canvas_size=(480, 640)),
              "labels": torch.tensor([1])}
    tf = train_transform(256)
    for _ in range(10):
        out, t = tf(tv_tensors.Image(img), target)
        assert out.shape == (3, 256, 256) and out.dtype == torch.float32
        white = (out[0] > 0.5).nonzero()
        if len(t["boxes"]) == 0:  # cropped away (or under 2 px left)
            assert len(white) < 2 * 256
            continue
        extent = [white[:, 1].min(), white[:, 0].min(), white[:, 1].max() + 1, white[:, 0].max() + 1]
        assert torch.allclose(torch.stack(extent).float(), t["boxes"][0].as_subclass(torch.Tensor).float(),
                              atol=2.0), (extent, t["boxes"])


@pytest.mark.parametrize("head", HEADS)
def test_forward_returns_logits_and_the_loss_is_outside(bccd, head):
    model = Detector(3, image_size=256, head=head)
    ds = AugmentedImages(bccd, [0, 1], 256)
    x = torch.stack([ds[0][0], ds[1][0]])
    targets = [{"boxes": ds[i][1]["boxes"].as_subclass(torch.Tensor), "labels": ds[i][1]["labels"]} for i in (0, 1)]
    model.train()
    out = model(x)
    n = sum(out["per_level"])
    assert out["head"]["cls_logits"].shape == (2, n, 3) and out["head"]["bbox_regression"].shape == (2, n, 4)
    assert out["anchors"][0].shape == (n, 4)  # one anchor (or FCOS location) per output row
    assert sum(p.numel() for p in model.det.backbone.body.parameters() if p.requires_grad) == 0  # frozen trunk
    loss = sum(detection_loss(model, out, targets).values())
    loss.backward()
    assert all(p.grad is not None for p in model.det.head.parameters())
    with pytest.raises(Exception, match="head='yolo'"):
        Detector(3, head="yolo", pretrained=False)


def test_coco_metrics_of_the_truth_and_of_shifted_boxes(bccd):
    """The ground truth scores 1.0; boxes shifted by half their width (one
    third overlap with their own object; a few land on a touching neighbour)
    score near 0 at IoU .5; F1 thresholds come from the scores."""
    gt = DetDataset(bccd.classes, bccd.images[:5], "voc", bccd.root)
    perfect = [{"boxes": im.boxes, "scores": np.linspace(0.9, 0.5, len(im.boxes)), "labels": im.labels} for im in gt.images]
    m = coco_metrics(gt, perfect)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert set(m["ap_per_class"]) == set(bccd.classes) and m["f1"]["RBC"] == pytest.approx(1.0)
    assert 0.5 <= m["thresholds"]["RBC"] <= 0.9
    half = [{**p, "boxes": p["boxes"] + np.c_[(p["boxes"][:, 2] - p["boxes"][:, 0]) / 2, np.zeros(len(p["boxes"])),
                                              (p["boxes"][:, 2] - p["boxes"][:, 0]) / 2, np.zeros(len(p["boxes"]))]}
            for p in perfect]
    assert coco_metrics(gt, half)["map50"] < 0.02
    none = coco_metrics(gt, [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []}] * 5)
    assert none["map"] == 0.0 and none["thresholds"]["RBC"] == 1.0


