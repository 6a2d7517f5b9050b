"""`imgclf train`: the recipe, top to bottom.

  resolve config -> data and split -> check files -> model -> strategy
  -> stages (head on cached features | whole network on images)
  -> save the best epoch -> fit the temperature on val -> evaluate on held-out data

Which strategy and its settings: strategy.py (and race.py); stages live in
stages.py, checkpoints in checkpoint.py, the epoch functions in loop.py.
Strategies:
  linear    head only, on cached frozen-backbone features (seconds per epoch)
  finetune  head on cached features, then every layer on images with a lower
            learning rate for the backbone
  scratch   every layer on images from random initialisation
  native    small images (<= 64 px, or grayscale <= 128 px): small_cnn from
            scratch at their own size, decoded once into memory
  lowres    small images: the pretrained backbone, every layer, fine-tuned at
            a modest upscale (96 px) from images decoded once into memory
`auto` on small colour images races linear, native and lowres on a sample
(race.py); on photos it keeps the size rule.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from imgclf.config import EvaluateConfig, TrainConfig
from imgclf.data.datasets import Splits, discover, drop_files, has_label, multi_hot
from imgclf.data.loading import BadFileLog, ImageLook, default_workers, look_at, scan
from imgclf.data.preprocess import Preprocess, native_preprocess
from imgclf.errors import ConfigError, DataError, RunError
from imgclf.evaluation.evaluate import evaluate_run
from imgclf.evaluation.fits import FitData, fit_after_training
from imgclf.inference.torch_predictor import TorchPredictor
from imgclf.io import read_json, torch_load, write_history, write_json
from imgclf.models.registry import SmallCNN, build_model, count_params, get_model_info
from imgclf.runs import RunDir, RunLock
from imgclf.training.checkpoint import CKPT_KEYS, RunState, save_record
from imgclf.training.distributed import Dist, init_distributed
from imgclf.training.epochs import Context, say
from imgclf.training.loop import balanced_class_weights, positive_weights
from imgclf.training.race import RaceResult, race_strategies
from imgclf.training.stages import plan_stages, run_stages
from imgclf.training.strategy import native_size, no_race_reason, strategy_for_run, strategy_settings
from imgclf.training.tracking import Tracker, parse_sinks


@dataclass
class TrainResult:
    run: Path
    strategy: str
    best: dict  # validation metrics of the restored best epoch
    test: dict | None  # metrics on the held-out split, if evaluated
    seconds: float
    calibration: dict | None = None  # temperature and val ECE before/after


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train a classifier; the settings are TrainConfig's fields, e.g.
    `imgclf.train(data="photos", out="runs/photos", epochs=20)`."""
    t_start = time.time()
    dist, device = init_distributed(overrides.get("device", (config or TrainConfig()).device))
    try:
        with contextlib.ExitStack() as held:
            return _train(config, overrides, dist, device, t_start, held)
    finally:
        dist.close()


def _train(config: TrainConfig | None, overrides: dict, dist: Dist, device, t_start: float,
           held: contextlib.ExitStack) -> TrainResult:
    cfg, run, ckpt, splits = resolve_run(config, overrides, dist)
    if dist.main:  # one writer per run directory, until training ends
        lock_run(held, run, splits)
    set_threads(device, dist)
    seed_everything(cfg.seed)
    look = look_at(splits, seed=cfg.seed) if cfg.strategy in ("auto", "native", "lowres") and not cfg.resume else None
    strategy, why = strategy_for_run(cfg, device, look, splits, dist)
    if dist.main:
        describe_found(splits)
    bad = check_files(splits, dist)  # before splits.json is written: it lists only files that were read
    race = run_race(cfg, splits, device, look, bad, why) if strategy == "race" else None
    if race is not None:
        strategy, why = race.winner, race.why
    cfg = strategy_settings(cfg, strategy, look, fix=race is not None)
    pp = resolve_preprocess(cfg)
    if dist.main:
        describe_data(splits, run, fresh=ckpt is None, cfg=cfg)
    model = build_network(cfg, len(splits.classes))
    describe_plan(cfg, model, pp, device, strategy, why, dist)
    state = RunState(cfg.to_dict(), run, dist.world)
    if ckpt:
        state.restore(ckpt, model)
    ctx = make_context(cfg, splits, model, pp, device, state, bad, t_start, dist, strategy)
    take_decoded(ctx, race)
    train_stages(ctx, strategy)
    if not dist.main:  # rank 0 alone calibrates, evaluates and writes the run
        return TrainResult(run.path, strategy, {}, None, round(time.time() - t_start, 2))
    return finish_run(ctx, strategy, why, race, look, t_start)


# ---------------------------------------------------------------- the recipe's steps

def lock_run(held: contextlib.ExitStack, run: RunDir, splits: Splits) -> None:
    """Hold the run directory's lock until training ends: one writer per run."""
    lock = held.enter_context(RunLock(run.path, splits.run_id))
    if lock.took_over:
        say(f"note: {run}: {lock.took_over}")


def run_race(cfg: TrainConfig, splits: Splits, device: torch.device, look: ImageLook, bad: BadFileLog,
             why: str) -> RaceResult:
    """`auto` on small colour images: the candidates race on a sample (race.py)."""
    say(f"strategy: race: {why}")
    return race_strategies(cfg, splits, device, native_size(cfg, look), bad,
                           cfg.workers if cfg.workers is not None else default_workers(),
                           lambda s: settled(cfg, s, look))


def build_network(cfg: TrainConfig, num_classes: int):
    """The model the config names; with --from, the earlier run's backbone in it."""
    model = build_model(cfg.model, num_classes, pretrained=cfg.pretrained, weights=cfg.weights,
                        head_hidden=cfg.head_hidden, dropout=cfg.dropout)
    if cfg.from_run:  # also on --resume: a checkpoint of a frozen-backbone stage holds only the head
        load_earlier_backbone(model, cfg.from_run)
    return model


def describe_plan(cfg: TrainConfig, model, pp: Preprocess, device: torch.device, strategy: str, why: str,
                  dist: Dist) -> None:
    """Say which model trains how, where and why."""
    say(f"model: {cfg.model} ({count_params(model) / 1e6:.1f}M parameters), input {pp.size}px {pp.resize}, "
        f"device {device}{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}")
    say(f"strategy: {strategy}: {why}")
    if dist.enabled:
        say(f"distributed: {dist.world} processes on {dist.nodes} node(s), {dist.backend}; batch {cfg.batch_size} "
            f"per process, {cfg.batch_size * dist.world} in all")


def take_decoded(ctx: Context, race: RaceResult | None) -> None:
    """lowres decodes at its own size; images the race decoded already are not decoded again."""
    if ctx.strategy == "lowres":
        ctx.decode_pp = native_preprocess(ctx.cfg.decode_size)
    if race is not None and ctx.strategy in ("native", "lowres"):
        ctx.decoded = race.decoded  # decoded once, at the size the winner trains from
        race.hand_over(ctx)  # the winner's race model, when it is this run's so far


def train_stages(ctx: Context, strategy: str) -> None:
    """The planned stages; on Ctrl-C the last completed epoch is kept for --resume."""
    try:
        run_stages(ctx, plan_stages(strategy, ctx.cfg), budgeted=strategy == "linear+finetune")
    except KeyboardInterrupt:
        say(f"\ninterrupted: the last completed epoch is saved; continue with `imgclf train --resume --out "
            f"{ctx.state.run}`")
        ctx.tracker.close(failed=True)
        raise


def finish_run(ctx: Context, strategy: str, why: str, race: RaceResult | None, look: ImageLook | None,
               t_start: float) -> TrainResult:
    """Rank 0: one predictor of the best weights, in memory (one backbone
    session): the post-training fits go into it, it is saved as model.pt, and
    it evaluates the held-out split; then the history and the summary."""
    cfg, state, run = ctx.cfg, ctx.state, ctx.state.run
    clf = predictor(ctx, ctx.best_record())
    data = FitData(ctx.splits.root, ctx.splits.train, ctx.splits.val, cfg.batch_size, ctx.workers, ctx.bad, cfg.cache)
    calibration = fit_after_training(clf, data, cfg.threshold, cfg.reject, cfg.seed).get("calibration")
    save_record(clf.record, run)
    write_history(run.history_file, state.history)
    summary = write_summary(ctx, strategy, why, calibration, t_start)
    summary["race"] = race.to_dict() if race is not None else {"ran": False, "why": no_race_reason(cfg, look)}
    test = evaluate_held_out(ctx, summary, clf) if cfg.evaluate else None
    summary["total_seconds"] = round(time.time() - t_start, 2)
    forget_skipped(ctx, summary)
    write_json(run.summary_file, summary)
    ctx.tracker.finish(run.path, test, ctx.splits.classes)
    say(f"done in {summary['total_seconds']:.1f}s. Run: {run}  (predict: imgclf predict {run} IMAGE...)")
    return TrainResult(run.path, strategy, state.best_metrics, test, summary["total_seconds"], calibration)


def resolve_run(config: TrainConfig | None, overrides: dict, dist: Dist | None = None
                ) -> tuple[TrainConfig, RunDir, dict | None, Splits]:
    """The config (from the checkpoint when resuming), the run directory, the
    checkpoint to resume from, and the data split (listed by rank 0 and sent
    to the others under torchrun)."""
    dist = dist or Dist()
    cfg = replace(config or TrainConfig(), **overrides)
    if isinstance(cfg.head_hidden, (str, list)):
        cfg.head_hidden = parse_ints(cfg.head_hidden)
    if not cfg.out:
        if cfg.resume:
            raise ConfigError("--resume needs the run to continue", "imgclf train --resume --out RUN")
        cfg.out = str(free_run_dir(cfg.data))
    run = RunDir(cfg.out)
    if cfg.resume:
        if not run.last_file.exists():
            raise RunError(f"{run.last_file} not found: nothing to resume",
                           f"start a run with `imgclf train DATA --out {run}`")
        ckpt = torch_load(run.last_file, CKPT_KEYS)
        check_world_size(ckpt, dist, run)
        saved = TrainConfig.from_dict(ckpt["config"])
        cfg = replace(saved, resume=True, workers=cfg.workers if cfg.workers is not None else saved.workers)
        say(f"resuming {run}: stage {ckpt['stage_idx'] + 1}, {ckpt['epoch']} epochs done")
        cfg.validate()
        return cfg, run, ckpt, run.splits()
    if not cfg.data:
        raise ConfigError("no data given", "imgclf train DATA --out RUN")
    if run.model_file.exists() or run.last_file.exists():
        raise RunError(f"{run} already holds a run", f"continue it with `imgclf train --resume --out {run}`, "
                       f"or pick another --out (or delete {run})")
    earlier = None
    if cfg.from_run:
        cfg, earlier = settings_from(cfg)
    cfg.validate()
    splits = None
    if dist.main:
        splits = discover(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.multi_label, cfg.follow_links)
        splits = keep_split(splits, earlier) if earlier is not None else splits
        splits.run_id = uuid.uuid4().hex[:12]  # in splits.json, config.json and model.pt alike
    return cfg, run, None, dist.broadcast(splits)


def check_world_size(ckpt: dict, dist: Dist, run: RunDir) -> None:
    """Features stages resume on any number of processes (rank 0 trains the
    head); an image stage's optimizer steps, sampler order and learning-rate
    schedule were made for its global batch, so it continues only on as many."""
    saved = ckpt.get("world_size", 1)
    if ckpt["scope"] == "all" and saved != dist.world:
        how = f"torchrun --nproc-per-node {saved} -m imgclf train" if saved > 1 else "imgclf train"
        raise ConfigError(f"{run} was fine-tuning with {saved} process(es) and this resume has {dist.world}: the "
                          f"global batch, sampler order and schedule would change mid-stage",
                          f"resume with as many: `{how} --resume --out {run}` (on several machines: the same "
                          f"total number of processes)")


# Never taken from the earlier run: what names this run and where it starts.
OWN_FIELDS = ("data", "out", "resume", "from_run", "task")  # task: the registry resolved it, not the user


def settings_from(cfg: TrainConfig) -> tuple[TrainConfig, Splits]:
    """--from RUN: the earlier run's settings, except the flags given now
    (those that differ from the defaults), and its split."""
    from dataclasses import fields

    earlier = RunDir(cfg.from_run)
    earlier.require_model()
    saved = TrainConfig.from_dict(read_json(earlier.config_file))
    default = TrainConfig()
    given = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)
             if f.name in OWN_FIELDS or getattr(cfg, f.name) != getattr(default, f.name)}
    if given.get("model", saved.model) != saved.model:
        raise ConfigError(f"--model {cfg.model} differs from {earlier}'s {saved.model}; --from continues from its "
                          f"backbone", "drop --model, or train afresh without --from")
    merged = replace(saved, **given)
    if isinstance(merged.head_hidden, list):
        merged.head_hidden = tuple(merged.head_hidden)
    say(f"from {earlier}: its settings ({', '.join(sorted(set(given) - set(OWN_FIELDS))) or 'none'} given here), "
        f"backbone, split and feature cache")
    return merged, earlier.splits()


def keep_split(new: Splits, old: Splits) -> Splits:
    """Files the earlier run had stay in its split (its test images stay
    unseen, whatever the new files do to the shuffle); new files keep the
    split they were given. Split folders are used as given."""
    if new.layout == "split-folders":
        return new
    where = {rel: name for name in ("train", "val", "test") for rel, _ in getattr(old, name)}
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for name in parts:
        for rel, y in getattr(new, name):
            parts[where.get(rel, name)].append((rel, y))
    kept = sum(rel in where for p in parts.values() for rel, _ in p)
    note = f"--from: {kept} files keep the earlier run's split; {sum(map(len, parts.values())) - kept} new ones were split afresh"
    return replace(new, **{k: sorted(v) for k, v in parts.items()}, notes=[*new.notes, note])


def load_earlier_backbone(model, from_run: str) -> None:
    """The earlier run's backbone weights (fine-tuned ones included); the head
    starts afresh, since the classes may have changed."""
    rec = RunDir(from_run).record()
    prefix = "backbone."
    model.backbone.load_state_dict({k[len(prefix):]: v for k, v in rec["state_dict"].items() if k.startswith(prefix)})


def describe_found(splits: Splits) -> None:
    """Say what was found and noted (before the file check, which may refuse the data)."""
    kind = "labels (multi-label: several per image)" if splits.multi_label else "classes"
    say(f"data: {splits.root} ({splits.layout}), {len(splits.classes)} {kind}: {', '.join(splits.classes[:10])}"
        f"{' ...' if len(splits.classes) > 10 else ''}")
    for note in splits.notes:
        say(note if note.startswith("warning: ") else f"note: {note}")


def describe_data(splits: Splits, run: RunDir, fresh: bool, cfg: TrainConfig) -> None:
    """Say how many readable images each split holds; a new run records its split and config."""
    say(f"split: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test")
    if fresh:
        write_json(run.splits_file, splits.to_dict())
        write_json(run.config_file, {**cfg.to_dict(), "run_id": splits.run_id})


def check_files(splits: Splits, dist: Dist | None = None) -> BadFileLog:
    """Header-check every file (each rank a share under torchrun); unreadable
    ones are reported once and dropped."""
    dist = dist or Dist()
    bad = BadFileLog()
    for rel, reason in dist.gather(scan(splits, share=dist.shard)):
        bad.add(rel, reason)
    drop_files(splits, set(bad.seen))
    for name in ("train", "val"):
        if not getattr(splits, name):
            raise DataError(f"the {name} split has no readable images", "add images or check the skipped files above")
    empty = [c for i, c in enumerate(splits.classes) if not any(has_label(y, i) for _, y in splits.train)]
    if empty:  # an output the model could never predict: refused, not kept with a warning
        where = "rows of the CSV" if splits.layout.startswith("csv") else "class folders"
        why = [n for n in splits.notes if any(c in n for c in empty)]  # e.g. a folder it may not read
        raise DataError(f"class(es) {', '.join(empty)} have no readable training images, so the model could never "
                        f"predict them{''.join(f' ({n})' for n in why)}", f"add readable images to those {where}, "
                        f"or remove them (the skipped files above say why each was unreadable)")
    return bad


def make_context(cfg: TrainConfig, splits: Splits, model, pp: Preprocess, device: torch.device, state: RunState,
                 bad: BadFileLog, t_start: float, dist: Dist | None = None, strategy: str = "") -> Context:
    tracker = Tracker.open(parse_sinks(cfg.log, cfg.tensorboard), state.run.path, cfg.to_dict(),
                           main=dist is None or dist.main)
    weights = None
    if cfg.class_weights == "auto" and splits.multi_label:
        weights = positive_weights(multi_hot([y for _, y in splits.train], len(splits.classes)))
    elif cfg.class_weights == "auto":
        weights = balanced_class_weights([y for _, y in splits.train], len(splits.classes))
    if cfg.balanced_sampler and splits.multi_label:
        raise ConfigError("--balanced-sampler is for single-label data",
                          "for rare labels in multi-label data use --class-weights auto (positive weights per label)")
    dist = dist or Dist()
    workers = cfg.workers if cfg.workers is not None else default_workers() // dist.local_world  # a share per rank
    return Context(cfg, splits, model, pp, device, state, bad, workers=workers,
                   deadline=t_start - state.elapsed + cfg.time_budget if cfg.time_budget else None,
                   tracker=tracker, class_weights=weights, dist=dist, strategy=strategy)


def predictor(ctx: Context, record: dict) -> TorchPredictor:
    """The best weights as a TorchPredictor: what prediction will run, so
    calibration, thresholds and the unknown scorer are fitted on its outputs."""
    return TorchPredictor(record, device=ctx.cfg.device, engine=ctx.cfg.engine, cache_dir=ctx.cfg.cache_dir,
                          source=str(ctx.state.run))


def write_summary(ctx: Context, strategy: str, why: str, calibration: dict | None, t_start: float) -> dict:
    state, bad, splits = ctx.state, ctx.bad, ctx.splits
    secs = time.time() - t_start
    best = state.best_metrics
    say(f"best: {best.get('stage')} epoch {best.get('epoch')}, val acc {best.get('acc', 0):.4f}, "
        f"val loss {best.get('loss', 0):.4f}; trained in {secs:.1f}s; saved {state.run.model_file}")
    summary = {"strategy": strategy, "why": why, "device": str(ctx.device), "train_seconds": round(secs, 2),
               "best": best, "calibration": calibration,
               "skipped_files": [{"path": p, "reason": r} for p, r in bad.seen.items()], "skipped": len(bad.seen),
               "counts": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
               "distributed": ctx.dist.describe(ctx.cfg.batch_size),
               "features_per_second": ctx.features_per_s}
    write_json(state.run.summary_file, summary)
    return summary


def forget_skipped(ctx: Context, summary: dict) -> None:
    """Files that failed only when decoded (in training or the final
    evaluation) leave splits.json too, so later commands never read them
    again, and every skip is counted once in one line."""
    skipped = {d["path"] for d in summary["skipped_files"]}
    if skipped:
        drop_files(ctx.splits, skipped)
        write_json(ctx.state.run.splits_file, ctx.splits.to_dict())
        summary["counts"] = {k: len(getattr(ctx.splits, k)) for k in ("train", "val", "test")}
        say(f"skipped {len(skipped)} unreadable file(s), left out of {ctx.state.run.splits_file.name}; listed in "
            f"{ctx.state.run.summary_file}")


def evaluate_held_out(ctx: Context, summary: dict, clf: TorchPredictor) -> dict:
    """Metrics on the held-out split, by the in-memory predictor just saved;
    files that only fail when decoded (truncated data) may sit there, so they
    join the summary's list."""
    cfg = ctx.cfg
    test = evaluate_run(EvaluateConfig(run=str(ctx.state.run), device=cfg.device, engine=cfg.engine,
                                       cache_dir=cfg.cache_dir, cache=cfg.cache, calibrate=False, report=False),
                        predictor=clf, workers=ctx.workers)
    known = {d["path"] for d in summary["skipped_files"]}
    summary["skipped_files"] += [d for d in test.get("skipped_files", []) if d["path"] not in known]
    summary["skipped"] = len(summary["skipped_files"])
    return test


# ---------------------------------------------------------------- small helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(device: torch.device, dist: Dist | None = None) -> None:
    """All cores for one process; under torchrun a share each (or what
    OMP_NUM_THREADS says: torchrun sets 1 unless told otherwise)."""
    if device.type == "cpu":
        share = max(1, (os.cpu_count() or 1) // (dist.local_world if dist else 1))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in os.environ and dist
                              and dist.enabled else share)


def settled(cfg: TrainConfig, strategy: str, look: ImageLook | None) -> tuple[TrainConfig, Preprocess]:
    """A race candidate's finishing config and input: the race trains its recipe as is."""
    c = strategy_settings(cfg, strategy, look, fix=True)
    return c, resolve_preprocess(c)


def resolve_preprocess(cfg: TrainConfig) -> Preprocess:
    if cfg.model == "small_cnn" and cfg.image_size and cfg.image_size < SmallCNN.MIN_SIDE:
        raise ConfigError(f"--image-size {cfg.image_size} is too small for small_cnn (unpadded convolutions)",
                          f"use --image-size {SmallCNN.MIN_SIDE} or more: smaller images are upscaled to it")
    if cfg.strategy == "native":
        return native_preprocess(cfg.image_size)
    pp = copy.deepcopy(get_model_info(cfg.model).preprocess)
    if cfg.image_size:
        pp.size = cfg.image_size
    if cfg.resize:
        pp.resize = cfg.resize
    if cfg.crop_pct:
        pp.crop_pct = cfg.crop_pct
    return pp


def free_run_dir(data: str) -> Path:
    """runs/<data name>, or runs/<data name>-2, -3... if taken (as Ultralytics numbers exp, exp2...)."""
    name = Path(data).stem or "exp"
    for i in range(1, 10000):
        p = Path("runs") / (name if i == 1 else f"{name}-{i}")
        if not p.exists():
            return p
    raise RunError("runs/ holds 10,000 runs of this name", "pass --out")


def parse_ints(v) -> tuple[int, ...]:
    if isinstance(v, str):
        return tuple(int(s) for s in v.replace(" ", "").split(",") if s)
    return tuple(int(s) for s in v)
