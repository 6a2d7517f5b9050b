"""What every training stage is given (`Context`, its `Stage` from the plan)
and the one epoch loop it hands its batches to (`train_epochs`: train,
validate, keep the best, checkpoint, stop early). Under torchrun the loop
gathers validation from every rank and only rank 0 keeps, reports and writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgclf.config import TrainConfig
from imgclf.data.datasets import Splits, multi_hot
from imgclf.data.loading import BadFileLog, hash_files
from imgclf.data.preprocess import Preprocess
from imgclf.log import Progress, get_logger
from imgclf.models.registry import ImageClassifier
from imgclf.training.checkpoint import RunState, best_record, save_record
from imgclf.training.distributed import Dist, is_main
from imgclf.training.loop import EarlyStopping, make_loss, train_one_epoch, validate
from imgclf.training.tracking import Tracker

log = get_logger(__name__)


def say(msg: str) -> None:
    """A line of the training story (logger "imgclf.training"), from rank 0 only: one voice under torchrun."""
    if is_main():
        log.info(msg)


@dataclass
class Stage:
    name: str  # "head" | "finetune" | "scratch" | "native"
    kind: str  # "features" | "images" | "memory" (images decoded once, kept as tensors)
    epochs: int
    lr: float
    patience: int


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
    tracker: Tracker = field(default_factory=Tracker)  # --log: TensorBoard / MLflow (rank 0)
    class_weights: torch.Tensor | None = None
    features_per_s: float | None = field(default=None)  # measured, to size a budgeted fine-tuning stage
    dist: Dist = field(default_factory=Dist)  # this process's place under torchrun (one process: world 1)
    strategy: str = ""
    decode_pp: Preprocess | None = None  # memory stages: decoded at this, resized to pp.size per batch (lowres)
    decoded: dict = field(default_factory=dict)  # split -> (X, Y, kept) already decoded by decode_pp (the race)
    _hashes: dict = field(default_factory=dict)

    def hashes(self, split: str) -> list[str]:
        """Content hashes of a split's files, computed once; under torchrun each
        rank hashes its share (a collective: every rank calls it together)."""
        if split not in self._hashes:
            items = getattr(self.splits, split)
            mine = hash_files([Path(self.splits.root) / rel for rel, _ in self.dist.shard(items)])
            self._hashes[split] = self.dist.gather_shards(mine)
        return self._hashes[split]

    @property
    def multi_label(self) -> bool:
        return self.splits.multi_label

    @property
    def monitor(self) -> str:
        """What early stopping and the best model watch: --monitor; multi-label
        runs watch mAP (threshold-free) unless it is loss."""
        return "map" if self.multi_label and self.cfg.monitor != "loss" else self.cfg.monitor

    def targets(self, labels) -> np.ndarray:
        """Labels as the loss wants them: class indices, or 0/1 rows for multi-label."""
        return multi_hot(labels, len(self.splits.classes)) if self.multi_label else np.asarray(labels)

    def best_record(self) -> dict:
        """The model record of the best weights so far (before the post-training fits)."""
        extra = {"multi_label": True} if self.multi_label else {}
        if self.splits.run_id:  # which run wrote it (runs.RunDir.check_one_run)
            extra["run_id"] = self.splits.run_id
        return best_record(self.model, self.state, self.cfg.model, self.splits.classes, self.pp, 1.0, extra)

    def save_best(self) -> dict:
        """Write model.pt from the best weights so far; returns the record (rank 0 only)."""
        rec = self.best_record()
        save_record(rec, self.state.run)
        return rec


def train_epochs(ctx: Context, stage: Stage, module, scope: str, opt, sched, train_batches, val_batches,
                 prepare, images: int | None = None, eval_module=None, solo: bool = False,
                 frozen_bn: bool = False) -> None:
    """train_one_epoch + validate per epoch; keep the best, checkpoint, stop early.
    Under torchrun: validation gathered from every rank, the stop decided on
    rank 0 and broadcast, only rank 0 keeps, reports and writes. solo: rank 0
    trains alone (the head on cached features), no collectives."""
    cfg, state, dev = ctx.cfg, ctx.state, ctx.device
    d = Dist() if solo else ctx.dist
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()  # bf16 needs no loss scaling
    loss_fn = make_loss(ctx.class_weights.to(dev) if ctx.class_weights is not None else None, cfg.label_smoothing,
                        ctx.multi_label)
    # Unweighted: comparable across settings. Multi-label runs stop on mAP (threshold-free).
    val_loss_fn = torch.nn.BCEWithLogitsLoss() if ctx.multi_label else torch.nn.CrossEntropyLoss()
    stopper = EarlyStopping(stage.patience, ctx.monitor)
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
                      enabled=images is not None and d.main) as bar:
            tr = train_one_epoch(module, train_batches(gen), loss_fn, opt, sched, dev, amp,
                                 progress=bar if images else None, prepare=prepare,
                                 deadline=None if d.enabled else ctx.deadline,  # ranks must not stop mid-epoch alone
                                 frozen_bn=frozen_bn)
        va = validate(eval_module or module, val_batches(), val_loss_fn, dev, amp, prepare,
                      gather=_gather_logits(d) if d.enabled else None)
        secs = time.time() - t0
        state.epoch, state.elapsed = epoch + 1, state.elapsed + secs
        row = history_row(stage, state, epoch, tr, va, opt, secs, d.world)
        stopper.step(va, epoch)
        if d.main:
            improved = state.consider(ctx.model, stopper.score(va), {**va, "stage": stage.name, "epoch": row["epoch"]},
                                      scope)
            _report_epoch(ctx, stage, row, improved, verbose=images is not None or epoch % 10 == 9 or
                          (improved and epoch < 3) or stopper.should_stop)
            state.checkpoint(ctx.model, scope, opt, sched, stopper)
            if improved and images is not None:
                ctx.save_best()  # a slow epoch's best is never lost to a crash
        if d.broadcast(_should_stop(ctx, stage, stopper, secs) if d.main else None):
            break


def _gather_logits(d: Dist):
    """Each rank's validation logits and targets -> all of them, on every rank."""
    def gather(logits: torch.Tensor, y: torch.Tensor):
        parts = d.gather([(logits, y)])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return gather


def history_row(stage: Stage, state: RunState, epoch: int, tr: dict, va: dict, opt, secs: float,
                 world: int = 1) -> dict:
    row = {"stage": stage.name, "epoch": len(state.history) + 1, "stage_epoch": epoch + 1,
           "train_loss": round(tr["loss"], 5), "train_acc": round(tr["acc"], 5),
           "val_loss": round(va["loss"], 5), "val_acc": round(va["acc"], 5),
           **{f"val_{k}": round(va[k], 5) for k in ("balanced_acc", "map") if k in va},
           "lr": opt.param_groups[0]["lr"] if opt else None, "seconds": round(secs, 3),
           # training throughput of all processes together (each trains its share in the same time)
           "train_images_per_s": round(tr["n"] * world / max(tr["seconds"], 1e-9), 1)}
    state.history.append(row)
    return row


def _report_epoch(ctx: Context, stage: Stage, row: dict, improved: bool, verbose: bool) -> None:
    ctx.tracker.epoch(row)
    if verbose:
        say(f"{stage.name} epoch {row['stage_epoch']:>3}/{stage.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
            + (f"mAP {row['val_map']:.4f}  " if "val_map" in row else "") +
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}")


def _should_stop(ctx: Context, stage: Stage, stopper: EarlyStopping, secs: float) -> bool:
    if stopper.should_stop:
        say(f"early stopping: no improvement in {stage.patience} epochs; "
            f"best was epoch {ctx.state.best_metrics.get('epoch')}")
        return True
    if ctx.deadline is not None and time.time() > ctx.deadline:
        say("time budget reached")
        return True
    if stage.name == "finetune" and ctx.deadline is not None and time.time() + secs > ctx.deadline:
        say("time budget: not enough left for another epoch")
        return True
    return False
