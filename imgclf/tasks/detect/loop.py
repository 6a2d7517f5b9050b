"""Detection's epoch: its batches (augmented images, or the frozen trunk's
cached maps) and `train_one_epoch`, in the style of torchvision's references.
The schedule, early stopping, checkpoints and processes are the shared
machinery's (imgclf/training); validation goes through the predictor
(`TorchDetPredictor.detect`), the one inference path.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from imgclf.data.images import open_image
from imgclf.data.preprocess import Preprocess, pad_geometry, resize_image
from imgclf.tasks.detect.data import DetDataset, DetImage
from imgclf.tasks.detect.masks import id_map, instance_masks
from imgclf.tasks.detect.model import Detector, detection_loss, train_transform


def clean_boxes(im: DetImage, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes clipped to the image, degenerate ones dropped (what `check --fix`
    would do), so a slightly-off label never stops training; and which were kept."""
    b = np.clip(im.boxes, 0, [w, h, w, h])
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[ok], im.labels[ok], ok


class LabelledImages(torch.utils.data.Dataset):
    """A split's images, each decoded with its boxes cleaned (clean_boxes):
    what the augmented and the letterboxed datasets both start from."""

    def __init__(self, ds: DetDataset, items: list[int]):
        self.ds, self.items = ds, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[DetImage, Image.Image, np.ndarray, np.ndarray, np.ndarray]:
        """The i-th item's labels, its decoded image, and its kept boxes, labels and keep mask."""
        im = self.ds.images[self.items[i]]
        pil = open_image(im.path)
        return (im, pil, *clean_boxes(im, *pil.size))


def kept_masks(ids: np.ndarray, ok: np.ndarray) -> torch.Tensor:
    """The instance masks of the boxes clean_boxes kept (instance k is box k)."""
    return instance_masks(ids, len(ok))[torch.from_numpy(ok)]


class AugmentedImages(LabelledImages):
    """Training images through the box-aware v2 transform: (image, target)
    with target {"boxes" (tv_tensors.BoundingBoxes, input pixels), "labels"}."""

    def __init__(self, ds: DetDataset, items: list[int], size: int, vflip: bool = False):
        super().__init__(ds, items)
        self.transform = train_transform(size, vflip=vflip)

    def __getitem__(self, i: int):
        im, pil, b, labels, ok = self.load(i)
        w, h = pil.size
        target = {"boxes": tv_tensors.BoundingBoxes(torch.as_tensor(b, dtype=torch.float32), format="XYXY",
                                                    canvas_size=(h, w)),
                  "labels": torch.as_tensor(labels, dtype=torch.int64)}
        if im.mask_path is not None:  # the transforms move, crop and drop the masks with their boxes
            target["masks"] = tv_tensors.Mask(kept_masks(np.asarray(Image.open(im.mask_path), np.uint8), ok))
        return self.transform(tv_tensors.Image(F.pil_to_tensor(pil)), target)


class LetterboxedImages(LabelledImages):
    """Images letterboxed exactly as the predictor does (Preprocess "pad"),
    as float (3, S, S) in [0, 1], with their boxes in input pixels."""

    def __init__(self, ds: DetDataset, items: list[int], pp: Preprocess):
        super().__init__(ds, items)
        self.pp = pp

    def __getitem__(self, i: int):
        im, pil, b, labels, ok = self.load(i)
        w, h = pil.size
        nw, nh, left, top = pad_geometry(w, h, self.pp.size)
        b = b * [nw / w, nh / h, nw / w, nh / h] + [left, top, left, top]
        x = torch.from_numpy(np.array(resize_image(pil, self.pp))).permute(2, 0, 1).float() / 255
        t = {"boxes": torch.as_tensor(b, dtype=torch.float32), "labels": torch.as_tensor(labels)}
        if im.mask_path is not None:
            t["masks"] = kept_masks(id_map(im.mask_path, self.pp.size), ok)
        return x, t


def collate(batch, size: int):
    """Stack into (B, 3, size, size), padding each image at the right and bottom."""
    x = torch.zeros(len(batch), 3, size, size)
    for k, (img, _) in enumerate(batch):
        x[k, :, : img.shape[-2], : img.shape[-1]] = img
    return x, [{k: v.as_subclass(torch.Tensor) for k, v in t.items()} for _, t in batch]


def image_loader(dataset, size: int, batch_size: int, workers: int, shuffle: bool, seed: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=partial(collate, size=size),
                                       generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


class CachedFeatures:
    """The frozen trunk's maps of every training image (and of its mirror
    image), computed once, served in shuffled batches of (per-level maps,
    targets). Costs scale jitter and crops, which change the pixels the trunk
    sees; saves the trunk's forward pass, most of an epoch's time on a CPU.
    Each epoch's order comes from (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, model: Detector, ds: DetDataset, items: list[int], pp: Preprocess, batch_size: int,
                 flip: bool = True, seed: int = 0, device="cpu", workers: int = 0):
        model.eval()
        self.feats: list[list[torch.Tensor]] = []
        self.targets: list[dict] = []
        self.batch_size, self.seed, self.epoch, size = batch_size, seed, 0, pp.size
        with torch.no_grad():
            for x, targets in image_loader(LetterboxedImages(ds, items, pp), size, 8, workers, False, seed):
                for xx, mirror in [(x, False)] + ([(x.flip(-1), True)] if flip else []):
                    f = [t.cpu() for t in model.forward_features(xx.to(device))]
                    for k, t in enumerate(targets):
                        t = dict(t, boxes=t["boxes"].clone())
                        if mirror:
                            t["boxes"][:, [0, 2]] = size - t["boxes"][:, [2, 0]]
                            if "masks" in t:
                                t["masks"] = t["masks"].flip(-1)
                        self.feats.append([m[k] for m in f])
                        self.targets.append(t)

    def __len__(self) -> int:
        return math.ceil(len(self.feats) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.feats), generator=g).tolist()
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield ([torch.stack([self.feats[j][lv] for j in idx]) for lv in range(len(self.feats[0]))],
                   [self.targets[j] for j in idx])


def train_one_epoch(model: torch.nn.Module, optimizer, batches, scheduler=None, device="cpu",
                    max_norm: float = 10.0, amp: bool = False, deadline: float | None = None) -> dict:
    """One pass over `batches` (images, or cached trunk maps: `model` takes
    either; it may be DDP-wrapped). Returns the mean of each loss term, the
    images seen, the seconds, and whether the deadline stopped it."""
    net = getattr(model, "module", model)
    model.train()
    sums: dict[str, float] = {}
    n, t0, stopped = 0, time.time(), False
    for x, targets in batches:
        tg = [{k: v.to(device) for k, v in t.items()} for t in targets]
        x = [f.to(device) for f in x] if isinstance(x, list) else x.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        losses = detection_loss(net, out, tg)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {float(loss)}: lower the learning rate (--lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(targets)
        n += len(targets)
        if deadline is not None and time.time() > deadline:
            stopped = True
            break
    row = {k: v / max(n, 1) for k, v in sums.items()}
    return {**row, "loss": sum(row.values()), "n": n, "seconds": time.time() - t0, "stopped": stopped}
