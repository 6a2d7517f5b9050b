"""The segmentation recipe on the shared training machinery: RunDir and
RunLock (the run directory), RunState (last.pt, --resume, the best weights),
EarlyStopping on val mIoU, warmup_cosine, the loop's train_one_epoch, Dist
(DDP under torchrun), `say` for the story.

CPU first: the trunk stays frozen on CPU (strategy auto -> linear), so its
maps of every training image (longer side --image-size, default 480, and
its mirror) are computed once and cached (cache.py); the decoder then
trains on 256 px crops of those maps, aligned to stride 32, with
class-weighted cross-entropy (median frequency, SegNet's balancing) unless
--class-weights none. Without the trunk in the step an epoch costs the
decoder alone, so many epochs fit. Validation scores the cached val maps,
logits brought back to the mask's own resolution (the predictor's path).
On CUDA (finetune) the trunk trains after the first epochs at
backbone_lr_mult of the learning rate, on augmented crops of the decoded
images (random scale, crop, flip, colour)."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import replace

import numpy as np
import torch
from torchvision import tv_tensors

from imgclf.config import TrainConfig
from imgclf.data.images import open_image
from imgclf.errors import ConfigError, DataError, RunError
from imgclf.io import read_json, torch_load, torch_save_atomic, write_history, write_json
from imgclf.runs import RunDir, RunLock
from imgclf.tasks.segment.cache import CachedSegFeatures, CachedSegVal, cache_bytes, train_cached_epoch
from imgclf.tasks.segment.data import SegDataset, load_mask, read_dataset, split_dataset, unknown_values
from imgclf.tasks.segment.evaluate import eval_json, evaluate_items
from imgclf.tasks.segment.metrics import scores
from imgclf.tasks.segment.model import DecoderOnly, SegLoss, Segmenter, median_frequency_weights, train_transform
from imgclf.tasks.segment.predictor import prepare_image, resize_mask
from imgclf.tasks.segment.torch_predictor import TorchSegPredictor
from imgclf.training.checkpoint import CKPT_KEYS, RunState
from imgclf.training.distributed import Dist, init_distributed
from imgclf.training.loop import EarlyStopping, train_one_epoch, warmup_cosine
from imgclf.training.stages import say
from imgclf.training.train import free_run_dir, seed_everything, set_threads

DEFAULT_IMAGE_SIZE = 480  # longer side: CamVid's own 480x360, where poles and signs are still a few pixels wide
DEFAULT_MODEL = "efficientnet_lite0"
RECORD_FORMAT = 1
CACHE_CROP = 256  # frozen trunk: the decoder trains on crops of the cached maps (whole images when smaller)
CACHE_SCALES = (1.0,)  # of the image at these multiples of the base size
CACHE_MAX_BYTES = 4 << 30  # more training images than this holds train through the trunk, uncached


# --- data in memory -------------------------------------------------------------------

class SegImages(torch.utils.data.Dataset):
    """Items of `ds` decoded once and resized to the base size (longer side
    image_size; masks with nearest neighbour), then kept as uint8 tensors.
    Yields (image uint8 (3, h, w) or float after `transform`, mask)."""

    def __init__(self, ds: SegDataset, items: list[int], image_size: int, transform=None):
        self.transform = transform
        self.images, self.masks = [], []
        for i in items:
            it = ds.items[i]
            x = prepare_image(open_image(it.image), image_size)
            self.images.append(torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous())
            self.masks.append(torch.from_numpy(resize_mask(load_mask(ds, it), (x.shape[1], x.shape[0])).copy()))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img, mask = tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i])
        if self.transform is None:
            return img, mask
        x, y = self.transform(img, mask)
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


def pixel_counts(ds: SegDataset, items: list[int]) -> np.ndarray:
    """Pixels per class over `items`; a value outside the class list (and not
    the ignore value) stops training here, with the fix."""
    k = len(ds.classes)
    counts = np.zeros(k, np.int64)
    for i in items:
        m = load_mask(ds, ds.items[i])
        bad = unknown_values(m, k, ds.ignore_index)
        if bad:
            raise DataError(f"{ds.items[i].mask or ds.items[i].image}: mask values {bad} are not in the class list "
                            f"({k} classes, ids 0-{k - 1}) nor the ignore value {ds.ignore_index}",
                            f"if {bad[0]} marks void pixels, pass --ignore-index {bad[0]}; otherwise add the classes "
                            "to classes.txt (imgclf check DATA lists every such mask)")
        counts += np.bincount(m.ravel(), minlength=256)[:k]
    return counts


# --- the run ------------------------------------------------------------------------

def train(config: TrainConfig) -> dict:
    """Train a Segmenter on config.data; returns the run's summary."""
    t_start = time.time()
    dist, device = init_distributed(config.device)
    try:
        with contextlib.ExitStack() as held:
            return _train(config, dist, device, t_start, held)
    finally:
        dist.close()


def _resolve(config: TrainConfig) -> tuple[TrainConfig, RunDir, dict | None]:
    cfg = replace(config)
    if not cfg.out:
        if cfg.resume:
            raise ConfigError("--resume needs the run to continue", "imgclf train --resume --out RUN")
        cfg.out = str(free_run_dir(cfg.data))
    run = RunDir(cfg.out)
    if cfg.resume:
        if not run.last_file.exists():
            raise RunError(f"{run.last_file} not found: nothing to resume", f"start a run with `imgclf train DATA --out {run}`")
        ckpt = torch_load(run.last_file, CKPT_KEYS)
        saved = TrainConfig.from_dict(ckpt["config"])
        say(f"resuming {run}: {ckpt['epoch']} epochs done")
        return replace(saved, resume=True), run, ckpt
    if not cfg.data:
        raise ConfigError("no data given", "imgclf train DATA --out RUN")
    if run.model_file.exists() or run.last_file.exists():
        raise RunError(f"{run} already holds a run", f"continue it with `imgclf train --resume --out {run}`, "
                       f"or pick another --out (or delete {run})")
    return cfg, run, None


def _splits(cfg: TrainConfig, run: RunDir, resume: bool) -> tuple[SegDataset, dict[str, list[int]], str]:
    """The dataset and its split: made now (and saved in splits.json with a run
    id), or on --resume read back by image path."""
    if resume:
        saved = read_json(run.splits_file)
        ds = read_dataset(saved["root"], saved["format"], saved["ignore_index"], strict=False)
        index = {str(it.image): i for i, it in enumerate(ds.items)}
        return ds, {s: [index[p] for p in saved[s] if p in index] for s in ("train", "val", "test")}, saved["run_id"]
    ds = read_dataset(cfg.data, None, cfg.ignore_index, strict=False)
    for p in ds.problems:
        say(f"left out: {p}")
    parts = split_dataset(ds, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return ds, parts, uuid.uuid4().hex[:12]


def _write_split(run: RunDir, ds: SegDataset, parts: dict, run_id: str, cfg: TrainConfig) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.splits_file, {"task": "segment", "root": str(ds.root), "format": ds.format, "classes": ds.classes,
                                 "ignore_index": ds.ignore_index, "run_id": run_id,
                                 **{s: [str(ds.items[i].image) for i in v] for s, v in parts.items()}})
    write_json(run.config_file, {**cfg.to_dict(), "task": "segment", "run_id": run_id})


def plan(cfg: TrainConfig, device: torch.device) -> dict:
    """The recipe's numbers, from the config and the device."""
    strategy = cfg.strategy if cfg.strategy != "auto" else ("finetune" if device.type == "cuda" else "linear")
    if strategy not in ("linear", "finetune"):
        raise ConfigError(f"--strategy {strategy}: segmentation trains linear (frozen trunk) or finetune",
                          "choose --strategy auto, linear or finetune")
    epochs = cfg.epochs or (10 if strategy == "linear" else 40)  # linear: the decoder on cached maps plateaus by 8-10
    size = cfg.image_size or DEFAULT_IMAGE_SIZE
    return {"strategy": strategy, "epochs": epochs, "frozen_epochs": epochs if strategy == "linear" else max(1, epochs // 8),
            "image_size": size, "crop": max(32, (size * 3 // 4) // 32 * 32), "lr": cfg.lr or 2e-3,
            "batch_size": 8 if cfg.batch_size == TrainConfig().batch_size else cfg.batch_size,
            "patience": cfg.patience or 6, "model": DEFAULT_MODEL if cfg.model == TrainConfig().model else cfg.model,
            "decoder": "fpn", "loss": "ce" if cfg.class_weights == "none" else "ce+median_frequency_weights",
            "cached": strategy == "linear", "cache_crop": CACHE_CROP, "scales": list(CACHE_SCALES)}


def _cache_fits(p: dict, n_train: int) -> bool:
    return cache_bytes(n_train, p["image_size"], p["scales"]) <= CACHE_MAX_BYTES


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, t_start: float, held: contextlib.ExitStack) -> dict:
    cfg, run, ckpt = _resolve(cfg)
    ds, parts, run_id = dist.broadcast(_splits(cfg, run, ckpt is not None) if dist.main else None)
    if dist.main:
        lock = held.enter_context(RunLock(run.path, run_id))
        if lock.took_over:
            say(f"note: {run}: {lock.took_over}")
        if ckpt is None:
            _write_split(run, ds, parts, run_id, cfg)
    set_threads(device, dist)
    seed_everything(cfg.seed)
    p = plan(cfg, device)
    p["cached"] = p["cached"] and _cache_fits(p, len(parts["train"]))
    counts = pixel_counts(ds, parts["train"])
    say(f"segment: {len(ds.classes)} classes, {len(parts['train'])} train / {len(parts['val'])} val / "
        f"{len(parts['test'])} test images; ignore value {ds.ignore_index}; {p['strategy']}, {p['epochs']} epochs at "
        f"{p['image_size']} px (crops {p['cache_crop'] if p['cached'] else p['crop']}"
        f"{' of cached trunk maps' if p['cached'] else ''}), {p['model']} + {p['decoder']}, device {device}")
    model = Segmenter(len(ds.classes), p["model"], p["decoder"], pretrained=cfg.pretrained, weights=cfg.weights).to(device)
    weight = median_frequency_weights(counts).to(device) if p["loss"] != "ce" else None
    loss_fn = SegLoss(ds.ignore_index, weight)
    state = RunState(cfg.to_dict(), run, dist.world)
    if p["cached"]:
        loader, val = _cached(model, ds, parts, p, cfg, dist, device, state)
    else:
        loader, val = _loader(ds, parts, p, cfg, dist), None
    if ckpt:
        state.restore(ckpt, model)
        if state.stage_epochs:
            fit_budget(p, cfg, state, 0.0)
    opt, sched = _optimizer(model, p, cfg, len(loader))
    stopper = EarlyStopping(p["patience"], monitor="miou")
    if ckpt:
        opt.load_state_dict(state.opt_state)
        sched.load_state_dict(state.sched_state)
        stopper.load_state_dict(state.stopper_state)
    model.bn_frozen = cfg.freeze_bn
    _epochs(model, ds, parts, p, cfg, loader, val, loss_fn, opt, sched, stopper, state, dist, device)
    if not dist.main:
        return {}
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    record = make_record(model, ds, p, cfg, run_id, state.best_metrics)
    torch_save_atomic(record, run.model_file)
    write_history(run.history_file, state.history)
    summary = {"task": "segment", "plan": p, "best": {k: v for k, v in state.best_metrics.items() if k != "confusion_matrix"},
               "epochs_run": state.epoch, "train_seconds": round(state.elapsed, 2), "distributed": dist.describe(p["batch_size"]),
               "class_pixel_share": {c: round(float(n) / max(1, int(counts.sum())), 6) for c, n in zip(ds.classes, counts)}}
    held_out = "test" if parts["test"] else "val"
    if cfg.evaluate and parts[held_out]:
        m = evaluate_items(TorchSegPredictor(model, ds.classes, p["image_size"], device), ds, parts[held_out])
        write_json(run.eval_file(held_out), eval_json(m, held_out, ds))
        summary["held_out"] = {"split": held_out, "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"]}
    summary["total_seconds"] = round(time.time() - t_start, 2)
    write_json(run.summary_file, summary)
    say(f"done in {summary['total_seconds']:.1f}s. Run: {run}")
    return summary


def _loader(ds: SegDataset, parts: dict, p: dict, cfg: TrainConfig, dist: Dist):
    """Augmented crops of the decoded images (the trunk trains: no cache)."""
    tr = SegImages(ds, parts["train"], p["image_size"], train_transform(p["crop"], ds.ignore_index))
    # Under DDP every rank must take as many steps: DistributedSampler pads the shares to one length.
    sampler = (torch.utils.data.DistributedSampler(tr, dist.world, dist.rank, shuffle=True, seed=cfg.seed)
               if dist.enabled else None)
    return torch.utils.data.DataLoader(tr, batch_size=p["batch_size"], shuffle=sampler is None, sampler=sampler,
                                       drop_last=len(tr) // dist.world > p["batch_size"],
                                       num_workers=cfg.workers or 0, generator=torch.Generator())


def _cached(model: Segmenter, ds: SegDataset, parts: dict, p: dict, cfg: TrainConfig, dist: Dist, device,
            state: RunState) -> tuple[CachedSegFeatures, CachedSegVal]:
    """The frozen trunk's maps of this rank's share of train and val, once; the
    seconds count against --time-budget."""
    t0 = time.time()
    model.freeze_backbone(True)
    cache = CachedSegFeatures(model, ds, dist.shard(parts["train"]), p["image_size"], p["batch_size"], p["cache_crop"],
                              p["scales"], cfg.seed, device, dist.world, len(parts["train"]))
    val = CachedSegVal(model, ds, dist.shard(parts["val"]), p["image_size"], device)
    state.elapsed += time.time() - t0
    say(f"cached the trunk's maps: {len(cache.feats)} train (scales {', '.join(map(str, p['scales']))}, mirrored), "
        f"{len(val.feats)} val, {cache.nbytes() / 2**20:.0f} MiB, {time.time() - t0:.0f}s")
    return cache, val


def _optimizer(model: Segmenter, p: dict, cfg: TrainConfig, steps_per_epoch: int):
    trunk = list(model.trunk.parameters())
    ids = {id(q) for q in trunk}
    groups = [{"params": [q for q in model.parameters() if id(q) not in ids], "lr": p["lr"]}]
    if p["strategy"] == "finetune":
        groups.append({"params": trunk, "lr": p["lr"] * cfg.backbone_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    # The cosine ends where the run will: p["epochs"] is shortened to fit --time-budget after the first epoch.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(p["epochs"] * steps_per_epoch, warm)(step))
    return opt, sched


def fit_budget(p: dict, cfg: TrainConfig, state: RunState, epoch_seconds: float, dist: Dist | None = None) -> None:
    """Under --time-budget, the epochs that fit, judged on the first epoch's
    time and the budget left after it (and after the cache) (kept in last.pt as stage_epochs, so a resumed run plans the same)."""
    if cfg.time_budget is None:
        return
    if not state.stage_epochs:  # the epochs done, and as many more as the budget left holds
        left = int(max(0.0, cfg.time_budget - state.elapsed) // max(epoch_seconds, 1e-3))
        n = max(1, min(p["epochs"], state.epoch + left))
        state.stage_epochs = dist.broadcast(n) if dist else n  # rank 0's clock: every rank plans alike
    p["epochs"] = state.stage_epochs
    if p["strategy"] == "linear":
        p["frozen_epochs"] = p["epochs"]


def _wrap(model: Segmenter, dist: Dist, device: torch.device):
    """DDP over the parameters that train now (built again when the trunk thaws)."""
    if not dist.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _epochs(model, ds, parts, p, cfg, loader, val, loss_fn, opt, sched, stopper, state, dist, device) -> None:
    amp, net = device.type == "cuda", None
    while state.epoch < p["epochs"]:
        t0 = time.time()
        frozen = state.epoch < p["frozen_epochs"]
        if net is None or frozen != model.frozen:
            model.freeze_backbone(frozen)
            net = _wrap(DecoderOnly(model) if val is not None else model, dist, device)
        # Mid-epoch stops only in one process: under DDP a rank stopping alone would leave the others waiting.
        deadline = None if dist.enabled else t_start_budget(cfg, state, t0)
        if val is not None:  # cached maps: the decoder alone
            loader.epoch = state.epoch  # the same order on --resume
            tr = train_cached_epoch(net, loader, loss_fn, opt, sched, device, deadline)
            va = _validate_cached(model, val, ds, dist, device)
        else:
            loader.generator.manual_seed(cfg.seed * 100_003 + state.epoch * 1009)  # the same order on --resume
            if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
                loader.sampler.set_epoch(state.epoch)
            tr = train_one_epoch(net, loader, loss_fn, opt, sched, device, amp=amp, deadline=deadline)
            va = _validate(model, ds, parts["val"], p, dist, device)
        state.epoch += 1
        state.elapsed += time.time() - t0
        fit_budget(p, cfg, state, time.time() - t0, dist)
        improved = stopper.step(va, state.epoch)
        if improved:
            state.consider(model, stopper.best, va, "all")
        row = {"epoch": state.epoch, "frozen": int(model.frozen), "train_loss": round(tr["loss"], 5),
               "val_miou": round(va["miou"], 5),
               "val_pixel_accuracy": round(va["pixel_accuracy"], 5), "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.time() - t0, 1)}
        state.history.append(row)
        if dist.main:
            state.checkpoint(model, "all", opt, sched, stopper)
            say(f"epoch {state.epoch}/{p['epochs']}: loss {row['train_loss']:.4f}, val mIoU {row['val_miou']:.4f}"
                f"{' (best)' if improved else ''}, {row['seconds']:.0f}s")
        budget_over = cfg.time_budget is not None and state.elapsed + row["seconds"] > cfg.time_budget
        if dist.broadcast(stopper.should_stop or budget_over or tr["stopped"]):
            say("early stop: val mIoU stopped improving" if stopper.should_stop else "stop: the time budget is spent")
            break


def t_start_budget(cfg: TrainConfig, state: RunState, t0: float) -> float | None:
    """The wall-clock time an epoch must end by under --time-budget."""
    return None if cfg.time_budget is None else t0 + max(0.0, cfg.time_budget - state.elapsed)


def _validate(model, ds, items, p, dist: Dist, device) -> dict:
    """Val scores over every val image once: each rank its share, the matrices summed."""
    m = evaluate_items(TorchSegPredictor(model, ds.classes, p["image_size"], device), ds, dist.shard(items))
    if not dist.enabled:
        return m
    parts = dist.gather([(np.asarray(m["confusion_matrix"]), m["loss"] * m["n"], m["n"])])
    out = scores(sum(c for c, _, _ in parts), ds.classes)
    out["loss"] = sum(s for _, s, _ in parts) / max(1, sum(n for _, _, n in parts))
    return out


def _validate_cached(model: Segmenter, val: CachedSegVal, ds: SegDataset, dist: Dist, device) -> dict:
    """Val scores from the cached maps: each rank its share, the matrices summed."""
    cm = val.confusion(model, len(ds.classes), ds.ignore_index, device)
    if dist.enabled:
        cm = sum(dist.gather([cm]))
    out = scores(cm, ds.classes)
    out["loss"] = 1.0 - out["pixel_accuracy"]  # EarlyStopping breaks mIoU ties on its "loss": the pixel error
    return out


def make_record(model: Segmenter, ds: SegDataset, p: dict, cfg: TrainConfig, run_id: str, best: dict) -> dict:
    """What model.pt holds: the network's settings and weights, the classes,
    the preprocessing (longer side image_size), the ignore value."""
    return {"format_version": RECORD_FORMAT, "task": "segment", "segmenter": dict(model.config),
            "classes": list(ds.classes), "ignore_index": ds.ignore_index, "image_size": p["image_size"],
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "run_id": run_id,
            "config": cfg.to_dict(), "best": {k: v for k, v in best.items() if k != "confusion_matrix"}}

