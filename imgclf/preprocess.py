"""Preprocessing that travels with the weights.

A `Preprocess` is saved in every model file, so predict, evaluate, export and
serve resize and normalise exactly as training did. Images are turned into
uint8 CHW tensors in the data workers (4x less to copy between processes than
float) and normalised batch-wise afterwards by `normalize`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

RESIZE_POLICIES = ("crop", "squash", "pad")


@dataclass
class Preprocess:
    size: int = 224  # square model input, pixels
    resize: str = "crop"  # crop: shorter side to size/crop_pct, centre crop; squash: stretch; pad: letterbox
    crop_pct: float = 1.0  # for "crop": fraction of the resized image kept (timm's crop_pct)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per channel, on [0, 1] pixels
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    pad_color: tuple[int, int, int] = field(default=(0, 0, 0))  # for "pad"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        for k in ("mean", "std", "pad_color"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def draft_size(self) -> int:
        """Smallest side the decoder must deliver before the final resize."""
        return int(round(self.size / self.crop_pct)) if self.resize == "crop" else self.size


_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_image(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Resize an RGB image to pp.size x pp.size by pp.resize."""
    s, interp = pp.size, _INTERP[pp.interpolation]
    w, h = img.size
    # reducing_gap: PIL first shrinks by an integer factor with a box filter,
    # then resamples; measurably faster on big photos, same result to the eye.
    if pp.resize == "squash":
        return img.resize((s, s), interp, reducing_gap=3.0)
    if pp.resize == "pad":
        r = s / max(w, h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        canvas = Image.new("RGB", (s, s), pp.pad_color)
        canvas.paste(img.resize((nw, nh), interp, reducing_gap=3.0), ((s - nw) // 2, (s - nh) // 2))
        return canvas
    short = pp.draft_size
    r = short / min(w, h)
    nw, nh = max(short, round(w * r)), max(short, round(h * r))
    img = img.resize((nw, nh), interp, reducing_gap=3.0)
    left, top = (nw - s) // 2, (nh - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_uint8_chw(img: Image.Image):
    import torch

    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def normalize(x, pp: Preprocess):
    """uint8 NCHW batch -> float32 normalised batch (on x's device)."""
    import torch

    mean = torch.tensor(pp.mean, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pp.std, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - mean) / std


AUGMENTS = ("none", "light", "trivial", "randaug")


def train_transform(pp: Preprocess, augment: str = "light"):
    """PIL RGB image -> augmented uint8 CHW tensor, for full-image training."""
    from torchvision.transforms import v2 as T

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return lambda img: to_uint8_chw(resize_image(img, pp))
    ops = [T.RandomResizedCrop(pp.size, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
    if augment == "trivial":
        ops.append(T.TrivialAugmentWide())
    elif augment == "randaug":
        ops.append(T.RandAugment())
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def eval_transform(pp: Preprocess):
    return lambda img: to_uint8_chw(resize_image(img, pp))
