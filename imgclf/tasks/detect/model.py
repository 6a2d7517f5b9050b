"""The detector: a pretrained EfficientNet-Lite backbone, a feature pyramid
(P3-P7) and torchvision's RetinaNet (default) or FCOS head, plus box-aware
augmentation. RetinaNet with anchors from 16 px was ahead of FCOS on a BCCD
val split, mostly on the small platelets (docs/benchmarks.md).

`Detector.forward(images)` returns the raw head outputs (class logits, box
regression, centre-ness) and the anchors (`forward_features` then
`forward_head`, as imgclf's classifiers split); `detection_loss` and
`Detector.predict` turn them into a loss or into boxes. torchvision's
detection models compute the loss inside `forward`; here the model's own
`compute_loss` and `postprocess_detections` are called from outside so the
training loop, not the model, owns the loss, and an export sees only the
network. Images go in as a float batch in [0, 1] of one size (square, the
input size): the letterbox resize happens in the data pipeline, which keeps
every batch the same shape (cheap to collate, simple to export).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from imgclf.errors import ConfigError
from imgclf.models.registry import get_model_info
from imgclf.tasks.detect.masks import MaskBranch, mask_loss

HEADS = ("fcos", "retinanet")


class LiteFeatures(nn.Module):
    """timm's EfficientNet-Lite trunk cut after the stages that end at
    strides 8, 16 and 32 (C3, C4, C5); its 1x1 head conv and classifier are
    never run."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        info = net.feature_info  # one entry per stage end: num_chs, reduction, module "blocks.N"
        wanted = {8: None, 16: None, 32: None}
        for f in info:
            if f["reduction"] in wanted and f["module"].startswith("blocks."):
                wanted[f["reduction"]] = (int(f["module"].split(".")[1]), f["num_chs"])
        self.taps = [wanted[r][0] for r in (8, 16, 32)]
        self.out_channels = [wanted[r][1] for r in (8, 16, 32)]
        self.blocks = nn.Sequential(*list(net.blocks.children())[: self.taps[-1] + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.taps:
                out.append(x)
        return out


class _Backbone(nn.Module):
    """Trunk + FPN, shaped as torchvision's detection models expect (an
    `out_channels` attribute, an ordered dict of maps)."""

    def __init__(self, trunk: LiteFeatures, channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelP6P7,
        )

        self.body = trunk
        self.fpn = FeaturePyramidNetwork(trunk.out_channels, channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class Detector(nn.Module):
    """num_classes object classes (no background class: both heads score
    each class with its own sigmoid)."""

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", head: str = "retinanet",
                 image_size: int = 320, channels: int = 64, head_convs: int = 2, pretrained: bool = True,
                 weights: str | None = None, freeze_backbone: bool = True, masks: bool = False):
        super().__init__()

        if head not in HEADS:
            raise ConfigError(f"head={head!r} is unknown", f"choose one of {', '.join(HEADS)}")
        if not backbone.startswith("efficientnet_lite"):
            raise ConfigError(f"backbone={backbone!r}: detection uses an EfficientNet-Lite backbone",
                              "choose efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2")
        net, _ = get_model_info(backbone).build(pretrained=pretrained, weights=weights)
        self.config = {"num_classes": num_classes, "backbone": backbone, "head": head, "image_size": image_size,
                           "channels": channels, "head_convs": head_convs, "masks": masks}
        self.num_classes, self.image_size, self.head_name = num_classes, image_size, head
        self.det = _build_head(head, _Backbone(LiteFeatures(net), channels), num_classes, image_size, head_convs)
        self.mask_branch = MaskBranch(channels, num_classes) if masks else None  # instance masks (masks.py)
        self.freeze_backbone(freeze_backbone)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """A frozen trunk keeps its ImageNet weights and batch-norm statistics."""
        self.frozen = frozen
        for p in self.det.backbone.body.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        if getattr(self, "frozen", False):
            self.det.backbone.body.eval()
        return self

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's C3, C4, C5 maps for (B, 3, S, S) floats in [0, 1]. With
        a frozen trunk these can be computed once and cached (`fit(cache=True)`)."""
        return self.det.backbone.body((images - 0.5) / 0.5)  # the Lite weights expect pixels in [-1, 1]

    def forward_head(self, feats: list[torch.Tensor], size: tuple[int, int]) -> dict:
        """FPN and head on trunk maps of (B, 3, *size) images. Returns the
        head's raw outputs (logits; one row per location or anchor, all
        levels concatenated), the anchors, and their number per level."""
        from torchvision.models.detection.image_list import ImageList

        pyramid = list(self.det.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        head = self.det.head(pyramid)
        sizes = [tuple(size)] * feats[0].shape[0]
        # The generator reads the strides off the image tensor's shape: an empty one of that shape will do.
        anchors = self.det.anchor_generator(ImageList(feats[0].new_empty((0, 0, *size)), sizes), pyramid)
        per_level = [f.shape[2] * f.shape[3] for f in pyramid]
        a = head["cls_logits"].shape[1] // sum(per_level)  # anchors per location (1 for FCOS)
        return {"head": head, "anchors": anchors, "per_level": [n * a for n in per_level], "sizes": sizes,
                "pyramid": pyramid, "size": tuple(size)}

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> dict:
        """Images (B, 3, S, S), or the trunk's cached maps of such images (a
        list): training on cached maps goes through `forward` too, so a
        DDP-wrapped model synchronises its gradients either way."""
        if isinstance(x, (list, tuple)):
            return self.forward_head(list(x), (self.image_size, self.image_size))
        return self.forward_head(self.forward_features(x), (int(x.shape[-2]), int(x.shape[-1])))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float = 0.05) -> list[dict[str, torch.Tensor]]:
        """Boxes (in the input's pixels), scores and labels per image, after
        NMS; with a mask branch also "masks": (K, 28, 28) probabilities in each box."""
        out = self.forward(images)
        dets = self.postprocess(out, score_thresh)
        if self.mask_branch is not None:
            logits = self.mask_branch(out["pyramid"], [d["boxes"] for d in dets], out["size"])
            labels = torch.cat([d["labels"] for d in dets])
            probs = logits[torch.arange(len(labels)), labels].sigmoid().split([len(d["boxes"]) for d in dets])
            for d, p in zip(dets, probs):
                d["masks"] = p
        return dets

    def postprocess(self, out: dict, score_thresh: float = 0.05) -> list[dict[str, torch.Tensor]]:
        self.det.score_thresh = score_thresh
        split_head = {k: list(v.split(out["per_level"], dim=1)) for k, v in out["head"].items()}
        split_anchors = [list(a.split(out["per_level"])) for a in out["anchors"]]
        return self.det.postprocess_detections(split_head, split_anchors, out["sizes"])


def detection_loss(model: Detector, out: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The head's own losses (focal loss for classes, GIoU or L1 for boxes,
    centre-ness for FCOS) against targets {"boxes": (N, 4) xyxy in input
    pixels, "labels": (N,) class indices}; with a mask branch, the mask loss
    against their "masks" (N, S, S)."""
    if model.head_name == "fcos":
        losses = model.det.compute_loss(targets, out["head"], out["anchors"], out["per_level"])
    else:
        losses = model.det.compute_loss(targets, out["head"], out["anchors"])
    if model.mask_branch is not None:
        losses["mask"] = mask_loss(model.mask_branch, out["pyramid"], out["size"], targets)
    return losses


def _build_head(head: str, backbone: _Backbone, num_classes: int, image_size: int, head_convs: int) -> nn.Module:
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead

    c = backbone.out_channels
    common = {"min_size": image_size, "max_size": image_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                  "detections_per_img": 300, "topk_candidates": 1000}
    if head == "fcos":
        return FCOS(backbone, num_classes, head=FCOSHead(c, 1, num_classes, num_convs=head_convs),
                    anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5), **common)
    # Anchors from 16 px at stride 8 (torchvision's default starts at 32), so
    # that objects of 12-20 px at the input size still match an anchor.
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128, 256))
    gen = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(backbone, num_classes, anchor_generator=gen,
                     head=RetinaNetHead(c, gen.num_anchors_per_location()[0], num_classes,
                                        norm_layer=partial(nn.GroupNorm, 32)), **common)


# --- box-aware augmentation (torchvision.transforms.v2 moves the boxes with the pixels) ---

def train_transform(image_size: int, scale: tuple[float, float] = (0.6, 1.4), vflip: bool = False):
    """Scale jitter around the letterbox size, a random image_size square crop
    (padded where the image is smaller), flips, colour; boxes follow, and
    those left with under 2 px are dropped."""
    from torchvision.transforms import v2

    steps = [v2.ScaleJitter((image_size, image_size), scale_range=scale, antialias=True),
             v2.RandomCrop(image_size, pad_if_needed=True, fill=0),
             v2.RandomHorizontalFlip()]
    steps += [v2.RandomVerticalFlip()] if vflip else []
    steps += [v2.ColorJitter(0.2, 0.2, 0.2, 0.02), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2),
              v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


# --- the model record (what a detection run's model.pt holds) ---

RECORD_KEYS = ("task", "detector", "classes", "preprocess", "thresholds", "state_dict")


def detector_record(model: Detector, classes: list[str], preprocess: dict, thresholds: list[float],
                    extra: dict | None = None) -> dict:
    """Weights, the network's settings, classes, the letterbox and the
    per-class score thresholds: all `DetPredictor` needs, nothing to import."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format_version": 1, "task": "detect", "detector": dict(model.config), "classes": list(classes),
            "preprocess": preprocess, "thresholds": [float(t) for t in thresholds], "state_dict": sd, **(extra or {})}


def detector_from_record(rec: dict) -> Detector:
    """The network of a record, its weights loaded (no pretrained download or file needed)."""
    model = Detector(**rec["detector"], pretrained=False, freeze_backbone=True)
    model.load_state_dict(rec["state_dict"])
    return model.eval()
