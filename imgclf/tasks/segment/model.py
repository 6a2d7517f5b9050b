"""The segmenter: the pretrained EfficientNet-Lite trunk, its maps at strides
4, 8, 16 and 32 taken off by timm's FeatureListNet, and a light decoder:

    fpn     (default) a feature pyramid's top-down path, every level brought
            to stride 4 and summed (Panoptic FPN's semantic branch): the
            stride-4 map keeps thin things (poles, signs) a few pixels wide
    lraspp  torchvision's LR-ASPP head (MobileNetV3's): strides 8 and 32 only

`forward` takes a float batch in [0, 1] and returns class logits at the
input's resolution. The loss lives outside the model (`seg_loss`), so the
training loop owns it and an export sees only the network. Augmentation
moves image and mask together (`train_transform`): torchvision.transforms.v2
resizes a tv_tensors.Mask with nearest neighbour always, and colour jitter
touches the image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from torch import nn
from torchvision import tv_tensors
from torchvision.models.segmentation.lraspp import LRASPPHead
from torchvision.transforms import v2

from imgclf.errors import ConfigError
from imgclf.models.registry import get_model_info

DECODERS = ("fpn", "lraspp")


def _cbr(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNDecoder(nn.Module):
    def __init__(self, in_channels: list[int], channels: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_cbr(channels, channels) for _ in in_channels)
        self.fuse = _cbr(channels, channels)
        self.out_channels = channels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        levels = [self.smooth[-1](x)]
        for i in range(len(feats) - 2, -1, -1):  # top-down: sizes from the map below (odd sizes stay exact)
            x = self.lateral[i](feats[i]) + F.interpolate(x, size=feats[i].shape[-2:], mode="nearest")
            levels.append(self.smooth[i](x))
        size = feats[0].shape[-2:]
        return self.fuse(sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size
                             else m for m in levels))


class Segmenter(nn.Module):
    """num_classes classes per pixel (the ignore value is no class)."""

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", decoder: str = "fpn",
                 channels: int = 64, pretrained: bool = True, weights: str | None = None):
        super().__init__()
        if decoder not in DECODERS:
            raise ConfigError(f"decoder={decoder!r} is unknown", f"choose one of {', '.join(DECODERS)}")
        if not backbone.startswith("efficientnet_lite"):
            raise ConfigError(f"--model {backbone}: segmentation uses an EfficientNet-Lite backbone",
                              "choose efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2")
        net, _ = get_model_info(backbone).build(pretrained=pretrained, weights=weights)
        self.config = {"num_classes": num_classes, "backbone": backbone, "decoder": decoder, "channels": channels}
        self.trunk = FeatureListNet(net, out_indices=(1, 2, 3, 4), flatten_sequential=True)  # strides 4, 8, 16, 32
        chs = self.trunk.feature_info.channels()
        if decoder == "fpn":
            self.decoder = FPNDecoder(chs, channels)
            self.classifier = nn.Conv2d(channels, num_classes, 1)
        else:
            self.decoder = LRASPPHead(chs[1], chs[3], num_classes, max(channels, 128))
            self.classifier = nn.Identity()
        self.decoder_name = decoder
        self.frozen = False
        self.bn_frozen = False  # a thawed trunk keeps its ImageNet batch-norm statistics (TrainConfig.freeze_bn)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """A frozen trunk keeps its ImageNet weights and batch-norm statistics."""
        self.frozen = frozen
        for p in self.trunk.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        elif self.bn_frozen:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's maps at strides 4, 8, 16 and 32 of a float batch in [0, 1]."""
        return self.trunk((images - 0.5) / 0.5)  # the Lite weights expect pixels in [-1, 1]

    def decode(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        """Class logits at `size` (h, w) from the trunk's maps (cached ones train the decoder alone)."""
        if self.decoder_name == "fpn":
            out = self.classifier(self.decoder(feats))
        else:
            out = self.decoder({"low": feats[1], "high": feats[3]})
        return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(images), images.shape[-2:])


class DecoderOnly(nn.Module):
    """The segmenter from the trunk's maps on (what trains on cached maps, and
    what DDP wraps then): logits at `size` (h, w), the mask's."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        return self.model.decode(feats, size)


class SegLoss(nn.Module):
    """Cross-entropy over pixels, the ignore value left out, optionally with
    class weights (rare classes count more) and a soft Dice term (which
    weighs every class present alike, whatever its pixel count)."""

    def __init__(self, ignore_index: int, weight: torch.Tensor | None = None, dice: float = 0.0):
        super().__init__()
        self.ignore_index, self.dice = ignore_index, dice
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.dice:
            loss = loss + self.dice * dice_loss(logits, target, self.ignore_index)
        return loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    p = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, k - 1), k).permute(0, 3, 1, 2) * valid
    inter, total = (p * onehot).sum((0, 2, 3)), (p + onehot).sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    return 1 - ((2 * inter + 1) / (total + 1))[present].mean()


def median_frequency_weights(pixel_counts, cap: float = 10.0) -> torch.Tensor:
    """SegNet's class balancing: weight = median frequency / class frequency, capped."""
    c = torch.as_tensor(pixel_counts, dtype=torch.float64)
    f = c / c.sum().clamp_min(1)
    w = (f[f > 0].median() / f.clamp_min(1e-12)).clamp(max=cap)
    return w.float()


# --- augmentation: image and mask together -----------------------------------------

def train_transform(crop: int, ignore_index: int, scale: tuple[float, float] = (0.75, 1.5)):
    """On images already at the base size: a random scale, a random crop
    (padded with the ignore value where the image is smaller), a flip, and
    colour on the image only."""
    return v2.Compose([
        _RandomScale(scale),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.3, 0.3, 0.3, 0.02),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
    ])


class _RandomScale(nn.Module):
    """Resize by one random factor (aspect kept); v2.Resize picks nearest for masks."""

    def __init__(self, scale: tuple[float, float]):
        super().__init__()
        self.scale = scale

    def forward(self, image, mask):
        s = float(torch.empty(1).uniform_(*self.scale))
        h, w = image.shape[-2:]
        r = v2.Resize((max(1, round(h * s)), max(1, round(w * s))), antialias=True)
        return r(image, mask)



RECORD_KEYS = ("task", "segmenter", "classes", "state_dict", "image_size", "ignore_index")


def segmenter_from_record(rec: dict) -> Segmenter:
    """The network of a model record (model.pt), weights loaded, in eval mode."""
    c = rec["segmenter"]
    model = Segmenter(c["num_classes"], c["backbone"], c["decoder"], c["channels"], pretrained=False)
    model.load_state_dict(rec["state_dict"])
    return model.eval()
