"""Training stages: what `train` runs after it has data, a model and a plan.

  head      the head alone, on cached frozen-backbone features (seconds per epoch)
  finetune  every layer on augmented images, the backbone at a lower learning rate
  scratch   every layer on images from random initialisation

Each stage builds its batches and optimizer, then hands them to `train_epochs`,
the one epoch loop: train, validate, keep the best, checkpoint, stop early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgclf.config import TrainConfig
from imgclf.data.datasets import BadFileLog, ImageDataset, Splits, file_hash, make_loader, multi_hot
from imgclf.data.preprocess import Preprocess, eval_transform, normalize, train_transform
from imgclf.errors import DataError
from imgclf.models import ImageClassifier
from imgclf.models.features import FeatureExtractor, extract, feature_caches
from imgclf.progress import Progress
from imgclf.training.checkpoint import RunState, best_record, save_record
from imgclf.training.engine import (EarlyStopping, balanced_class_weights, evaluate, make_loss, train_one_epoch,
                                    warmup_cosine)


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Stage:
    name: str  # "head" | "finetune" | "scratch"
    kind: str  # "features" | "images"
    epochs: int
    lr: float
    patience: int


def plan_stages(strategy: str, cfg: TrainConfig) -> list[Stage]:
    lr = cfg.lr or (2e-3 if strategy == "scratch" else 1e-3)
    p_feat, p_img = cfg.patience or 15, cfg.patience or 3
    if strategy == "linear":
        return [Stage("head", "features", cfg.epochs or 100, lr, p_feat)]
    if strategy == "finetune":
        return [Stage("head", "features", cfg.head_epochs, lr, p_feat),
                Stage("finetune", "images", cfg.epochs or 8, lr, p_img)]
    if strategy == "linear+finetune":
        return [Stage("head", "features", cfg.epochs or 100, lr, p_feat),
                Stage("finetune", "images", 50, lr, p_img)]  # epochs capped by the time budget
    return [Stage("scratch", "images", cfg.epochs or 30, lr, p_img)]


@dataclass
class Context:
    """What every stage needs."""

    cfg: TrainConfig
    splits: Splits
    model: ImageClassifier
    pp: Preprocess
    device: torch.device
    state: RunState
    bad: BadFileLog
    workers: int
    deadline: float | None = None  # time.time() by which --time-budget ends training
    tb: object | None = None  # tensorboard SummaryWriter
    class_weights: torch.Tensor | None = None
    features_per_s: float | None = field(default=None)  # measured, to size a budgeted fine-tuning stage

    @property
    def multi_label(self) -> bool:
        return self.splits.multi_label

    def targets(self, labels) -> np.ndarray:
        """Labels as the loss wants them: class indices, or 0/1 rows for multi-label."""
        return multi_hot(labels, len(self.splits.classes)) if self.multi_label else np.asarray(labels)

    def save_best(self, temperature: float = 1.0, extra: dict | None = None) -> dict:
        """Write model.pt from the best weights so far; returns the record."""
        if self.multi_label:
            extra = {"multi_label": True, **(extra or {})}
        rec = best_record(self.model, self.state, self.cfg.model, self.splits.classes, self.pp, temperature, extra)
        save_record(rec, self.state.run)
        return rec


def run_stages(ctx: Context, stages: list[Stage], budgeted: bool) -> None:
    """Run the planned stages from where the run state says (after --resume)."""
    model, state = ctx.model, ctx.state
    for i in range(state.stage_idx, len(stages)):
        stage = stages[i]
        if state.stage_idx != i:
            state.stage_idx, state.epoch, state.stage_epochs = i, 0, 0
        fresh = state.epoch == 0  # not resuming inside this stage
        if stage.kind == "images" and budgeted:
            if fresh:
                state.stage_epochs = finetune_epochs_in_budget(ctx)
            if not state.stage_epochs:
                break
            stage.epochs = min(stage.epochs, state.stage_epochs)
        if i > 0 and fresh and state.best_state is not None:
            model.load_state_dict(state.best_state)  # each stage starts from the best so far
        for p in model.backbone.parameters():
            p.requires_grad_(stage.kind == "images")
        (run_feature_stage if stage.kind == "features" else run_image_stage)(ctx, stage)
        if stage.kind == "features":
            ctx.save_best()
        if ctx.deadline is not None and time.time() > ctx.deadline:
            break
    model.load_state_dict(state.best_state)  # the best epoch's weights, not the last epoch's


# ---------------------------------------------------------------- head on cached features

def cached_features(ctx: Context) -> tuple[torch.Tensor, ...]:
    """Train features (plain, and mirrored unless --no-flip-features) and val
    features from the frozen backbone, through the on-disk cache."""
    cfg, model = ctx.cfg, ctx.model
    t0 = time.time()
    extractor = FeatureExtractor(model.backbone, ctx.pp, ctx.device, cfg.engine, cfg.cache_dir)
    variants = ("plain", "flip") if cfg.flip_features else ("plain",)
    root, train = ctx.splits.root, ctx.splits.train
    tr_hashes = [file_hash(Path(root) / r) for r, _ in train]
    tr_caches = feature_caches(cfg.cache_dir, cfg.model, extractor.backbone_hash, ctx.pp, variants, cfg.cache)
    n_cached = sum(all(c is not None and h in c.load() for c in tr_caches.values()) for h in tr_hashes)
    ftr, ytr, _ = extract(extractor, root, train, tr_caches, cfg.batch_size, ctx.workers, ctx.bad,
                          "features train", hashes=tr_hashes)
    va_caches = feature_caches(cfg.cache_dir, cfg.model, extractor.backbone_hash, ctx.pp, ("plain",), cfg.cache)
    fva, yva, _ = extract(extractor, root, ctx.splits.val, va_caches, cfg.batch_size, ctx.workers, ctx.bad,
                          "features val")
    secs = time.time() - t0
    n_new = len(train) - n_cached
    log(f"features: {len(ytr)} train x {len(variants)} ({'+'.join(variants)}), {len(yva)} val in {secs:.1f}s "
        f"[{extractor.engine}; {n_cached}/{len(train)} train images from cache; {extractor.encoded} images encoded]")
    if n_new > 20 and secs > 0:
        ctx.features_per_s = (n_new * len(variants) + len(ctx.splits.val)) / secs
    if len(ytr) == 0 or len(yva) == 0:
        raise DataError("no readable images in the train or validation split", "see the skipped files above")
    dev = ctx.device
    X = torch.from_numpy(np.concatenate([ftr[v] for v in variants])).to(dev)
    Y = torch.from_numpy(np.concatenate([ctx.targets(ytr)] * len(variants))).to(dev)
    return X, Y, torch.from_numpy(fva["plain"]).to(dev), torch.from_numpy(ctx.targets(yva)).to(dev)


def _feature_batches(X: torch.Tensor, Y: torch.Tensor, batch_size: int, shuffle: bool, gen: torch.Generator | None):
    idx = torch.randperm(len(X), generator=gen) if shuffle else torch.arange(len(X))
    for i in range(0, len(X), batch_size):
        j = idx[i:i + batch_size]
        yield X[j], Y[j]


def run_feature_stage(ctx: Context, stage: Stage) -> None:
    cfg = ctx.cfg
    X, Y, Xv, Yv = cached_features(ctx)
    head = ctx.model.head.to(ctx.device)
    steps = (len(X) + cfg.feature_batch_size - 1) // cfg.feature_batch_size
    opt = torch.optim.AdamW(head.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.epochs * steps, int(cfg.warmup_epochs * steps)))
    # A head's matmuls are tiny: with 2 OpenMP threads each op pays thread
    # wake-up and, when another process holds a core, spin-waits (measured: a
    # 128x1280 dropout took 9 ms instead of 0.1 ms). One thread is faster.
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        train_epochs(ctx, stage, head, "head", opt, sched,
                     train_batches=lambda gen: _feature_batches(X, Y, cfg.feature_batch_size, True, gen),
                     val_batches=lambda: _feature_batches(Xv, Yv, 1024, False, None), prepare=None)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- whole network on images

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
    else:
        groups = [{"params": model.parameters(), "lr": stage.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps = (len(ctx.splits.train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.epochs * steps, int(cfg.warmup_epochs * steps)))
    return opt, sched


def _balanced_sampler(ctx: Context):
    labels = torch.tensor([y for _, y in ctx.splits.train])
    w = balanced_class_weights(labels, len(ctx.splits.classes))[labels]
    g = torch.Generator()
    g.manual_seed(ctx.cfg.seed)
    return torch.utils.data.WeightedRandomSampler(w.double(), len(labels), replacement=True, generator=g)


def run_image_stage(ctx: Context, stage: Stage) -> None:
    cfg, model, pp, dev = ctx.cfg, ctx.model, ctx.pp, ctx.device
    root, tr, va = ctx.splits.root, ctx.splits.train, ctx.splits.val
    sampler = _balanced_sampler(ctx) if cfg.balanced_sampler else None
    n_ml = len(ctx.splits.classes) if ctx.multi_label else None
    tr_ds = ImageDataset(root, tr, train_transform(pp, cfg.augment), draft_size=pp.draft_size, num_classes=n_ml)
    va_ds = ImageDataset(root, va, eval_transform(pp), draft_size=pp.draft_size, num_classes=n_ml)
    model.to(dev)
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(True)
    opt, sched = _optimizer(ctx, stage)

    def prepare(x):
        x = normalize(x, pp)
        return x.contiguous(memory_format=torch.channels_last) if dev.type == "cpu" else x

    def train_batches(gen):
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        return _ImageBatches(make_loader(tr_ds, cfg.batch_size, True, ctx.workers, seed=seed, sampler=sampler), tr, ctx.bad)

    train_epochs(ctx, stage, model, "all", opt, sched, train_batches,
                 val_batches=lambda: _ImageBatches(make_loader(va_ds, cfg.batch_size, False, ctx.workers), va, ctx.bad),
                 prepare=prepare, images=len(tr))


# ---------------------------------------------------------------- the epoch loop

def train_epochs(ctx: Context, stage: Stage, module, scope: str, opt, sched, train_batches, val_batches,
                 prepare, images: int | None = None) -> None:
    """train_one_epoch + evaluate per epoch; keep the best, checkpoint, stop early."""
    cfg, state, dev = ctx.cfg, ctx.state, ctx.device
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()  # bf16 needs no loss scaling
    loss_fn = make_loss(ctx.class_weights.to(dev) if ctx.class_weights is not None else None, cfg.label_smoothing,
                        ctx.multi_label)
    # Unweighted: comparable across settings. Multi-label runs stop on mAP (threshold-free).
    val_loss_fn = torch.nn.BCEWithLogitsLoss() if ctx.multi_label else torch.nn.CrossEntropyLoss()
    stopper = EarlyStopping(stage.patience, "map" if ctx.multi_label and cfg.monitor != "loss" else cfg.monitor)
    if state.opt_state is not None:  # resuming inside this stage
        opt.load_state_dict(state.opt_state)
        sched.load_state_dict(state.sched_state)
        stopper.load_state_dict(state.stopper_state)
        state.opt_state = state.sched_state = state.stopper_state = None
    gen = torch.Generator()
    for epoch in range(state.epoch, stage.epochs):
        gen.manual_seed(cfg.seed * 1000 + state.stage_idx * 100 + epoch)  # same order after a resume
        t0 = time.time()
        with Progress(total=images, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", unit="img",
                      enabled=images is not None) as bar:
            tr = train_one_epoch(module, train_batches(gen), loss_fn, opt, sched, dev, amp,
                                 progress=bar if images else None, prepare=prepare, deadline=ctx.deadline)
        va = evaluate(module, val_batches(), val_loss_fn, dev, amp, prepare)
        secs = time.time() - t0
        state.epoch, state.elapsed = epoch + 1, state.elapsed + secs
        row = _history_row(stage, state, epoch, tr, va, opt, secs)
        stopper.step(va, epoch)
        improved = state.consider(ctx.model, stopper.score(va), {**va, "stage": stage.name, "epoch": row["epoch"]}, scope)
        _report_epoch(ctx, stage, row, improved, verbose=images is not None or epoch % 10 == 9 or
                      (improved and epoch < 3) or stopper.should_stop)
        state.checkpoint(ctx.model, scope, opt, sched, stopper)
        if improved and images is not None:
            ctx.save_best()  # a slow epoch's best is never lost to a crash
        if _should_stop(ctx, stage, stopper, secs):
            break
    if ctx.tb is not None:
        ctx.tb.flush()


def _history_row(stage: Stage, state: RunState, epoch: int, tr: dict, va: dict, opt, secs: float) -> dict:
    row = {"stage": stage.name, "epoch": len(state.history) + 1, "stage_epoch": epoch + 1,
           "train_loss": round(tr["loss"], 5), "train_acc": round(tr["acc"], 5),
           "val_loss": round(va["loss"], 5), "val_acc": round(va["acc"], 5),
           "val_balanced_acc": round(va["balanced_acc"], 5), **({"val_map": round(va["map"], 5)} if "map" in va else {}),
           "lr": opt.param_groups[0]["lr"], "seconds": round(secs, 3)}
    state.history.append(row)
    return row


def _report_epoch(ctx: Context, stage: Stage, row: dict, improved: bool, verbose: bool) -> None:
    if ctx.tb is not None:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr"):
            ctx.tb.add_scalar(k, row[k], row["epoch"])
    if verbose:
        log(f"{stage.name} epoch {row['stage_epoch']:>3}/{stage.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
            + (f"mAP {row['val_map']:.4f}  " if "val_map" in row else "") +
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}")


def _should_stop(ctx: Context, stage: Stage, stopper: EarlyStopping, secs: float) -> bool:
    if stopper.should_stop:
        log(f"early stopping: no improvement in {stage.patience} epochs; "
            f"best was epoch {ctx.state.best_metrics.get('epoch')}")
        return True
    if ctx.deadline is not None and time.time() > ctx.deadline:
        log("time budget reached")
        return True
    if stage.name == "finetune" and ctx.deadline is not None and time.time() + secs > ctx.deadline:
        log("time budget: not enough left for another epoch")
        return True
    return False


def finetune_epochs_in_budget(ctx: Context) -> int:
    """How many fine-tuning epochs fit in what is left of --time-budget.
    An epoch costs about 10x a frozen forward pass over the training images
    (backward pass, eager PyTorch instead of onnxruntime, augmentation; the
    plain recipe measures 340 s against our 31 s on cats_and_dogs_filtered)
    plus a forward pass over the validation images."""
    left = ctx.deadline - time.time()
    rate = ctx.features_per_s or 30.0
    est = 10 * len(ctx.splits.train) / rate + 2 * len(ctx.splits.val) / rate
    n = int(left // est)
    if n < 1:
        log(f"time budget: {left:.0f}s left, a fine-tuning epoch needs about {est:.0f}s; keeping the linear head")
        return 0
    log(f"time budget: {left:.0f}s left, fine-tuning for {n} epoch(s) of about {est:.0f}s")
    return n
