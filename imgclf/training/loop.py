"""The training loop's named parts, as torchvision's references have them:
`train_one_epoch`, `validate` (torchvision's `evaluate`; `imgclf evaluate` is
evaluation/evaluate.py), a warm-up + cosine schedule and early stopping.

The loops take any iterable of (x, y) batches, so the same code trains a head
on cached features and a whole network on images. Nothing here knows about
processes: under torchrun, wrap the model in DDP and give the loader a
DistributedSampler, and these functions run unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.evaluation.metrics import mean_average_precision


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):
    """LR multiplier per step: linear warm-up, then cosine decay to `floor`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train_one_epoch(model: nn.Module, batches, loss_fn, optimizer, scheduler=None, device=torch.device("cpu"),
                    amp: bool = False, progress=None, prepare=None, deadline: float | None = None,
                    frozen_bn: bool = False) -> dict:
    """One pass over `batches`. `prepare(x)` turns a raw batch into model input
    (e.g. uint8 images -> normalised floats). frozen_bn: batch norm layers
    normalise with their running statistics and do not update them (their
    scale and shift still train). Returns mean loss, accuracy, images, seconds
    and whether it stopped early for the deadline."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    t0, n, loss_sum, correct, stopped = time.time(), 0, 0.0, 0, False
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if prepare is not None:
            x = prepare(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        b = len(y)
        n += b
        loss_sum += loss.item() * b
        correct += hits(logits, y).sum().item()
        if progress is not None:
            progress.update(b, loss=f"{loss_sum / n:.4f}")
        if deadline is not None and time.time() > deadline:
            stopped = True
            break
    return {"loss": loss_sum / max(1, n), "acc": correct / max(1, n), "n": n,
            "seconds": time.time() - t0, "stopped": stopped}


@torch.inference_mode()
def predict_logits(model: nn.Module, batches, device=torch.device("cpu"), amp: bool = False, prepare=None):
    """All logits and targets of `batches` (targets may be None)."""
    model.eval()
    outs, ys = [], []
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        if prepare is not None:
            x = prepare(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outs.append(model(x).float().cpu())
        ys.append(y.cpu() if isinstance(y, torch.Tensor) else y)  # features on the GPU: targets there too
    return torch.cat(outs), (torch.cat(ys) if ys and ys[0] is not None else None)


def hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness: the top class; multi-label (y is 0/1 per label):
    every label right at probability 0.5 (subset accuracy)."""
    if y.dim() == 2:
        return ((logits > 0) == (y > 0.5)).all(1)
    return logits.argmax(1) == y


def validate(model: nn.Module, batches, loss_fn, device=torch.device("cpu"), amp: bool = False, prepare=None,
             gather=None) -> dict:
    """One epoch's validation: loss, accuracy ("acc") and balanced accuracy
    ("balanced_acc") of `model` on `batches`; multi-label: loss, subset
    accuracy ("acc") and mAP ("map", what early stopping watches).
    gather(logits, y) -> (logits, y) joins the shares of several processes."""
    logits, y = predict_logits(model, batches, device, amp, prepare)
    if gather is not None:
        logits, y = gather(logits, y)
    if y.dim() == 2:
        m = mean_average_precision(y.numpy(), torch.sigmoid(logits).numpy())
        return {"loss": loss_fn(logits, y).item(), "acc": hits(logits, y).float().mean().item(), "map": m, "n": len(y)}
    pred = logits.argmax(1)
    per_class = [(pred[y == c] == c).float().mean().item() for c in y.unique()]
    return {"loss": loss_fn(logits, y).item(), "acc": (pred == y).float().mean().item(),
            "balanced_acc": sum(per_class) / max(1, len(per_class)), "n": len(y)}


@dataclass
class EarlyStopping:
    """Tracks the best validation score; `step` says whether this epoch is the
    new best, `should_stop` whether `patience` epochs passed without one.

    Ties on accuracy are broken by lower loss, so on a small validation set a
    model that is as accurate but more confident still counts as better."""

    patience: int
    monitor: str = "acc"  # acc | balanced_acc | loss; multi-label: map | loss
    best: tuple | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)

    def score(self, metrics: dict) -> tuple:
        if self.monitor == "loss":
            return (-metrics["loss"],)
        return (metrics[self.monitor], -metrics["loss"])

    def step(self, metrics: dict, epoch: int) -> bool:
        s = self.score(metrics)
        if self.best is None or s > self.best:
            self.best, self.best_epoch, self.bad_epochs = s, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": list(self.best) if self.best else None, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "patience": self.patience, "monitor": self.monitor}

    def load_state_dict(self, d: dict) -> None:
        self.best = tuple(d["best"]) if d.get("best") else None
        self.best_epoch, self.bad_epochs = d["best_epoch"], d["bad_epochs"]


def make_loss(class_weights: torch.Tensor | None, label_smoothing: float, multi_label: bool = False) -> nn.Module:
    """Cross-entropy; multi-label: binary cross-entropy per label, the weights
    being positive-class weights for rare labels."""
    if multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def positive_weights(targets, cap: float = 20.0) -> torch.Tensor:
    """Multi-label: n_negative / n_positive per label (capped), so a rare label's
    positives weigh as much in the loss as its negatives."""
    y = torch.as_tensor(targets, dtype=torch.float32)
    pos = y.sum(0)
    return ((len(y) - pos) / pos.clamp(min=1)).clamp(max=cap)


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """n / (k * count_c), scikit-learn's 'balanced' weights; absent classes get 0."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float()
    w = counts.sum() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))
