"""The frozen trunk's maps, computed once: while the trunk is frozen every
epoch would pass the same pixels through it again, and on a CPU that
forward pass is most of a step. So each training image (at each cached
scale, and its mirror image) goes through the trunk once; its maps at
strides 4-32 are kept (float16, half the memory) beside its mask, and the
decoder trains on them for as many epochs as it needs.

Augmentation moves to feature space: a mirror is a cached copy of its own
(the trunk is not mirror-symmetric, so flipping the maps would not do), a
scale is a cached copy per scale, and a crop is a window of every level
aligned to the coarsest stride (32 px), so the levels and the mask stay in
register. Colour jitter is left out: it would change the trunk's input.

Validation images are cached the same way (whole, unmirrored): their
logits go through the same two resizes as the predictor's (to the base
size, then to the mask's own), so val mIoU is the number `evaluate` gives.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.images import open_image
from imgclf.tasks.segment.data import SegDataset, load_mask
from imgclf.tasks.segment.metrics import confusion
from imgclf.tasks.segment.model import Segmenter
from imgclf.tasks.segment.predictor import prepare_image, resize_mask

STRIDE = 32  # the coarsest level's stride: crops are aligned to it
BYTES_PER_PIXEL = 2 * (24 / 16 + 40 / 64 + 112 / 256 + 320 / 1024)  # Lite0's maps at strides 4-32, float16


def cache_bytes(n_images: int, image_size: int, scales) -> int:
    """About what the cache of n_images (and their mirrors) holds at most (square images)."""
    return int(n_images * 2 * sum((image_size * s) ** 2 for s in scales) * BYTES_PER_PIXEL)


def _pixels(ds: SegDataset, i: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Item i at the base size (uint8 (h, w, 3)) and its full-size mask."""
    it = ds.items[i]
    return prepare_image(open_image(it.image), image_size), load_mask(ds, it)


@torch.no_grad()
def _trunk(model: Segmenter, x: np.ndarray, device) -> list[torch.Tensor]:
    t = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float().div(255).to(device)
    return [f[0].to("cpu", torch.float16) for f in model.features(t)]


class CachedSegFeatures:
    """(per-level maps, mask at the base size) of every training image at each
    scale, and of its mirror; served in batches of `crop`-pixel windows (None:
    whole images, batched by shape). Each epoch's order comes from (seed,
    epoch), so a resumed run sees the batches an uninterrupted one would.
    Under DDP each rank caches its share and takes `steps` batches an epoch."""

    def __init__(self, model: Segmenter, ds: SegDataset, items: list[int], image_size: int, batch_size: int,
                 crop: int | None, scales=(1.0,), seed: int = 0, device="cpu", world: int = 1,
                 total_items: int | None = None):
        model.eval()
        t0 = time.time()
        self.feats: list[list[torch.Tensor]] = []
        self.masks: list[torch.Tensor] = []
        for i in items:
            x, m = _pixels(ds, i, image_size)
            for s in scales:
                xs = x if s == 1.0 else prepare_image(open_image(ds.items[i].image), round(image_size * s))
                ms = torch.from_numpy(resize_mask(m, (xs.shape[1], xs.shape[0])).copy())
                for mirror in (False, True):
                    self.feats.append(_trunk(model, xs[:, ::-1] if mirror else xs, device))
                    self.masks.append(ms.flip(-1) if mirror else ms)
        self.seconds = time.time() - t0
        self.batch_size, self.crop, self.seed, self.epoch = batch_size, crop, seed, 0
        self.cells = [STRIDE // r for r in model.trunk.feature_info.reduction()]  # a level's cells per 32 px
        per_rank = math.ceil((total_items or len(items)) * len(scales) * 2 / world)
        self.steps = max(1, per_rank // batch_size)  # every rank alike: DDP needs as many steps on each

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.feats for t in f) + sum(m.numel() for m in self.masks)

    def __len__(self) -> int:
        return self.steps

    def _window(self, j: int, g: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        f, m = self.feats[j], self.masks[j]
        c = 0 if self.crop is None else self.crop // STRIDE
        if c == 0 or c > min(m.shape) // STRIDE:  # no crop, or the image is smaller: all of it
            return [t.float() for t in f], m
        oy, ox = (int(torch.randint(0, max(1, n // STRIDE - c + 1), (1,), generator=g)) for n in m.shape)
        out = [t[:, oy * k:(oy + c) * k, ox * k:(ox + c) * k].float() for t, k in zip(f, self.cells)]
        return out, m[oy * STRIDE:(oy + c) * STRIDE, ox * STRIDE:(ox + c) * STRIDE]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n, need = len(self.feats), self.steps * self.batch_size
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need].tolist()
        for i in range(0, need, self.batch_size):
            wins = [self._window(j, g) for j in order[i:i + self.batch_size]]
            for group in _same_shape(wins):
                yield ([torch.stack([w[0][lv] for w in group]) for lv in range(len(group[0][0]))],
                       torch.stack([w[1] for w in group]).long())


def _same_shape(wins):
    """Windows grouped by shape (whole images of different sizes cannot stack)."""
    groups: dict[tuple, list] = {}
    for w in wins:
        groups.setdefault(tuple(w[1].shape), []).append(w)
    return groups.values()


class CachedSegVal:
    """The val images' maps (whole, each its own batch of one) and full-size
    masks: per-epoch val scores without the trunk."""

    def __init__(self, model: Segmenter, ds: SegDataset, items: list[int], image_size: int, device="cpu"):
        model.eval()
        self.items, self.feats, self.masks, self.base = [], [], [], []
        for i in items:
            x, m = _pixels(ds, i, image_size)
            self.feats.append(_trunk(model, x, device))
            self.masks.append(m)
            self.base.append((x.shape[0], x.shape[1]))

    @torch.no_grad()
    def confusion(self, model: Segmenter, num_classes: int, ignore_index: int, device="cpu") -> np.ndarray:
        model.eval()
        cm = np.zeros((num_classes, num_classes), np.int64)
        for f, m, hw in zip(self.feats, self.masks, self.base):
            logits = model.decode([t[None].float().to(device) for t in f], hw)
            up = F.interpolate(logits, size=m.shape, mode="bilinear", align_corners=False)[0]
            cm += confusion(m, up.argmax(0).to(torch.uint8).cpu().numpy(), num_classes, ignore_index)
        return cm



def train_cached_epoch(net: torch.nn.Module, batches: CachedSegFeatures, loss_fn, optimizer, scheduler=None,
                       device=torch.device("cpu"), deadline: float | None = None) -> dict:
    """One pass of the decoder over cached maps (`net`: DecoderOnly, maybe
    DDP-wrapped; `batches.epoch` set by the caller picks the order). Returns the mean loss, the samples, the seconds, and whether
    the deadline stopped it."""
    net.train()
    t0, n, loss_sum, stopped = time.time(), 0, 0.0, False
    for feats, y in batches:
        feats, y = [f.to(device) for f in feats], y.to(device)
        loss = loss_fn(net(feats, y.shape[-2:]), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n += len(y)
        loss_sum += loss.item() * len(y)
        if deadline is not None and time.time() > deadline:
            stopped = True
            break
    return {"loss": loss_sum / max(1, n), "n": n, "seconds": time.time() - t0, "stopped": stopped}
