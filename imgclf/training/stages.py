"""Training stages: what `train` runs after it has data, a model and a plan.

  head      the head alone, on cached frozen-backbone features (seconds per epoch)
  finetune  every layer on augmented images, the backbone at a lower learning rate
  scratch   every layer on images from random initialisation
  native    every layer from scratch on small images decoded once into memory
            (uint8 tensors) and augmented there, at their own size
  lowres    the pretrained network, every layer, on small images decoded once
            into memory at their own size and upscaled per batch (64-128 px)

Each stage builds its batches and optimizer, then hands them to `train_epochs`,
the one epoch loop: train, validate, keep the best, checkpoint, stop early.
Under torchrun (distributed.py) the same functions run on every rank: the
feature stage shares the encoding, then rank 0 trains the head; image stages
wrap the model in DistributedDataParallel; only rank 0 writes.

Here: the plan (`plan_stages`) and running it (`run_stages`, --resume and
--time-budget included). The head stage is stage_head.py, the whole-network
stages stage_network.py, `Context` and the epoch loop epochs.py.
"""

from __future__ import annotations

import time

from imgclf.config import TrainConfig
from imgclf.training.epochs import Context, Stage, say
from imgclf.training.stage_head import run_feature_stage
from imgclf.training.stage_network import LOWRES_EPOCHS, LOWRES_LR, run_image_stage, run_memory_stage


def plan_stages(strategy: str, cfg: TrainConfig) -> list[Stage]:
    lr = cfg.lr or {"scratch": 2e-3, "native": 4e-3}.get(strategy, 1e-3)  # native: batches of 128 by default
    p_feat, p_img = cfg.patience or 15, cfg.patience or 3
    if strategy == "native":  # 14 epochs: chosen on the demo digits (docs/benchmarks.md, small grayscale images)
        return [Stage("native", "memory", cfg.epochs or 14, lr, cfg.patience or 6)]
    if strategy == "lowres":  # a pretrained network moves little: a lower rate, few epochs
        return [Stage("lowres", "memory", cfg.epochs or LOWRES_EPOCHS, cfg.lr or LOWRES_LR, cfg.patience or 3)]
    if strategy == "linear":
        return [Stage("head", "features", cfg.epochs or 100, lr, p_feat)]
    if strategy == "finetune":
        return [Stage("head", "features", cfg.head_epochs, lr, p_feat),
                Stage("finetune", "images", cfg.epochs or 8, lr, p_img)]
    if strategy == "linear+finetune":
        return [Stage("head", "features", cfg.epochs or 100, lr, p_feat),
                Stage("finetune", "images", 50, lr, p_img)]  # epochs capped by the time budget
    return [Stage("scratch", "images", cfg.epochs or 30, lr, p_img)]


def run_stages(ctx: Context, stages: list[Stage], budgeted: bool) -> None:
    """Run the planned stages from where the run state says (after --resume)."""
    model, state, main = ctx.model, ctx.state, ctx.dist.main
    for i in range(state.stage_idx, len(stages)):
        stage = stages[i]
        if state.stage_idx != i:
            state.stage_idx, state.epoch, state.stage_epochs = i, 0, 0
        fresh = state.epoch == 0  # not resuming inside this stage
        if stage.kind == "images" and budgeted:
            if fresh:
                state.stage_epochs = ctx.dist.broadcast(finetune_epochs_in_budget(ctx) if main else None)
            if not state.stage_epochs:
                break
            stage.epochs = min(stage.epochs, state.stage_epochs)
        if i > 0 and fresh and state.best_state is not None:
            model.load_state_dict(state.best_state)  # each stage starts from the best so far (DDP copies rank 0's)
        for p in model.backbone.parameters():
            p.requires_grad_(stage.kind != "features")
        run = {"features": run_feature_stage, "images": run_image_stage, "memory": run_memory_stage}[stage.kind]
        run(ctx, stage)
        if stage.kind == "features" and main:
            ctx.save_best()
        if i + 1 < len(stages) and ctx.dist.broadcast(ctx.deadline is not None and time.time() > ctx.deadline):
            break
    if main:
        model.load_state_dict(state.best_state)  # the best epoch's weights, not the last epoch's


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
        say(f"time budget: {left:.0f}s left, a fine-tuning epoch needs about {est:.0f}s; keeping the linear head")
        return 0
    say(f"time budget: {left:.0f}s left, fine-tuning for {n} epoch(s) of about {est:.0f}s")
    return n
