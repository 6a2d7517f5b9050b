"""Preprocessing: the one place where an image becomes model input.

A `Preprocess` is saved in every model file (and in every export's metadata),
so training, evaluation, prediction, export and serving resize and normalise
exactly alike:

    any image source --Preprocess.load--> uint8 (S, S, 3)   [PIL: decode, EXIF, RGB, resize]
    uint8 batch      --normalize-------> float32 NCHW       [torch, or inside the ONNX graph]

Images travel as uint8 (4x less to copy between processes than float) and are
normalised batch-wise, on the model's device or inside the exported graph.
Training augmentation (`train_transform`) crops randomly but then resizes by
the same policy, so a `pad` model learns on letterboxed images, as it is served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from imgclf.data.images import MAX_PIXELS, BadImage, Source, open_image
from imgclf.errors import ConfigError

RESIZE_POLICIES = ("crop", "squash", "pad")
AUGMENTS = ("none", "light", "trivial", "randaug")
_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


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
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        for k in ("mean", "std", "pad_color"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def draft_size(self) -> int:
        """Smallest side the decoder must deliver before the final resize."""
        return int(round(self.size / self.crop_pct)) if self.resize == "crop" else self.size

    def open(self, src: Source, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """Decode any source (path, bytes, PIL, array) as upright RGB, in JPEG
        draft mode where that loses nothing the resize keeps; raises BadImage."""
        return open_image(src, draft_size=self.draft_size, max_pixels=max_pixels)

    def load(self, src: Source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """Any image source -> uint8 (size, size, 3), as every model sees it; raises BadImage."""
        img = self.open(src, max_pixels)
        try:
            return np.asarray(resize_image(img, self), dtype=np.uint8)
        except Exception as e:  # PIL's many error types for odd modes and sizes
            raise BadImage(getattr(src, "name", None) or str(src)[:200], f"cannot resize this image ({e})") from None


def resize_image(img: Image.Image, pp: Preprocess, reducing_gap: float | None = 3.0) -> Image.Image:
    """Resize an RGB image to pp.size x pp.size by pp.resize. reducing_gap=None:
    the plain convolution, which the exported any-size graph reproduces."""
    s, interp = pp.size, _INTERP[pp.interpolation]
    w, h = img.size
    # reducing_gap: PIL first shrinks by an integer factor with a box filter,
    # then resamples; measurably faster on big photos, same result to the eye.
    if pp.resize == "squash":
        return img.resize((s, s), interp, reducing_gap=reducing_gap)
    if pp.resize == "pad":
        nw, nh, left, top = pad_geometry(w, h, s)
        canvas = Image.new("RGB", (s, s), pp.pad_color)
        canvas.paste(img.resize((nw, nh), interp, reducing_gap=reducing_gap), (left, top))
        return canvas
    short = pp.draft_size
    r = short / min(w, h)
    nw, nh = max(short, round(w * r)), max(short, round(h * r))
    if max(nw, nh) > 8 * short:
        # An extreme aspect ratio (a 100000x2 strip would need an 11,200,000 x
        # 224 intermediate): crop the centre square in source coordinates and
        # resize only that. Ordinary photos keep the exact path below.
        side = min(w, h) * s / short
        left, top = (w - side) / 2, (h - side) / 2
        return img.resize((s, s), interp, box=(left, top, left + side, top + side), reducing_gap=reducing_gap)
    img = img.resize((nw, nh), interp, reducing_gap=reducing_gap)
    left, top = (nw - s) // 2, (nh - s) // 2
    return img.crop((left, top, left + s, top + s))


def pad_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """The letterbox ("pad") of a w x h image into a size x size square: the
    resized width and height, and the left and top padding. Detection maps
    boxes back to the original pixels with it."""
    r = size / max(w, h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    return nw, nh, (size - nw) // 2, (size - nh) // 2


def to_chw(a: np.ndarray):
    """uint8 (H, W, 3) array -> uint8 (3, H, W) tensor, for DataLoader batches."""
    import torch

    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else a.copy()).permute(2, 0, 1)


def to_nchw(batch: np.ndarray):
    """uint8 (N, H, W, 3) array -> uint8 (N, 3, H, W) tensor."""
    import torch

    b = np.ascontiguousarray(batch, dtype=np.uint8)
    return torch.from_numpy(b if b.flags.writeable else b.copy()).permute(0, 3, 1, 2)


def normalize(x, pp: Preprocess):
    """uint8 NCHW batch -> float32 normalised batch (on x's device). The only
    normalisation in imgclf: training, feature extraction and the exported
    graph (traced from this function) all call it."""
    import torch

    mean = torch.tensor(pp.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pp.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - mean) / std


class RandomResizedCropPolicy:
    """A random crop (area `scale`, aspect jitter `ratio`), then the model's own
    resize policy. For `crop` and `squash` this is torchvision's
    RandomResizedCrop; for `pad` the crop keeps the photo's shape (its aspect
    ratio jittered around the image's own) and is letterboxed, so training sees
    the same bars serving adds."""

    def __init__(self, pp: Preprocess, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
        self.pp, self.scale, self.ratio = pp, scale, ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import v2 as T

        w, h = img.size
        ratio = self.ratio
        if self.pp.resize == "pad":
            ratio = (ratio[0] * w / h, ratio[1] * w / h)
        i, j, ch, cw = T.RandomResizedCrop.get_params(img, list(self.scale), list(ratio))
        crop = img.crop((j, i, j + cw, i + ch))
        if self.pp.resize == "pad":
            return resize_image(crop, self.pp)
        return crop.resize((self.pp.size, self.pp.size), _INTERP[self.pp.interpolation])


def train_transform(pp: Preprocess, augment: str = "light"):
    """PIL RGB image -> augmented uint8 CHW tensor, for whole-network training."""
    from torchvision.transforms import v2 as T

    if augment not in AUGMENTS:
        raise ConfigError(f"--augment {augment!r} is unknown", f"choose one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return eval_transform(pp)
    ops = [RandomResizedCropPolicy(pp), T.RandomHorizontalFlip()]
    if augment == "trivial":
        ops.append(T.TrivialAugmentWide())
    elif augment == "randaug":
        ops.append(T.RandAugment())
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def eval_transform(pp: Preprocess):
    """PIL image -> uint8 CHW tensor, exactly as Preprocess.load resizes."""
    return lambda img: to_chw(np.asarray(resize_image(img, pp), dtype=np.uint8))


def native_preprocess(size: int) -> Preprocess:
    """Model input for small images trained at their own size (the `native`
    strategy): squashed to `size` (a no-op for the usual same-sized sets),
    grey decoded as RGB like every image, so prediction and export see the
    same input as training."""
    return Preprocess(size=size, resize="squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def augment_batch(x, pad: int, flip: bool, gen=None):
    """Random translation (zero-pad, then a random crop back to size) and
    optional horizontal flips on a uint8 NCHW batch, drawn per image.

    Hand-written because torchvision.transforms.v2 draws one set of parameters
    per call: a batched call would shift every image alike, and a call per
    image costs far more than these two gathers (bench/bench_small.py)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))  # zeros: the background of digits and drawings
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen)
        rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, w + 2 * pad)
        cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
        x = xp.gather(2, rows).gather(3, cols)
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m.view(n, 1, 1, 1), x.flip(-1), x)
    return x
