"""The state of one training run, what `last.pt` saves and `--resume` restores,
and model.pt written from the best epoch's weights. Every file is written
atomically: a crash leaves the previous checkpoint, never half of one."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from imgclf.io import torch_save_atomic
from imgclf.models.records import make_model_record
from imgclf.models.registry import ImageClassifier
from imgclf.runs import RunDir

CKPT_KEYS = ("config", "stage_idx", "epoch", "history", "scope", "trainable", "optimizer", "scheduler", "stopper", "rng")


def scope_state(model: ImageClassifier, scope: str) -> dict:
    """A detached CPU copy of the head's ("head") or the whole model's ("all") weights."""
    sd = model.head.state_dict() if scope == "head" else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


class RunState:
    """Mutable state of one training run: history, position, best weights."""

    def __init__(self, config: dict, run: RunDir, world_size: int = 1):
        self.config, self.run = config, run
        self.world_size = world_size  # processes (torchrun): an image stage resumes only on as many
        self.history: list[dict] = []
        self.stage_idx = 0
        self.epoch = 0  # completed epochs in the current stage
        self.best_score: tuple | None = None
        self.best_state: dict | None = None  # full model state
        self.best_scope = "head"
        self.best_metrics: dict = {}
        self.elapsed = 0.0
        self.opt_state = self.sched_state = self.stopper_state = None  # set by restore, consumed by the stage
        self.stage_epochs = 0  # planned epochs of a budget-sized stage

    def consider(self, model: ImageClassifier, score: tuple, metrics: dict, scope: str) -> bool:
        """Keep the model's weights if `score` beats the best so far."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_metrics, self.best_scope = score, dict(metrics), scope
            self.best_state = scope_state(model, "all")
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
            "format_version": 1, "config": self.config, "stage_idx": self.stage_idx, "epoch": self.epoch,
            "history": self.history, "scope": scope, "trainable": scope_state(model, scope),
            "best": best, "best_scope": self.best_scope if best is not None else None,
            "best_score": list(self.best_score) if self.best_score else None, "best_metrics": self.best_metrics,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "stopper": stopper.state_dict() if stopper else None,
            "elapsed": self.elapsed, "rng": torch.get_rng_state(), "stage_epochs": self.stage_epochs,
            "world_size": self.world_size,
        }, self.run.last_file)

    def restore(self, ckpt: dict, model: ImageClassifier) -> None:
        self.history, self.stage_idx, self.epoch = ckpt["history"], ckpt["stage_idx"], ckpt["epoch"]
        self.elapsed = ckpt.get("elapsed", 0.0)
        self.stage_epochs = ckpt.get("stage_epochs", 0)
        (model.head if ckpt["scope"] == "head" else model).load_state_dict(ckpt["trainable"])
        if ckpt.get("best") is not None:
            full = scope_state(model, "all")
            if ckpt["best_scope"] == "head" and ckpt["scope"] == "head":
                full.update({"head." + k: v for k, v in ckpt["best"].items()})
            else:
                full = ckpt["best"]
            self.best_state, self.best_scope = full, ckpt["best_scope"]
            self.best_score, self.best_metrics = tuple(ckpt["best_score"]), ckpt["best_metrics"]
        self.opt_state, self.sched_state, self.stopper_state = ckpt["optimizer"], ckpt["scheduler"], ckpt["stopper"]
        torch.set_rng_state(ckpt["rng"])


def best_record(model: ImageClassifier, state: RunState, model_name: str, classes: list[str], pp,
                temperature: float = 1.0, extra: dict | None = None) -> dict:
    """The model record of the best epoch's weights (what model.pt holds)."""
    best = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if state.best_state is not None:
        best.load_state_dict(state.best_state)
    return make_model_record(best, model_name, classes, pp, state.config, temperature,
                             extra={"best": state.best_metrics, **(extra or {})})


def save_record(record: dict, run: RunDir) -> Path:
    torch_save_atomic(record, run.model_file)
    return run.model_file
