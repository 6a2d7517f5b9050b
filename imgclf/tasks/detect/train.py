"""`imgclf train` on detection labels: the recipe, top to bottom.

  resolve the config -> read the labels, split them, name what `check` would
  -> the model (pretrained Lite trunk + FPN + RetinaNet head)
  -> batches: the frozen trunk's maps cached once (auto), or augmented images (finetune)
  -> epochs: validate on val through the predictor, keep the best by val mAP,
     last.pt after each, early stopping, --time-budget
  -> per-class score thresholds (F1-optimal on val) -> model.pt -> evaluate on the held-out split

The CPU-first default (auto): the trunk stays frozen with its ImageNet
weights, so its maps of every training image and its mirror are computed once
and only the FPN and head train, a few seconds per epoch on 2 cores.
Shared with classification, not copied: RunDir/RunLock, RunState (last.pt,
--resume), EarlyStopping and the warm-up + cosine schedule, Dist (torchrun),
the seeds and threads.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import replace

import numpy as np
import torch

from imgclf.config import TrainConfig
from imgclf.data.preprocess import Preprocess
from imgclf.errors import ConfigError, RunError
from imgclf.io import torch_load, torch_save_atomic, write_history, write_json
from imgclf.log import get_logger
from imgclf.runs import RunDir, RunLock
from imgclf.tasks.detect.check import check_dataset, format_summary, split_dataset, suggest_image_size
from imgclf.tasks.detect.data import DetDataset
from imgclf.tasks.detect.evaluate import evaluate_split, val_metrics
from imgclf.tasks.detect.formats import read_dataset
from imgclf.tasks.detect.loop import AugmentedImages, CachedFeatures, image_loader, train_one_epoch
from imgclf.tasks.detect.model import Detector, detector_record
from imgclf.tasks.detect.splits import DetSplits
from imgclf.tasks.detect.torch_predictor import TorchDetPredictor
from imgclf.training.checkpoint import CKPT_KEYS, RunState
from imgclf.training.distributed import Dist, init_distributed
from imgclf.training.epochs import say
from imgclf.training.loop import EarlyStopping, warmup_cosine
from imgclf.training.tracking import Tracker, parse_sinks
from imgclf.training.train import free_run_dir, seed_everything, set_threads

log = get_logger(__name__)

# What detection uses where a flag keeps classification's default (measured on
# a BCCD val split, docs/benchmarks.md): Lite0 (the cached trunk runs once per
# image, the head does the work), 4 images per step (small sets need steps).
DEFAULTS = {"model": "efficientnet_lite0", "batch_size": 4, "epochs": 12, "lr": 2e-3, "patience": 5}
STRATEGIES = {"auto": "cached", "linear": "cached", "finetune": "images", "scratch": "images"}


def train(cfg: TrainConfig) -> dict:
    """Train a detector; returns the run's summary (also RUN/summary.json)."""
    dist, device = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, dist, device, held)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, held: contextlib.ExitStack) -> dict:
    t0 = time.time()
    cfg, run, ckpt = resolve_config(cfg)
    ds = read_dataset(cfg.data)
    splits = DetSplits.read(run) if ckpt else dist.broadcast(new_splits(cfg, ds) if dist.main else None)
    if dist.main:
        held.enter_context(RunLock(run.path, splits.run_id))
    cfg = resolve_sizes(cfg, ds)
    set_threads(device, dist)
    seed_everything(cfg.seed)
    items = splits.indices(ds)
    if not ckpt and dist.main:
        describe(cfg, ds, items, run)
        write_json(run.config_file, {**cfg.to_dict(), "task": "detect", "run_id": splits.run_id})
        splits.write(run)
    pp = Preprocess(size=cfg.image_size, resize="pad", interpolation="bilinear")
    masks = any(im.mask_path for im in ds.images)  # instance masks in the data: the model learns them too
    model = Detector(len(ds.classes), backbone=cfg.model, image_size=cfg.image_size, pretrained=cfg.pretrained,
                     weights=cfg.weights, freeze_backbone=STRATEGIES[cfg.strategy] == "cached",
                     masks=masks).to(device)
    state = RunState(cfg.to_dict(), run, dist.world)
    tracker = Tracker.open(parse_sinks(cfg.log, cfg.tensorboard), run.path, cfg.to_dict(), main=dist.main)
    fit(cfg, model, ds, items, pp, state, ckpt, dist, device, t0, tracker)
    if not dist.main:
        return {}
    summary = finish(cfg, run, model, ds, items, pp, state, splits, dist, device, t0)
    tracker.finish(run.path, summary["test"])
    return summary


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, RunDir, dict | None]:
    """The config (the checkpoint's when resuming), detection's defaults where
    a flag kept classification's, and the run directory."""
    if cfg.resume:
        run = RunDir(cfg.out)
        if not run.last_file.exists():
            raise RunError(f"{run.last_file} not found: nothing to resume", f"start a run with `imgclf train DATA "
                           f"--out {run}`")
        ckpt = torch_load(run.last_file, CKPT_KEYS)
        say(f"resuming {run}: {ckpt['epoch']} epochs done")
        return replace(TrainConfig.from_dict(ckpt["config"]), resume=True), run, ckpt
    if not cfg.data:
        raise ConfigError("no data given", "imgclf train DATA --out RUN")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {cfg.strategy} is not one detection has",
                          f"use one of {', '.join(STRATEGIES)} (auto: frozen trunk, cached maps)")
    base = TrainConfig()
    cfg = replace(cfg, task="detect", out=cfg.out or str(free_run_dir(cfg.data)),
                  model=DEFAULTS["model"] if cfg.model == base.model else cfg.model,
                  batch_size=DEFAULTS["batch_size"] if cfg.batch_size == base.batch_size else cfg.batch_size,
                  epochs=cfg.epochs or DEFAULTS["epochs"], lr=cfg.lr or DEFAULTS["lr"],
                  patience=cfg.patience or DEFAULTS["patience"])
    if not cfg.model.startswith("efficientnet_lite"):
        raise ConfigError(f"--model {cfg.model}: detection uses an EfficientNet-Lite backbone",
                          "choose efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2")
    run = RunDir(cfg.out)
    if run.model_file.exists() or run.last_file.exists():
        raise RunError(f"{run} already holds a run", f"continue it with `imgclf train --resume --out {run}`, "
                       f"or pick another --out (or delete {run})")
    return cfg, run, None


def resolve_sizes(cfg: TrainConfig, ds: DetDataset) -> TrainConfig:
    """--image-size, else the size at which the small boxes still span 16 px."""
    if cfg.image_size is None:
        cfg = replace(cfg, image_size=suggest_image_size(ds))
        say(f"input size {cfg.image_size} px (from the box sizes; --image-size to choose)")
    return cfg


def new_splits(cfg: TrainConfig, ds: DetDataset) -> DetSplits:
    sp = split_dataset(ds, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return DetSplits.of(ds, sp, cfg.data, uuid.uuid4().hex[:12])


def describe(cfg: TrainConfig, ds: DetDataset, items: dict[str, list[int]], run: RunDir) -> None:
    """Once, before training: the split, and what `imgclf check` would warn about."""
    say(f"detect: {ds.format} labels, {len(ds.classes)} classes ({', '.join(ds.classes)}), "
        + ", ".join(f"{len(v)} {k}" for k, v in items.items()) + f" images -> {run}")
    for line in format_summary(check_dataset(ds, cfg.image_size, split=items)):  # leakage judged on this run's split
        say(line)
    if not items["val"]:
        raise ConfigError("the split leaves no validation images", "give --val-fraction 0.1 or more, or more images")


def fit(cfg: TrainConfig, model: Detector, ds: DetDataset, items: dict, pp: Preprocess, state: RunState,
        ckpt: dict | None, dist: Dist, device: torch.device, t0: float, tracker: Tracker | None = None) -> None:
    """The epochs: train, validate (rank 0), keep the best, checkpoint, stop
    early or at the time budget. Restores the best weights at the end."""
    train_items = dist.shard(items["train"])[: len(items["train"]) // dist.world]  # equal shares: no rank waits
    cached = STRATEGIES[cfg.strategy] == "cached"
    batches = (CachedFeatures(model, ds, train_items, pp, cfg.batch_size, True, cfg.seed, device, cfg.workers or 0)
               if cached else image_loader(AugmentedImages(ds, train_items, pp.size), pp.size, cfg.batch_size,
                                           cfg.workers or 0, True, cfg.seed))
    net = model
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt, sched, plan = optimizer(cfg, net, len(batches), cached)
    stopper = EarlyStopping(cfg.patience, monitor="map")
    if ckpt:
        state.restore(ckpt, net)
        opt.load_state_dict(ckpt["optimizer"]), sched.load_state_dict(ckpt["scheduler"])
        stopper.load_state_dict(ckpt["stopper"])
        plan.done = state.epoch
    deadline = t0 + cfg.time_budget - state.elapsed if cfg.time_budget else None
    for epoch in range(state.epoch, cfg.epochs):
        if not cached and epoch == cfg.epochs // 3:
            net.freeze_backbone(False)  # finetune: the trunk joins once the head has settled
        if cached:
            batches.epoch = epoch
        elif hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        t = time.time()
        # One process may stop mid-epoch at the deadline; several stop together, at epoch ends (rank 0 decides).
        tr = train_one_epoch(model, opt, batches, sched, device, amp=device.type == "cuda",
                             deadline=None if dist.enabled else deadline)
        stop = run_epoch_end(cfg, net, ds, items, pp, state, stopper, epoch, tr, device, opt, sched, tracker) if dist.main \
            else None
        plan.after_epoch(time.time() - t, deadline)
        out_of_time = deadline is not None and time.time() + (time.time() - t) > deadline
        if dist.broadcast(bool(stop or tr["stopped"] or out_of_time) if dist.main else None):
            break
    if state.best_state is not None:
        net.load_state_dict(state.best_state)


def optimizer(cfg: TrainConfig, net: Detector, steps_per_epoch: int, cached: bool):
    """AdamW, the trunk (when it trains) at a tenth of the head's rate; warm-up
    then cosine over the planned steps (re-planned under a time budget)."""
    head = [p for n, p in net.named_parameters() if not n.startswith("det.backbone.body.")]
    groups = [{"params": head, "lr": cfg.lr}]
    if not cached:
        groups.append({"params": list(net.det.backbone.body.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    plan = Plan(cfg.epochs, steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, plan), plan


class Plan:
    """The learning-rate multiplier per step; under --time-budget the epochs
    that fit are re-estimated after each one, and the cosine ends with them.
    Plain numbers only: LambdaLR saves this object's state in last.pt."""

    def __init__(self, epochs: int, steps: int, warmup: int):
        self.epochs, self.steps, self.warmup, self.done = epochs, steps, warmup, 0

    def __call__(self, step: int) -> float:
        return warmup_cosine(self.epochs * self.steps, self.warmup)(step)

    def after_epoch(self, seconds: float, deadline: float | None) -> None:
        self.done += 1
        if deadline is not None:
            self.epochs = min(self.epochs, self.done + max(0, int((deadline - time.time()) / max(seconds, 1e-3))))


def run_epoch_end(cfg: TrainConfig, net: Detector, ds: DetDataset, items: dict, pp: Preprocess, state: RunState,
                  stopper: EarlyStopping, epoch: int, tr: dict, device, opt, sched, tracker: Tracker | None = None) -> bool:
    """Rank 0: validate, keep the best, write history and last.pt; whether to stop."""
    m = val_metrics(TorchDetPredictor(net, ds.classes, pp, np.zeros(len(ds.classes)), device), ds, items["val"])
    net.train()
    m["loss"] = tr["loss"]
    improved = stopper.step(m, epoch)
    if improved:
        state.consider(net, stopper.best, m, "all")
    state.epoch, state.elapsed = epoch + 1, state.elapsed + tr["seconds"]
    row = {"epoch": epoch + 1, **{k: round(v, 5) for k, v in tr.items() if k not in ("n", "stopped")},
           "val_map": round(m["map"], 4), "val_map50": round(m["map50"], 4), "lr": opt.param_groups[0]["lr"]}
    state.history.append(row)
    state.checkpoint(net, "all", opt, sched, stopper)  # last.pt first: it is what --resume continues from
    if tracker:
        tracker.epoch(row)
    write_history(state.run.history_file, state.history)
    say(f"epoch {epoch + 1}/{cfg.epochs}  loss {tr['loss']:.4f}  val mAP {m['map']:.3f}  mAP@.5 {m['map50']:.3f}"
        f"  {tr['seconds']:.0f}s" + ("  *" if improved else ""))
    return stopper.should_stop


def finish(cfg: TrainConfig, run: RunDir, model: Detector, ds: DetDataset, items: dict, pp: Preprocess,
           state: RunState, splits: DetSplits, dist: Dist, device, t0: float) -> dict:
    """model.pt with the best epoch's weights and its thresholds, then the held-out figures."""
    best = state.best_metrics
    thr = [best.get("thresholds", {}).get(c, 0.5) for c in ds.classes]
    rec = detector_record(model, ds.classes, pp.to_dict(), thr, extra={
        "run_id": splits.run_id, "config": cfg.to_dict(),
        "best": {k: v for k, v in best.items() if not isinstance(v, dict)}})
    torch_save_atomic(rec, run.model_file)
    say(f"best epoch {stopper_epoch(state)}: val mAP {best.get('map', 0):.3f}, "
        f"mAP@.5 {best.get('map50', 0):.3f} -> {run.model_file}")
    pred = TorchDetPredictor(model, ds.classes, pp, thr, device, str(run.model_file))
    held = "test" if items["test"] else "val"
    test = evaluate_split(run, pred, ds, items[held], held, report=cfg.evaluate) if cfg.evaluate else None
    summary = {"task": "detect", "run": str(run), "data": cfg.data, "strategy": cfg.strategy, "model": cfg.model,
               "image_size": cfg.image_size, "epochs_run": state.epoch, "seconds": round(time.time() - t0, 1),
               "val": rec["best"], "thresholds": dict(zip(ds.classes, thr)),
               "held_out": held, "distributed": dist.describe(cfg.batch_size), "test": {k: v for k, v in (test or {}).items() if k != "f1"} or None}
    write_json(run.summary_file, summary)
    if held == "val":
        log.warning("no test split: the figures above are on val, which chose the epoch (not held out)")
    return summary


def stopper_epoch(state: RunState) -> int:
    """The 1-based epoch whose weights were kept (from the history)."""
    best = max(state.history, key=lambda r: (r["val_map"], -r["loss"]), default={"epoch": 0})
    return best["epoch"]
