"""The whole-network stages: every layer trained on images streamed from disk
through the DataLoader (finetune, scratch), or on small images decoded once
into memory as uint8 tensors and augmented there (native; lowres upscales
each batch for the pretrained backbone). Under torchrun the model is wrapped
in DistributedDataParallel and each rank takes its sampler's share."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.datasets import drop_files
from imgclf.data.loading import BadFileLog, ImageDataset, make_loader
from imgclf.data.preprocess import Preprocess, augment_batch, eval_transform, normalize, train_transform
from imgclf.errors import ConfigError, DataError
from imgclf.models.registry import ImageClassifier
from imgclf.training.epochs import Context, Stage, say, train_epochs
from imgclf.training.loop import balanced_class_weights, warmup_cosine
from imgclf.training.lowres import probe_head

# The native strategy keeps every training image decoded (uint8, 3 channels):
# 60,000 MNIST digits take 141 MB, 50,000 CIFAR images 154 MB. Above this the
# streaming `scratch` path is used instead (strategy.py says so).
IMAGES_IN_MEMORY_MB = 1024  # IMGCLF_IMAGES_IN_MEMORY_MB overrides

# Low-resolution fine-tuning, LP-FT (lowres.py; docs/benchmarks.md, "small images"): the head starts
# from the linear probe, so every layer moves at one small rate with batch norm's statistics kept.
LOWRES_LR = 1e-4  # every layer's rate (AdamW, warm-up + cosine)
LOWRES_HEAD_MULT = 1  # the head's rate: x1 (a fresh random head needed x10; the probe's does not)
LOWRES_EPOCHS = 6
LOWRES_SIZE = 128  # input px, chosen on val: the frozen probe scored 72/77/84% at 64/96/128 px on cats32


def images_in_memory_mb() -> float:
    return float(os.environ.get("IMGCLF_IMAGES_IN_MEMORY_MB", IMAGES_IN_MEMORY_MB))


class _ImageBatches:
    """DataLoader batches minus unreadable files, which are reported once."""

    def __init__(self, loader, items, bad: BadFileLog):
        self.loader, self.items, self.bad = loader, items, bad

    def __iter__(self):
        for x, y, _, badb in self.loader:
            for j, reason in badb:
                self.bad.add(self.items[j][0], reason)
            if x is not None:
                yield x, y


def _optimizer(ctx: Context, stage: Stage) -> tuple[torch.optim.Optimizer, object]:
    """AdamW (the backbone at lr x backbone_lr_mult when fine-tuning) and a
    warm-up + cosine schedule over the stage's steps."""
    cfg, model = ctx.cfg, ctx.model
    if stage.name == "finetune":
        groups = [{"params": model.head.parameters(), "lr": stage.lr},
                  {"params": model.backbone.parameters(), "lr": stage.lr * cfg.backbone_lr_mult}]
    elif stage.name == "lowres":
        groups = lowres_groups(model, stage.lr)
    else:
        groups = [{"params": model.parameters(), "lr": stage.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    per_rank = -(-len(ctx.splits.train) // ctx.dist.world)  # DistributedSampler's share
    steps = -(-per_rank // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.epochs * steps, int(cfg.warmup_epochs * steps)))
    return opt, sched


def lowres_groups(model: ImageClassifier, lr: float) -> list[dict]:
    """lowres: the head learns LOWRES_HEAD_MULT times as fast as the
    pretrained backbone, which has to adapt to upscaled images but not forget."""
    return [{"params": model.head.parameters(), "lr": lr * LOWRES_HEAD_MULT},
            {"params": model.backbone.parameters(), "lr": lr}]


def _balanced_sampler(ctx: Context):
    labels = torch.tensor([y for _, y in ctx.splits.train])  # the memory stage drops unreadable ones first
    w = balanced_class_weights(labels, len(ctx.splits.classes))[labels]
    g = torch.Generator()
    g.manual_seed(ctx.cfg.seed)
    return torch.utils.data.WeightedRandomSampler(w.double(), len(labels), replacement=True, generator=g)


def run_image_stage(ctx: Context, stage: Stage) -> None:
    cfg, model, pp, dev, d = ctx.cfg, ctx.model, ctx.pp, ctx.device, ctx.dist
    root, tr, va = ctx.splits.root, ctx.splits.train, ctx.splits.val
    n_ml = len(ctx.splits.classes) if ctx.multi_label else None
    tr_ds = ImageDataset(root, tr, train_transform(pp, cfg.augment), draft_size=pp.draft_size, num_classes=n_ml)
    va_share = d.shard(va)  # each rank validates a disjoint share, gathered: every image counted once
    va_ds = ImageDataset(root, va_share, eval_transform(pp), draft_size=pp.draft_size, num_classes=n_ml)
    model.to(dev)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and on tensor cores
    for p in model.parameters():
        p.requires_grad_(True)
    net, sampler = distribute(ctx, model, tr_ds)
    opt, sched = _optimizer(ctx, stage)

    def prepare(x):
        return normalize(x, pp).contiguous(memory_format=torch.channels_last)

    def train_batches(gen):
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(seed)  # the same permutation on every rank, a new one each epoch
        loader = make_loader(tr_ds, cfg.batch_size, True, ctx.workers, seed=seed + d.rank, sampler=sampler)
        return _ImageBatches(loader, tr, ctx.bad)

    train_epochs(ctx, stage, net, "all", opt, sched, train_batches,
                 val_batches=lambda: _ImageBatches(make_loader(va_ds, cfg.batch_size, False, ctx.workers), va_share,
                                                   ctx.bad),
                 prepare=prepare, images=len(tr) // d.world, eval_module=model,
                 frozen_bn=stage.name == "finetune" and cfg.freeze_bn)


def distribute(ctx: Context, model: ImageClassifier, tr_ds: ImageDataset):
    """The module to train and the training sampler: DistributedDataParallel and
    a DistributedSampler under torchrun (the global batch is --batch-size x
    world size; gradients are averaged, so one process with the global batch
    takes the same steps), else the model and None (or the balanced sampler)."""
    cfg, d = ctx.cfg, ctx.dist
    if not d.enabled:
        if cfg.sync_bn:
            say("note: --sync-bn only matters with several processes (torchrun); ignored")
        return model, _balanced_sampler(ctx) if cfg.balanced_sampler else None
    if cfg.balanced_sampler:
        raise ConfigError("--balanced-sampler is not supported under torchrun",
                          "use --class-weights auto, which weighs the loss instead of the sampling")
    if cfg.sync_bn:
        if ctx.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU (gloo)",
                              "drop --sync-bn, or train on GPUs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    sampler = torch.utils.data.DistributedSampler(tr_ds, d.world, d.rank, shuffle=True, seed=cfg.seed)
    return net, sampler


def decode_split(ctx: Context, items: list, what: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Decode `items` once, by the run's Preprocess (as prediction will; lowres:
    at the decode size), into a uint8 NCHW tensor; returns it, the targets and
    the readable items."""
    n_ml = len(ctx.splits.classes) if ctx.multi_label else None
    return decode_items(ctx.splits.root, items, ctx.decode_pp or ctx.pp, ctx.workers, ctx.bad, what, n_ml)


def decode_items(root: str, items: list, pp: Preprocess, workers: int, bad: BadFileLog, what: str,
                 num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """decode_split's work, for any items and Preprocess (the race decodes through it too)."""
    t0 = time.time()
    ds = ImageDataset(root, items, eval_transform(pp), draft_size=pp.draft_size, num_classes=num_classes)
    xs, ys, kept = [], [], []
    for x, y, idx, badb in make_loader(ds, 256, False, workers):
        for j, reason in badb:
            bad.add(items[j][0], reason)
        if x is not None:
            xs.append(x)
            ys.append(y)
            kept.extend(items[j] for j in idx.tolist())
    if not xs:
        raise DataError(f"no readable images in the {what} split", "see the skipped files above")
    X, Y = torch.cat(xs), torch.cat(ys)
    say(f"{what}: {len(X)} images decoded into memory once ({X.nbytes / 2**20:.0f} MB, {pp.size}px) "
        f"in {time.time() - t0:.1f}s")
    return X, Y, kept


def check_memory_budget(n: int, size: int) -> float | None:
    """MB that n decoded size x size images need, or None when that is within the budget."""
    mb = n * 3 * size * size / 2**20
    return mb if mb > images_in_memory_mb() else None


def run_memory_stage(ctx: Context, stage: Stage) -> None:
    """The native and lowres strategies: train and val decoded once (or taken
    from the race, which decoded them already), then each epoch draws batches
    from memory, shifts (and flips, if --flip-features; erases, if --erase)
    them on the tensors and feeds `train_epochs`; lowres upscales each batch
    to the model's input size. Under torchrun every process holds the
    training images and takes its DistributedSampler share of each epoch."""
    cfg, model, d = ctx.cfg, ctx.model, ctx.dist
    X, Y, kept = ctx.decoded.get("train") or decode_split(ctx, ctx.splits.train, "train")
    drop_files(ctx.splits, {rel for rel, _ in ctx.splits.train} - {rel for rel, _ in kept}, ("train",))
    Xv, Yv, _ = (ctx.decoded.get("val") if not d.enabled else None) or \
        decode_split(ctx, d.shard(ctx.splits.val), "val" if not d.enabled else f"val (rank {d.rank})")
    ctx.decoded.clear()  # the stage holds them now
    model.to(ctx.device).to(memory_format=torch.channels_last)
    net, sampler = distribute(ctx, model, X)
    opt, sched = _optimizer(ctx, stage)
    side = X.shape[-1]
    pad, flip = max(1, side // 12), cfg.flip_features  # 28 px: shifts of up to 2 px, as for MNIST
    prepare = memory_prepare(ctx.pp)
    if stage.name == "lowres" and ctx.state.epoch == 0:  # LP-FT: the head starts from the linear probe
        say(f"lowres: {probe_head(model, X, Y, prepare, ctx.device, cfg.cv_folds, cfg.seed) or 'a fresh head'}")

    def train_batches(gen):
        order = _epoch_order(sampler, len(X), gen)
        for i in range(0, len(order), cfg.batch_size):
            j = order[i:i + cfg.batch_size]
            yield erase_batch(augment_batch(X[j], pad, flip, gen), cfg.erase or 0.0, gen), Y[j]

    def val_batches():
        return ((Xv[i:i + 512], Yv[i:i + 512]) for i in range(0, len(Xv), 512))

    train_epochs(ctx, stage, net, "all", opt, sched, train_batches, val_batches, prepare=prepare,
                 images=len(X) // d.world, eval_module=model, frozen_bn=stage.name == "lowres")


def memory_prepare(pp: Preprocess):
    """uint8 batch from memory -> model input: upscaled to pp.size when it was
    decoded smaller (lowres; bilinear, as the Preprocess resizes files at
    prediction), normalised, channels-last."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != pp.size or x.shape[-2] != pp.size:
            x = F.interpolate(x.float(), size=(pp.size, pp.size), mode="bilinear", align_corners=False)
        return normalize(x, pp).contiguous(memory_format=torch.channels_last)

    return prepare


def erase_batch(x: torch.Tensor, p: float, gen: torch.Generator | None = None,
                scale=(0.02, 0.25), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al.) on a uint8 NCHW batch: each image, with
    probability p, gets one rectangle of `scale` of its area and aspect in
    `ratio` set to zero. Per image in one pass, for the reason augment_batch
    gives (torchvision's RandomErasing draws once per call)."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(*scale, generator=gen) * h * w
    aspect = torch.exp(torch.empty(n).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=gen))
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
    x0 = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= y0.view(n, 1, 1)) & (rows < (y0 + eh).view(n, 1, 1)) &
           (cols >= x0.view(n, 1, 1)) & (cols < (x0 + ew).view(n, 1, 1)))
    box &= (torch.rand(n, generator=gen) < p).view(n, 1, 1)
    return x.masked_fill(box.unsqueeze(1), 0)


def _epoch_order(sampler, n: int, gen: torch.Generator) -> torch.Tensor:
    """This epoch's training indices: a fresh permutation, or the sampler's
    (DistributedSampler: this rank's share of one permutation common to all)."""
    if sampler is None:
        return torch.randperm(n, generator=gen)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return torch.tensor(list(iter(sampler)), dtype=torch.long)
