"""`imgclf train`: a plain sequence of named steps.

  resolve config -> split data -> check files -> build model -> choose strategy
  -> run stages (head on cached features | whole network on images)
  -> restore best weights -> save run -> evaluate on held-out data

Stages:
  linear    head only, on cached frozen-backbone features (seconds per epoch)
  finetune  head on cached features, then every layer on images with a lower
            learning rate for the backbone
  scratch   every layer on images from random initialisation
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import (BadFileLog, DataError, ImageDataset, Splits, default_workers, discover, file_hash, make_loader,
                   scan)
from .engine import (EarlyStopping, balanced_class_weights, evaluate, make_loss, train_one_epoch, warmup_cosine)
from .features import FeatureCache, FeatureExtractor, default_cache_dir, extract, feature_key, state_hash
from .models import ImageClassifier, build_model, count_params, get_model_info
from .preprocess import Preprocess, eval_transform, normalize, train_transform
from .progress import Progress
from .runs import (make_model_record, read_json, torch_load, torch_save_atomic, write_history, write_json)


class RunExists(Exception):
    pass


@dataclass
class TrainResult:
    run: Path
    strategy: str
    best: dict  # validation metrics of the restored best epoch
    test: dict | None  # metrics on the held-out split, if evaluated
    seconds: float


def log(msg: str) -> None:
    print(msg, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_preprocess(cfg: TrainConfig) -> Preprocess:
    pp = copy.deepcopy(get_model_info(cfg.model).preprocess)
    if cfg.image_size:
        pp.size = cfg.image_size
    if cfg.resize:
        pp.resize = cfg.resize
    return pp


def choose_strategy(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """The fastest path to a good model for this model and hardware, and why."""
    info = get_model_info(cfg.model)
    pretrained = info.pretrained and (cfg.pretrained or cfg.weights)
    if cfg.strategy != "auto":
        if cfg.strategy in ("linear", "finetune") and not pretrained:
            raise ValueError(f"--strategy {cfg.strategy} needs a pretrained backbone; {cfg.model} has none here "
                             f"(use --strategy scratch, or drop --no-pretrained)")
        return cfg.strategy, "chosen with --strategy"
    if not pretrained:
        return "scratch", f"{cfg.model} has no pretrained weights in use, so every layer is trained"
    if device.type == "cuda":
        return "finetune", "GPU: fine-tuning every layer is affordable and usually the most accurate"
    if cfg.time_budget:
        return "linear+finetune", (f"CPU with --time-budget {cfg.time_budget:g}s: a head on cached features first, "
                                   "then fine-tuning for as long as the budget allows")
    return "linear", ("CPU: the frozen backbone's features are computed once and cached, so the head trains in "
                      "seconds; full fine-tuning recomputes them every epoch (about 10x slower per epoch)")


def set_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))


# ---------------------------------------------------------------- checkpoints

def _scope_state(model: ImageClassifier, scope: str) -> dict:
    sd = model.head.state_dict() if scope == "head" else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def _load_scope(model: ImageClassifier, scope: str, sd: dict) -> None:
    (model.head if scope == "head" else model).load_state_dict(sd)


class Run:
    """Mutable state of one training run, what `last.pt` saves."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.history: list[dict] = []
        self.stage_idx = 0
        self.epoch = 0  # completed epochs in the current stage
        self.best_score: tuple | None = None
        self.best_state: dict | None = None  # full model state
        self.best_scope = "head"
        self.best_metrics: dict = {}
        self.elapsed = 0.0
        self.opt_state = None
        self.sched_state = None
        self.stopper_state = None
        self.stage_epochs = 0  # planned epochs of a budget-sized stage

    def consider(self, model: ImageClassifier, score: tuple, metrics: dict, scope: str) -> bool:
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_metrics, self.best_scope = score, dict(metrics), scope
            self.best_state = _scope_state(model, "all")
            return True
        return False

    def checkpoint(self, model: ImageClassifier, scope: str, optimizer, scheduler, stopper) -> None:
        """last.pt: with a frozen backbone only the head is saved (the backbone
        is rebuilt from its pretrained weights on resume), so checkpointing a
        100-epoch head stage costs kilobytes, not 100 x 14 MB."""
        best = self.best_state
        if best is not None and self.best_scope == "head" and scope == "head":
            best = {k[len("head."):]: v for k, v in best.items() if k.startswith("head.")}
        torch_save_atomic({
            "format_version": 1, "config": self.cfg.to_dict(), "stage_idx": self.stage_idx, "epoch": self.epoch,
            "history": self.history, "scope": scope, "trainable": _scope_state(model, scope),
            "best": best, "best_scope": self.best_scope if best is not None else None,
            "best_score": list(self.best_score) if self.best_score else None, "best_metrics": self.best_metrics,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "stopper": stopper.state_dict() if stopper else None,
            "elapsed": self.elapsed, "rng": torch.get_rng_state(), "stage_epochs": self.stage_epochs,
        }, self.out / "last.pt")

    def restore(self, ckpt: dict, model: ImageClassifier) -> None:
        self.history, self.stage_idx, self.epoch = ckpt["history"], ckpt["stage_idx"], ckpt["epoch"]
        self.elapsed = ckpt.get("elapsed", 0.0)
        self.stage_epochs = ckpt.get("stage_epochs", 0)
        _load_scope(model, ckpt["scope"], ckpt["trainable"])
        if ckpt.get("best") is not None:
            full = _scope_state(model, "all")
            if ckpt["best_scope"] == "head" and ckpt["scope"] == "head":
                full.update({"head." + k: v for k, v in ckpt["best"].items()})
            else:
                full = ckpt["best"]
            self.best_state, self.best_scope = full, ckpt["best_scope"]
            self.best_score, self.best_metrics = tuple(ckpt["best_score"]), ckpt["best_metrics"]
        self.opt_state, self.sched_state, self.stopper_state = ckpt["optimizer"], ckpt["scheduler"], ckpt["stopper"]
        torch.set_rng_state(ckpt["rng"])


# ---------------------------------------------------------------- stages

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


def _feature_batches(X: torch.Tensor, Y: torch.Tensor, batch_size: int, shuffle: bool, gen: torch.Generator | None):
    idx = torch.randperm(len(X), generator=gen) if shuffle else torch.arange(len(X))
    for i in range(0, len(X), batch_size):
        j = idx[i:i + batch_size]
        yield X[j], Y[j]


class Context:
    """What every stage needs: config, data, model, device, run state."""

    def __init__(self, cfg, splits, model, pp, device, run, bad, deadline, tb):
        self.cfg, self.splits, self.model, self.pp, self.device = cfg, splits, model, pp, device
        self.run, self.bad, self.deadline, self.tb = run, bad, deadline, tb
        self.workers = cfg.workers if cfg.workers is not None else default_workers()
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.class_weights = None
        if cfg.class_weights == "auto":
            self.class_weights = balanced_class_weights([y for _, y in splits.train], len(splits.classes))
        self.features_per_s: float | None = None


def _caches(ctx: Context, variants: tuple[str, ...], bhash: str) -> dict[str, FeatureCache | None]:
    out = {}
    for v in variants:
        key = feature_key(ctx.cfg.model, bhash, ctx.pp, v)
        out[v] = FeatureCache(ctx.cache_dir, key, {"model": ctx.cfg.model, "size": ctx.pp.size, "variant": v,
                                                   "resize": ctx.pp.resize}) if ctx.cfg.cache else None
    return out


def run_feature_stage(ctx: Context, stage: Stage) -> None:
    cfg, model, run = ctx.cfg, ctx.model, ctx.run
    t0 = time.time()
    bhash = state_hash(model.backbone)
    extractor = FeatureExtractor(model.backbone, ctx.pp, ctx.device, cfg.engine, ctx.cache_dir, bhash)
    variants = ("plain", "flip") if cfg.flip_features else ("plain",)
    root = ctx.splits.root
    tr_hashes = [file_hash(Path(root) / r) for r, _ in ctx.splits.train]
    tr_caches = _caches(ctx, variants, bhash)
    n_cached = sum(all(c is not None and h in c.load() for c in tr_caches.values()) for h in tr_hashes)
    ftr, ytr, _ = extract(extractor, root, ctx.splits.train, tr_caches, cfg.batch_size,
                          ctx.workers, ctx.bad, "features train", hashes=tr_hashes)
    fva, yva, _ = extract(extractor, root, ctx.splits.val, _caches(ctx, ("plain",), bhash), cfg.batch_size,
                          ctx.workers, ctx.bad, "features val")
    secs = time.time() - t0
    n_new = len(ctx.splits.train) - n_cached
    computed = n_new * len(variants) + len(ctx.splits.val)
    log(f"features: {len(ytr)} train x {len(variants)} ({'+'.join(variants)}), {len(yva)} val in {secs:.1f}s "
        f"[{extractor.engine}; {n_cached}/{len(ctx.splits.train)} train images from cache]")
    if n_new > 20 and secs > 0:
        ctx.features_per_s = computed / secs
    if len(ytr) == 0 or len(yva) == 0:
        raise DataError("no readable images in the train or validation split; see the skipped files above")

    X = torch.from_numpy(np.concatenate([ftr[v] for v in variants])).to(ctx.device)
    Y = torch.from_numpy(np.concatenate([ytr] * len(variants))).to(ctx.device)
    Xv, Yv = torch.from_numpy(fva["plain"]).to(ctx.device), torch.from_numpy(yva).to(ctx.device)
    head = model.head.to(ctx.device)
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
        _train_epochs(ctx, stage, head, "head", opt, sched,
                      train_batches=lambda gen: _feature_batches(X, Y, cfg.feature_batch_size, True, gen),
                      val_batches=lambda: _feature_batches(Xv, Yv, 1024, False, None), prepare=None)
    finally:
        torch.set_num_threads(threads)


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


def run_image_stage(ctx: Context, stage: Stage) -> None:
    cfg, model, pp, dev = ctx.cfg, ctx.model, ctx.pp, ctx.device
    root, tr, va = ctx.splits.root, ctx.splits.train, ctx.splits.val
    sampler = None
    if cfg.balanced_sampler:
        labels = torch.tensor([y for _, y in tr])
        w = balanced_class_weights(labels, len(ctx.splits.classes))[labels]
        g = torch.Generator()
        g.manual_seed(cfg.seed)
        sampler = torch.utils.data.WeightedRandomSampler(w.double(), len(tr), replacement=True, generator=g)
    tr_ds = ImageDataset(root, tr, train_transform(pp, cfg.augment), draft_size=pp.draft_size)
    va_ds = ImageDataset(root, va, eval_transform(pp), draft_size=pp.draft_size)
    model.to(dev)
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(True)
    lr = stage.lr
    if stage.name == "finetune":
        groups = [{"params": model.head.parameters(), "lr": lr},
                  {"params": model.backbone.parameters(), "lr": lr * cfg.backbone_lr_mult}]
    else:
        groups = [{"params": model.parameters(), "lr": lr}]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps = (len(tr) + cfg.batch_size - 1) // cfg.batch_size
    warm = int(cfg.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.epochs * steps, warm))

    def prepare(x):
        x = normalize(x, pp)
        return x.contiguous(memory_format=torch.channels_last) if dev.type == "cpu" else x

    def train_batches(gen):
        loader = make_loader(tr_ds, cfg.batch_size, True, ctx.workers, seed=int(torch.randint(0, 2**31, (1,), generator=gen)), sampler=sampler)
        return _ImageBatches(loader, tr, ctx.bad)

    _train_epochs(ctx, stage, model, "all", opt, sched, train_batches,
                  val_batches=lambda: _ImageBatches(make_loader(va_ds, cfg.batch_size, False, ctx.workers), va, ctx.bad),
                  prepare=prepare, images=len(tr))


def _train_epochs(ctx: Context, stage: Stage, module, scope: str, opt, sched, train_batches, val_batches,
                  prepare, images: int | None = None) -> None:
    cfg, run, model, dev = ctx.cfg, ctx.run, ctx.model, ctx.device
    # bf16 autocast needs no loss scaling; older GPUs without bf16 run in fp32.
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    loss_fn = make_loss(ctx.class_weights.to(dev) if ctx.class_weights is not None else None, cfg.label_smoothing)
    val_loss_fn = torch.nn.CrossEntropyLoss()  # plain CE: comparable across settings
    stopper = EarlyStopping(stage.patience, cfg.monitor)
    if run.opt_state is not None:  # resuming inside this stage
        opt.load_state_dict(run.opt_state)
        sched.load_state_dict(run.sched_state)
        stopper.load_state_dict(run.stopper_state)
        run.opt_state = run.sched_state = run.stopper_state = None
    gen = torch.Generator()
    t_stage = time.time()
    for epoch in range(run.epoch, stage.epochs):
        gen.manual_seed(cfg.seed * 1000 + run.stage_idx * 100 + epoch)  # same order after a resume
        t0 = time.time()
        with Progress(total=images, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", unit="img",
                      enabled=images is not None) as bar:
            tr = train_one_epoch(module, train_batches(gen), loss_fn, opt, sched, dev, amp,
                                 progress=bar if images else None, prepare=prepare, deadline=ctx.deadline)
        va = evaluate(module, val_batches(), val_loss_fn, dev, amp, prepare)
        secs = time.time() - t0
        run.epoch = epoch + 1
        run.elapsed += secs
        row = {"stage": stage.name, "epoch": len(run.history) + 1, "stage_epoch": epoch + 1,
               "train_loss": round(tr["loss"], 5), "train_acc": round(tr["acc"], 5),
               "val_loss": round(va["loss"], 5), "val_acc": round(va["acc"], 5),
               "val_balanced_acc": round(va["balanced_acc"], 5), "lr": opt.param_groups[0]["lr"],
               "seconds": round(secs, 3)}
        run.history.append(row)
        stopper.step(va, epoch)
        improved = run.consider(model, stopper.score(va), {**va, "stage": stage.name, "epoch": row["epoch"]}, scope)
        if ctx.tb is not None:
            for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr"):
                ctx.tb.add_scalar(k, row[k], row["epoch"])
        if images is not None or epoch % 10 == 9 or improved and epoch < 3 or stopper.should_stop:
            log(f"{stage.name} epoch {epoch + 1:>3}/{stage.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                f"val loss {va['loss']:.4f} acc {va['acc']:.4f}  {secs:.1f}s{'  *best' if improved else ''}")
        run.checkpoint(model, scope, opt, sched, stopper)
        if improved and images is not None:
            save_model(ctx, final=False)  # a slow epoch's best is never lost to a crash
        if stopper.should_stop:
            log(f"early stopping: no improvement in {stage.patience} epochs; best was epoch {run.best_metrics.get('epoch')}")
            break
        if ctx.deadline is not None and time.time() > ctx.deadline:
            log("time budget reached")
            break
        if stage.name == "finetune" and ctx.deadline is not None:
            if time.time() + secs > ctx.deadline:  # next epoch would not finish in time
                log("time budget: not enough left for another epoch")
                break
    if ctx.tb is not None:
        ctx.tb.flush()


def save_model(ctx: Context, final: bool = True) -> Path:
    """model.pt from the best state (atomic)."""
    run = ctx.run
    model = copy.deepcopy(ctx.model).cpu().to(memory_format=torch.contiguous_format)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    rec = make_model_record(model, ctx.cfg.model, ctx.splits.classes, ctx.pp, ctx.cfg.to_dict(),
                            extra={"best": run.best_metrics})
    path = run.out / "model.pt"
    torch_save_atomic(rec, path)
    return path


# ---------------------------------------------------------------- entry point

def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train a classifier; the settings are TrainConfig's fields, e.g.
    `imgclf.train(data="photos", out="runs/photos", epochs=20)`."""
    cfg = replace(config or TrainConfig(), **overrides)
    if isinstance(cfg.head_hidden, (str, list)):
        cfg.head_hidden = _parse_ints(cfg.head_hidden)
    t_start = time.time()
    if not cfg.out:
        if cfg.resume:
            raise ValueError("--resume needs the run to continue: imgclf train --resume --out RUN")
        cfg.out = str(_free_run_dir(cfg.data))
    out = Path(cfg.out)
    ckpt = None
    if cfg.resume:
        if not (out / "last.pt").exists():
            raise RunExists(f"{out}/last.pt not found: nothing to resume. Start a run with `imgclf train DATA --out {out}`")
        ckpt = torch_load(out / "last.pt")
        saved = TrainConfig.from_dict(ckpt["config"])
        cfg = replace(saved, resume=True, workers=cfg.workers if cfg.workers is not None else saved.workers)
        splits = Splits.from_dict(read_json(out / "splits.json"))
        log(f"resuming {out}: stage {ckpt['stage_idx'] + 1}, {ckpt['epoch']} epochs done")
    else:
        if not cfg.data:
            raise ValueError("no data given: `imgclf train DATA --out RUN`")
        if (out / "model.pt").exists() or (out / "last.pt").exists():
            raise RunExists(f"{out} already holds a run. Continue it with `imgclf train --resume --out {out}`, "
                            f"or pick another --out (or delete {out}).")
        splits = discover(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    set_threads(device)
    seed_everything(cfg.seed)
    pp = resolve_preprocess(cfg)
    strategy, why = choose_strategy(cfg, device)
    log(f"data: {splits.root} ({splits.layout}), {len(splits.classes)} classes: {', '.join(splits.classes[:10])}"
        f"{' ...' if len(splits.classes) > 10 else ''}")
    log(f"split: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test")
    for note in splits.notes:
        log(f"note: {note}")
    if not ckpt:
        write_json(out / "splits.json", splits.to_dict())
        write_json(out / "config.json", cfg.to_dict())
    bad = BadFileLog(log)
    for rel, reason in scan(splits):
        bad.add(rel, reason)
    for name in ("train", "val"):
        if not getattr(splits, name):
            raise DataError(f"the {name} split has no readable images; add images or check the skipped files above")

    model = build_model(cfg.model, len(splits.classes), pretrained=cfg.pretrained, weights=cfg.weights,
                        head_hidden=cfg.head_hidden, dropout=cfg.dropout)
    log(f"model: {cfg.model} ({count_params(model) / 1e6:.1f}M parameters), input {pp.size}px {pp.resize}, "
        f"device {device}{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}")
    log(f"strategy: {strategy}: {why}")
    run = Run(cfg, out)
    if ckpt:
        run.restore(ckpt, model)
    tb = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        tb = SummaryWriter(str(out / "tensorboard"))
    deadline = t_start - run.elapsed + cfg.time_budget if cfg.time_budget else None
    ctx = Context(cfg, splits, model, pp, device, run, bad, deadline, tb)
    stages = plan_stages(strategy, cfg)
    try:
        for i in range(run.stage_idx, len(stages)):
            stage = stages[i]
            if run.stage_idx != i:
                run.stage_idx, run.epoch, run.stage_epochs = i, 0, 0
            fresh = run.epoch == 0  # not resuming inside this stage
            if stage.kind == "images" and strategy == "linear+finetune":
                if fresh:
                    run.stage_epochs = _finetune_epochs_in_budget(ctx)
                if not run.stage_epochs:
                    break
                stage.epochs = min(stage.epochs, run.stage_epochs)
            if i > 0 and fresh and run.best_state is not None:
                model.load_state_dict(run.best_state)  # each stage starts from the best so far
            for p in model.backbone.parameters():
                p.requires_grad_(stage.kind == "images")
            (run_feature_stage if stage.kind == "features" else run_image_stage)(ctx, stage)
            if stage.kind == "features":
                save_model(ctx, final=False)
            if ctx.deadline is not None and time.time() > ctx.deadline:
                break
    except KeyboardInterrupt:
        log(f"\ninterrupted: the last completed epoch is saved; continue with `imgclf train --resume --out {out}`")
        raise
    # The best epoch's weights, not the last epoch's, are what we keep.
    model.load_state_dict(run.best_state)
    path = save_model(ctx)
    write_history(out / "history.csv", run.history)
    secs = time.time() - t_start
    best = run.best_metrics
    log(f"best: {best.get('stage')} epoch {best.get('epoch')}, val acc {best.get('acc', 0):.4f}, "
        f"val loss {best.get('loss', 0):.4f}; trained in {secs:.1f}s; saved {path}")
    summary = {"strategy": strategy, "why": why, "device": str(device), "train_seconds": round(secs, 2),
               "best": best, "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()],
               "skipped": len(bad.seen), "counts": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
               "features_per_second": ctx.features_per_s}
    if bad.seen:
        log(f"skipped {len(bad.seen)} unreadable file(s); listed in {out / 'summary.json'}")
    write_json(out / "summary.json", summary)
    test = None
    if cfg.evaluate:
        from .evaluate import evaluate_run

        test = evaluate_run(out, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir, workers=ctx.workers)
        # Files that only fail when decoded (truncated data) may sit in the test split.
        known = {d["path"] for d in summary["skipped_files"]}
        summary["skipped_files"] += [d for d in test.get("skipped_files", []) if d["path"] not in known]
        summary["skipped"] = len(summary["skipped_files"])
    total = time.time() - t_start
    summary["total_seconds"] = round(total, 2)
    write_json(out / "summary.json", summary)
    log(f"done in {total:.1f}s. Run: {out}  (predict: imgclf predict {out} IMAGE...)")
    return TrainResult(out, strategy, best, test, total)


def _finetune_epochs_in_budget(ctx: Context) -> int:
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


def _free_run_dir(data: str) -> Path:
    """runs/<data name>, or runs/<data name>-2, -3... if taken (as Ultralytics numbers exp, exp2...)."""
    name = Path(data).stem or "exp"
    for i in range(1, 10000):
        p = Path("runs") / (name if i == 1 else f"{name}-{i}")
        if not p.exists():
            return p
    raise RunExists("runs/ holds 10,000 runs of this name; pass --out")


def _parse_ints(v) -> tuple[int, ...]:
    if isinstance(v, str):
        return tuple(int(s) for s in v.replace(" ", "").split(",") if s)
    return tuple(int(s) for s in v)
