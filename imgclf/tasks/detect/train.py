"""A minimal detection training loop, in the style of torchvision's
references: a torch Dataset over `DetDataset` images, `train_one_epoch`,
`evaluate` (COCO metrics on the original images' pixels) and `fit`, which
chains them. The shared machinery (run directory, checkpoints, early
stopping, DDP) is the task seam's, not this module's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from imgclf.data.images import open_image
from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.metrics import coco_metrics
from imgclf.tasks.detect.model import (
    Detector,
    detection_loss,
    eval_transform,
    train_transform,
)


class BoxDataset(torch.utils.data.Dataset):
    """Images of `ds` (indices `items`) through a v2 transform; yields
    (image, target) where target holds "boxes" (tv_tensors.BoundingBoxes),
    "labels", "scale" (input pixels per original pixel, x and y) and
    "size" (the original width and height).
    Boxes are clipped to the image and degenerate ones dropped first (what
    `check --fix` would do), so a slightly-off label never stops training."""

    def __init__(self, ds: DetDataset, items: list[int], transform):
        self.ds, self.items, self.transform = ds, list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F


        im = self.ds.images[self.items[i]]
        pil = open_image(im.path)
        w, h = pil.size
        b = np.clip(im.boxes, 0, [w, h, w, h])
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        target = {"boxes": tv_tensors.BoundingBoxes(torch.as_tensor(b[ok], dtype=torch.float32), format="XYXY",
                                                    canvas_size=(h, w)),
                  "labels": torch.as_tensor(im.labels[ok], dtype=torch.int64)}
        img, target = self.transform(tv_tensors.Image(F.pil_to_tensor(pil)), target)
        target["scale"] = torch.tensor([img.shape[-1] / w, img.shape[-2] / h])
        target["size"] = torch.tensor([w, h])
        return img, target


def collate(batch, size: int):
    """Stack into (B, 3, size, size), padding each image at the right and bottom."""
    x = torch.zeros(len(batch), 3, size, size)
    for k, (img, _) in enumerate(batch):
        x[k, :, : img.shape[-2], : img.shape[-1]] = img
    return x, [t for _, t in batch]


def make_loader(ds: DetDataset, items: list[int], size: int, train: bool, batch_size: int = 8, workers: int = 0,
                seed: int = 0, vflip: bool = False):
    from functools import partial

    tf = train_transform(size, vflip=vflip) if train else eval_transform(size)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(BoxDataset(ds, items, tf), batch_size=batch_size, shuffle=train,
                                       num_workers=workers, collate_fn=partial(collate, size=size), generator=g,
                                       persistent_workers=workers > 0)


def train_one_epoch(model: Detector, optimizer, loader, device="cpu", scheduler=None, max_norm: float = 10.0) -> dict:
    """One pass over loader; returns the mean of each loss term."""
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for x, targets in loader:
        tg = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device), "labels": t["labels"].to(device)}
              for t in targets]
        if isinstance(x, list):  # cached trunk maps
            out = model.forward_head([f.to(device) for f in x], (model.image_size, model.image_size))
        else:
            out = model(x.to(device))
        losses = detection_loss(model, out, tg)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {float(loss)}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


class CachedFeatures:
    """The frozen trunk's maps of every training image, computed once (and of
    its mirror image with flip=True), served in shuffled batches as
    (list of per-level maps, targets). Costs scale jitter and crops, which
    change the pixels the trunk sees; saves the trunk's forward pass, most of
    an epoch's time on a CPU."""

    def __init__(self, model: Detector, ds: DetDataset, items: list[int], size: int, batch_size: int = 8,
                 flip: bool = True, seed: int = 0, device="cpu", workers: int = 0):
        model.eval()
        self.feats: list[list[torch.Tensor]] = []
        self.targets: list[dict] = []
        self.batch_size, self.gen = batch_size, torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for x, targets in make_loader(ds, items, size, False, batch_size, workers):
                for xx, mirror in [(x, False)] + ([(x.flip(-1), True)] if flip else []):
                    f = [t.cpu() for t in model.forward_features(xx.to(device))]
                    for k, t in enumerate(targets):
                        b = t["boxes"].as_subclass(torch.Tensor).clone()
                        if mirror:
                            b[:, [0, 2]] = size - b[:, [2, 0]]
                        self.feats.append([m[k] for m in f])
                        self.targets.append({"boxes": b, "labels": t["labels"]})

    def __len__(self) -> int:
        return math.ceil(len(self.feats) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.feats), generator=self.gen).tolist()
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield ([torch.stack([self.feats[j][lv] for j in idx]) for lv in range(len(self.feats[0]))],
                   [self.targets[j] for j in idx])


@torch.no_grad()
def predict_loader(model: Detector, loader, device="cpu", score_thresh: float = 0.05) -> list[dict]:
    """Detections per image in the original image's pixels (numpy)."""
    model.eval()
    out = []
    for x, targets in loader:
        for d, t in zip(model.predict(x.to(device), score_thresh), targets):
            sx, sy = t["scale"].tolist()
            w, h = t["size"].tolist()
            boxes = np.clip(d["boxes"].cpu().numpy() / np.array([sx, sy, sx, sy]), 0, [w, h, w, h])  # not into the padding
            out.append({"boxes": boxes, "scores": d["scores"].cpu().numpy(), "labels": d["labels"].cpu().numpy()})
    return out


def evaluate(model: Detector, ds: DetDataset, items: list[int], size: int, device="cpu", batch_size: int = 8,
             workers: int = 0) -> dict:
    """COCO metrics of model on ds's images `items`."""
    preds = predict_loader(model, make_loader(ds, items, size, False, batch_size, workers), device)
    sub = DetDataset(classes=ds.classes, images=[ds.images[i] for i in items], format=ds.format, root=ds.root)
    return coco_metrics(sub, preds)


@dataclass
class FitResult:
    model: Detector
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    seconds: float = 0.0


def fit(ds: DetDataset, train_items: list[int], val_items: list[int], epochs: int = 10, image_size: int = 320,
        batch_size: int = 8, lr: float = 2e-3, head: str = "retinanet", freeze_backbone: bool = True,
        unfreeze_at: int | None = None, seed: int = 0, workers: int = 0, eval_every: int = 1,
        backbone: str = "efficientnet_lite0", vflip: bool = False, cache: bool = False, cache_flip: bool = True, log=None,
        **model_kw) -> FitResult:
    """Train a Detector; keep the weights of the epoch with the best val mAP.
    AdamW with a one-cycle schedule; with unfreeze_at, the backbone trains
    from that epoch on at a tenth of the learning rate. cache=True (frozen
    trunk only): train on CachedFeatures (of each image and, with
    cache_flip, its mirror) instead of augmented images."""
    import copy

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = Detector(len(ds.classes), backbone=backbone, head=head, image_size=image_size,
                     freeze_backbone=freeze_backbone, **model_kw)
    if cache and (not freeze_backbone or unfreeze_at is not None):
        raise ValueError("cache=True needs a backbone frozen throughout")
    loader = (CachedFeatures(model, ds, train_items, image_size, batch_size, cache_flip, seed, workers=workers) if cache
              else make_loader(ds, train_items, image_size, True, batch_size, workers, seed, vflip))
    params = [p for n, p in model.named_parameters() if not n.startswith("det.backbone.body.")]
    groups = [{"params": params, "lr": lr}]
    if unfreeze_at is not None or not freeze_backbone:
        groups.append({"params": list(model.det.backbone.body.parameters()), "lr": lr / 10})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=epochs * len(loader),
                                                pct_start=0.15)
    res = FitResult(model)
    best_state = None
    for ep in range(epochs):
        if unfreeze_at is not None and ep == unfreeze_at:
            model.freeze_backbone(False)
        losses = train_one_epoch(model, opt, loader, scheduler=sched)
        row = {"epoch": ep + 1, **losses, "seconds": round(time.perf_counter() - t0, 1)}
        if val_items and ((ep + 1) % eval_every == 0 or ep + 1 == epochs):
            m = evaluate(model, ds, val_items, image_size, batch_size=batch_size, workers=workers)
            row.update(map=m["map"], map50=m["map50"])
            if not res.best or m["map"] > res.best["map"]:
                res.best, best_state = {**m, "epoch": ep + 1}, copy.deepcopy(model.state_dict())
        res.history.append(row)
        if log:
            log(row)
    if best_state is not None:
        model.load_state_dict(best_state)
    res.seconds = time.perf_counter() - t0
    return res
