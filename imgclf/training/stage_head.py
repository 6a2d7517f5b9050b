"""The head stage: the frozen backbone's features of every training image
(and its mirror) encoded once through the on-disk cache, then the head alone
on them (seconds per epoch): by epochs, in one cross-validated L-BFGS fit,
or by an Optuna search (--search). Under torchrun every rank encodes its
share, then rank 0 trains the head."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from imgclf.errors import ConfigError, DataError
from imgclf.io import atomic_write_text, write_json
from imgclf.models.embedder import BackboneEmbedder
from imgclf.models.features import FeatureExtractor, FeatureRows, extract
from imgclf.training.epochs import Context, Stage, history_row, say, train_epochs
from imgclf.training.head_fit import cv_summary, fit_head_cv
from imgclf.training.loop import EarlyStopping, validate, warmup_cosine
from imgclf.training.search import fit_best, run_search, search_csv

# Training features up to this size (float16) are gathered into memory once;
# above it the head reads them from the memory-mapped shards batch by batch,
# so a million images' features never need to fit in RAM.
FEATURES_IN_MEMORY_MB = 256  # IMGCLF_FEATURES_IN_MEMORY_MB overrides


def cached_features(ctx: Context) -> tuple | None:
    """Train features (plain, and mirrored unless --no-flip-features) and val
    features from the frozen backbone, through the on-disk cache. Under
    torchrun every rank encodes its share first; rank 0 then reads them all
    and the other ranks get None."""
    cfg, model, d = ctx.cfg, ctx.model, ctx.dist
    t0 = time.time()
    emb = BackboneEmbedder(cfg.model, model.backbone, ctx.pp, ctx.device, cfg.engine, cfg.cache_dir)
    extractor = emb.extractor
    variants = ("plain", "flip") if cfg.flip_features else ("plain",)
    root, train = ctx.splits.root, ctx.splits.train
    caches = emb.caches(variants, cfg.cache)
    tr_hashes, va_hashes = ctx.hashes("train"), ctx.hashes("val")
    n_cached = int(np.all([c.locate(tr_hashes)[:, 0] >= 0 for c in caches.values()], axis=0).sum()) if train else 0
    encoded = encode_shares(ctx, extractor, caches) if d.enabled else None
    if not d.main:
        return None
    Xtr, ytr, _ = extract(extractor, root, train, caches, cfg.batch_size, ctx.workers, ctx.bad,
                          "features train", hashes=tr_hashes, rows=True)
    fva, yva, _ = extract(extractor, root, ctx.splits.val, {"plain": caches["plain"]}, cfg.batch_size, ctx.workers,
                          ctx.bad, "features val", hashes=va_hashes)
    secs = time.time() - t0
    n_new = len(train) - n_cached
    say(f"features: {len(ytr)} train x {len(variants)} ({'+'.join(variants)}), {len(yva)} val in {secs:.1f}s "
        f"[{extractor.engine}; {n_cached}/{len(train)} train images from cache; "
        f"{encoded if encoded is not None else extractor.encoded} images encoded"
        f"{f' by {d.world} processes' if d.enabled else ''}]")
    if n_new > 20 and secs > 0:
        ctx.features_per_s = (n_new * len(variants) + len(ctx.splits.val)) / secs
    if len(ytr) == 0 or len(yva) == 0:
        raise DataError("no readable images in the train or validation split", "see the skipped files above")
    dev = ctx.device
    X = Xtr
    limit = float(os.environ.get("IMGCLF_FEATURES_IN_MEMORY_MB", FEATURES_IN_MEMORY_MB)) * 2**20
    if Xtr.nbytes <= limit or dev.type == "cuda":
        # Gathered once, in float16 chunks: into RAM when small, onto the GPU at any size
        # (a million images' features are 2.6 GB there), never all at once through RAM.
        chunks = [torch.from_numpy(Xtr[np.arange(i, min(i + 65536, len(Xtr)))]).to(dev, torch.float16)
                  for i in range(0, len(Xtr), 65536)]
        X = torch.cat(chunks) if dev.type == "cuda" else torch.cat(chunks).float()
    Y = torch.from_numpy(np.concatenate([ctx.targets(ytr)] * len(variants))).to(dev)
    return X, Y, torch.from_numpy(fva["plain"]).to(dev), torch.from_numpy(ctx.targets(yva)).to(dev)


def encode_shares(ctx: Context, extractor: FeatureExtractor, caches: dict) -> int:
    """torchrun: each rank encodes its disjoint share of the images missing
    from the shared cache (train in every variant, val; test too when the
    backbone stays frozen, so rank 0's evaluation finds it cached), then all
    wait; rank 0 re-reads the cache, now holding every rank's shards.
    Returns the images encoded by all ranks together."""
    cfg, d, s = ctx.cfg, ctx.dist, ctx.splits
    if not cfg.cache:
        raise ConfigError("--no-cache under torchrun: the processes hand their features to rank 0 through the "
                          "feature cache", "drop --no-cache (give --cache-dir a shared folder on several machines)")
    jobs = [("train", caches), ("val", {"plain": caches["plain"]})]
    if ctx.strategy == "linear" and s.test:
        jobs.append(("test", {"plain": caches["plain"]}))
    for split, cs in jobs:
        items, hashes = getattr(s, split), ctx.hashes(split)
        extract(extractor, s.root, d.shard(items), cs, cfg.batch_size, ctx.workers, ctx.bad,
                f"features {split} (rank {d.rank})", progress=d.main, hashes=d.shard(hashes))
    total = sum(d.gather([extractor.encoded]))  # a collective: also the barrier
    for c in caches.values():
        c.load()
    return total


def _feature_batches(X: torch.Tensor | FeatureRows, Y: torch.Tensor, batch_size: int, shuffle: bool,
                     gen: torch.Generator | None):
    idx = torch.randperm(len(X), generator=gen) if shuffle else torch.arange(len(X))
    for i in range(0, len(X), batch_size):
        j = idx[i:i + batch_size]
        if isinstance(X, FeatureRows):  # read from the memory-mapped shards
            yield torch.from_numpy(X[j.numpy()]).to(Y.device), Y[j.to(Y.device)]
        else:
            yield X[j.to(X.device)].float(), Y[j.to(Y.device)]


def run_feature_stage(ctx: Context, stage: Stage) -> None:
    cfg = ctx.cfg
    data = cached_features(ctx)
    if data is None:  # not rank 0: its share is encoded, rank 0 trains the head
        return
    X, Y, Xv, Yv = data
    if cfg.search:
        return search_head_stage(ctx, stage, X, Y, Xv, Yv)
    if head_fit_mode(ctx, X) == "cv":
        return fit_head_stage(ctx, stage, X, Y, Xv, Yv)
    head = ctx.model.head.to(ctx.device)
    steps = (len(X) + cfg.feature_batch_size - 1) // cfg.feature_batch_size
    opt = torch.optim.AdamW(head.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.epochs * steps, int(cfg.warmup_epochs * steps)))
    with _one_thread(ctx.device):
        train_epochs(ctx, stage, head, "head", opt, sched,
                     train_batches=lambda gen: _feature_batches(X, Y, cfg.feature_batch_size, True, gen),
                     val_batches=lambda: _feature_batches(Xv, Yv, 1024, False, None), prepare=None, solo=True)


def head_fit_mode(ctx: Context, X) -> str:
    """cv where the head is linear and its features fit in memory (full-batch L-BFGS)."""
    mode = ctx.cfg.head_fit
    if mode == "auto":
        mode = "epochs" if ctx.cfg.head_hidden else "cv"
    if mode == "cv" and isinstance(X, FeatureRows):
        say(f"head: {len(X)} training features exceed the in-memory limit; training by epochs instead of "
            f"cross-validated L-BFGS (raise IMGCLF_FEATURES_IN_MEMORY_MB to change that)")
        return "epochs"
    return mode


def search_head_stage(ctx: Context, stage: Stage, X, Y: torch.Tensor, Xv: torch.Tensor, Yv: torch.Tensor) -> None:
    """--search N (training/search.py): Optuna trials scored by cross-validation
    on train; the winner, refitted on all of train, becomes the head."""
    cfg, state = ctx.cfg, ctx.state
    if state.epoch >= 1:  # resumed after the search
        return
    if isinstance(X, FeatureRows):
        raise ConfigError(f"--search: {len(X)} training features exceed the in-memory limit "
                          f"(IMGCLF_FEATURES_IN_MEMORY_MB)", "search on a sample of the data, or raise the limit")
    t0 = time.time()
    weights = ctx.class_weights.to(ctx.device) if ctx.class_weights is not None else None
    variants = 2 if cfg.flip_features else 1
    Yf = Y.float() if ctx.multi_label else Y
    timeout = max(1.0, ctx.deadline - time.time()) if ctx.deadline is not None else None
    with _one_thread(ctx.device):
        best, rows = run_search(X, Yf, variants, cfg.search, cfg.cv_folds, cfg.seed, cfg.feature_batch_size,
                                ctx.multi_label, weights, timeout)
        atomic_write_text(ctx.state.run.search_file, search_csv(rows))
        head = fit_best(X, Yf, best, cfg.seed, cfg.feature_batch_size, ctx.multi_label, weights)
    if best["head"] == "mlp":  # the winner's shape becomes the run's (model.pt rebuilds the head from it)
        cfg.head_hidden, cfg.dropout = (best["hidden"],), best["dropout"]
        ctx.model.reset_classifier(ctx.model.num_classes, cfg.head_hidden, cfg.dropout)
        state.config = cfg.to_dict()
        write_json(state.run.config_file, state.config)
    ctx.model.head.load_state_dict(head.state_dict())
    say(f"search: wrote {ctx.state.run.search_file}")
    _record_head_fit(ctx, stage, X, Y, Xv, Yv, time.time() - t0, {"cv_acc": best["cv_acc"], "cv_loss": best["cv_loss"]})


class _one_thread:
    """One CPU thread while a head learns on features. Its matmuls are tiny:
    with 2 OpenMP threads each op pays thread wake-up and, when another
    process holds a core, spin-waits (measured: a 128x1280 dropout took 9 ms
    instead of 0.1 ms; the CV head took 65 s instead of 13-16 s under load)."""

    def __init__(self, device: torch.device):
        self.device, self.threads = device, torch.get_num_threads()

    def __enter__(self):
        if self.device.type == "cpu":
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _record_head_fit(ctx: Context, stage: Stage, X, Y, Xv, Yv, secs: float, cv: dict) -> dict:
    """A head fitted in one go (cross-validated L-BFGS or a search winner),
    recorded as one 'epoch': history row, best state, checkpoint."""
    state, head = ctx.state, ctx.model.head.to(ctx.device)
    loss_fn = torch.nn.BCEWithLogitsLoss() if ctx.multi_label else torch.nn.CrossEntropyLoss()
    tr = validate(head, _feature_batches(X, Y, 4096, False, None), loss_fn, ctx.device)
    va = validate(head, _feature_batches(Xv, Yv, 4096, False, None), loss_fn, ctx.device)
    tr["seconds"] = secs
    state.epoch, state.elapsed = 1, state.elapsed + secs
    row = history_row(stage, state, 0, tr, va, None, secs)
    row.update({k: round(v, 5) for k, v in cv.items()})
    score = EarlyStopping(1, ctx.monitor).score(va)
    state.consider(ctx.model, score, {**va, "stage": stage.name, "epoch": row["epoch"], "chosen_by": "cv", **cv},
                   "head")
    state.checkpoint(ctx.model, "head", None, None, None)
    return va


def fit_head_stage(ctx: Context, stage: Stage, X: torch.Tensor, Y: torch.Tensor, Xv: torch.Tensor,
                   Yv: torch.Tensor) -> None:
    """The linear head in one exact fit (training/head_fit.py): the L2 strength
    by k-fold cross-validation on train, then a refit on all of it."""
    cfg = ctx.cfg
    if ctx.state.epoch >= 1:  # resumed after the fit
        return
    t0 = time.time()
    weights = ctx.class_weights.to(ctx.device) if ctx.class_weights is not None else None
    with _one_thread(ctx.device):
        fit = fit_head_cv(X.float(), Y.float() if ctx.multi_label else Y, 2 if cfg.flip_features else 1,
                          cfg.cv_folds, cfg.seed, ctx.multi_label, weights)
    head = ctx.model.head.to(ctx.device)
    with torch.no_grad():
        head[-1].weight.copy_(fit.weight)
        head[-1].bias.copy_(fit.bias)
    cv = fit.cv[fit.l2]
    va = _record_head_fit(ctx, stage, X, Y, Xv, Yv, time.time() - t0,
                          {"l2": fit.l2, **{f"cv_{k}": v for k, v in cv.items()}})
    say(f"head: {cv_summary(fit, cfg.cv_folds)}; val acc {va['acc']:.4f} (val chose nothing), "
        f"loss {va['loss']:.4f}  {time.time() - t0:.1f}s")
