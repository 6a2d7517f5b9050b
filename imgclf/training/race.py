"""`auto` on small images: a short, budgeted race between the strategies that fit them.

On photos the size rule stands (a frozen backbone's cached features win
there, measured, and a race would only add time). On small images no rule
held: linear features, a small network from scratch and the pretrained
network fine-tuned at a low resolution each won somewhere
(docs/benchmarks.md). So each candidate learns from the same stratified
sample of the training images and is scored on the same held-out images:

  linear   the frozen backbone's features of the sample, through the feature
           cache (a linear winner's finishing stage reads them there), a
           cross-validated head
  native   small_cnn from scratch at the images' own size
  lowres   the pretrained network at --lowres-size: its head from the linear
           probe at that size, then every layer fine-tuned (lowres.py)

The images are decoded once (at their own size) for native and lowres, and the
finishing stage reuses them. native and lowres train their finishing recipe
itself (batch, rate, schedule, augmentation), epoch by epoch, and are scored
at rungs (successive halving): lowres after its linear probe (rung 0: the
probe's cross-validated accuracy, before any fine-tuning), then after epochs
1, 2, 4, ... to the end of its schedule (under cross-validation at most
LOWRES_CV_EPOCHS), stopped as soon as it trails the leader by more than
MARGIN or the budget is spent; native (cheap at its own size, and low until its
schedule ends) only at the end of its schedule. The scoring images: val, or when val holds fewer than
MIN_SCORED images, 3-fold cross-validation on the sample (each fold's model
scored on its held-out fold and on val).

When the sample is the whole training split and val scores, a candidate's
race model is the finishing run's model so far: the race trains it up to one
epoch before its schedule ends, and a native or lowres winner continues from
its weights, optimizer and schedule (hand_over) instead of starting again;
the finishing stage runs the last epoch(s) with the usual validation, best
epoch and checkpoints. Otherwise the winner trains on all the data with its
own full recipe.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from imgclf.config import TrainConfig
from imgclf.data.datasets import Splits
from imgclf.data.folds import stratified_folds
from imgclf.data.loading import BadFileLog
from imgclf.data.preprocess import Preprocess, augment_batch, native_preprocess
from imgclf.models.embedder import BackboneEmbedder
from imgclf.models.features import extract
from imgclf.models.registry import build_model, get_model_info
from imgclf.training.epochs import say
from imgclf.training.head_fit import fit_head_cv
from imgclf.training.loop import EarlyStopping, warmup_cosine
from imgclf.training.lowres import probe_head
from imgclf.training.stage_network import decode_items, erase_batch, lowres_groups, memory_prepare
from imgclf.training.stages import plan_stages

MIN_SCORED = 200  # held-out images below which the race cross-validates on its sample
VAL_MAX = 1000  # at most this many val images score the race (a stratified sample)
MARGIN = 0.05  # at a rung, a stoppable candidate this far behind the leader stops
LOWRES_CV_EPOCHS = 2  # lowres's race under cross-validation (three models an epoch): at most this many epochs
ORDER = ("linear", "native", "lowres")  # cheapest first: a tie goes to the cheaper strategy


@dataclass
class Entry:
    name: str
    what: str
    score: float | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): the cost on a shared machine
    images: int = 0  # training images seen (epochs x sample)
    status: str = "raced"

    def row(self) -> dict:
        return {"strategy": self.name, "what": self.what, "score": None if self.score is None else round(self.score, 4),
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "images_seen": self.images, "status": self.status}


@dataclass
class RaceResult:
    winner: str
    why: str
    entries: list[Entry]
    scored_on: str
    seconds: float
    cpu_seconds: float = 0.0
    decoded: dict = field(default_factory=dict)  # "train"/"val" -> (X, Y, kept) at decode_size
    learners: dict = field(default_factory=dict)  # name -> Learners, for hand_over
    handed_over: str = ""  # what the finishing stage took from the race

    def to_dict(self) -> dict:
        return {"winner": self.winner, "why": self.why, "scored_on": self.scored_on,
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "handed_over": self.handed_over or None, "candidates": [e.row() for e in self.entries]}

    def table(self) -> str:
        lines = [f"{'strategy':<8} {'score':>7} {'seconds':>8} {'cpu s':>7} {'images':>7}  status / what"]
        for e in self.entries:
            score = f"{100 * e.score:6.2f}%" if e.score is not None else "      -"
            lines.append(f"{e.name:<8} {score} {e.seconds:8.1f} {e.cpu_seconds:7.1f} {e.images:7d}  "
                         f"{e.status}: {e.what}")
        return "\n".join(lines)

    def hand_over(self, ctx) -> bool:
        """Continue the winner's race state in the finishing stage (weights,
        optimizer, schedule, epochs done) when it trained on the whole
        training split under the finishing recipe; True if it did."""
        learner = self.learners.pop(self.winner, None)
        self.learners.clear()  # the losers' models and optimizers are no longer needed
        if learner is None or not learner.continuable or not learner.epochs_done or ctx.state.epoch \
                or ctx.dist.enabled:
            return False
        model = learner.models[0]
        try:
            ctx.model.load_state_dict(model.state_dict())
        except RuntimeError:  # another head shape was asked for (--head-hidden): train afresh
            return False
        st = ctx.state
        st.epoch, st.opt_state, st.sched_state = learner.epochs_done, learner.opts[0].state_dict(), \
            learner.scheds[0].state_dict()
        st.stopper_state = EarlyStopping(learner.stage.patience, ctx.monitor).state_dict()
        self.handed_over = (f"{self.winner}'s race model after {learner.epochs_done} of {learner.stage.epochs} "
                            f"epochs on all {len(learner.X)} training images: the finishing stage continues it")
        say(f"race: {self.handed_over}")
        return True


@dataclass
class Scoring:
    """Which sample images train each fold's model and which images score it."""

    train_idx: list[np.ndarray]  # per fold: indices into the decoded train tensor
    held_idx: list[np.ndarray]  # per fold: train indices held out (empty when val alone scores)
    val_idx: np.ndarray  # indices into the decoded val tensor, scored in every fold
    describe: str


def plan_scoring(y_train: np.ndarray, y_val: np.ndarray, n_sample: int, seed: int) -> Scoring:
    rng = np.random.default_rng(seed)
    sample = stratified_sample(y_train, n_sample, rng)
    val = stratified_sample(y_val, VAL_MAX, rng)
    if len(val) >= MIN_SCORED:
        return Scoring([sample], [np.zeros(0, np.int64)], val, f"{len(val)} val images")
    folds = stratified_folds(y_train[sample], 3, seed)
    return Scoring([sample[folds != f] for f in range(3)], [sample[folds == f] for f in range(3)], val,
                   f"3-fold cross-validation on {len(sample)} training images plus the {len(val)} val images "
                   f"(val alone holds fewer than {MIN_SCORED})")


def stratified_sample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n indices, every class in proportion (at least one each), sorted."""
    if len(y) <= n:
        return np.arange(len(y))
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, max(1, round(n * len(idx) / len(y))), replace=False))
    return np.sort(np.concatenate(keep))


class Clock:
    """Wall and process-CPU seconds since it started."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def add_to(self, entry: Entry) -> None:
        entry.seconds += time.time() - self.wall
        entry.cpu_seconds += time.process_time() - self.cpu


def race_strategies(cfg: TrainConfig, splits: Splits, device: torch.device, decode_size: int, bad: BadFileLog,
                    workers: int, settle: Callable[[str], tuple[TrainConfig, Preprocess]]) -> RaceResult:
    """Race the strategies that fit these small images; the winner, why, the
    table, the decoded images and the trained candidates. settle(strategy):
    the finishing run's config and Preprocess for that strategy (its recipe,
    raced as is)."""
    t0, clock = time.time(), Clock()
    n_cls = len(splits.classes)
    pp = native_preprocess(decode_size)
    X, Y, kept = decode_items(splits.root, splits.train, pp, workers, bad, "race: train")
    Xv, Yv, kept_v = decode_items(splits.root, splits.val, pp, workers, bad, "race: val")
    plan = plan_scoring(Y.numpy(), Yv.numpy(), cfg.race_images, cfg.seed)
    say(f"race: linear, native and lowres, each on {len(plan.train_idx[0]) + len(plan.held_idx[0])} training "
        f"images, scored on {plan.describe}; budget {cfg.race_seconds:g}s")
    entries = [race_linear(cfg, splits, kept, kept_v, plan, device, bad, workers)]
    trained = [Learners(name, settle(name), n_cls, plan, X, Y, Xv, Yv, device) for name in ("native", "lowres")]
    run_rungs(trained, entries[0], t0 + cfg.race_seconds)
    entries += [t.entry for t in trained]
    winner, why = pick(entries)
    result = RaceResult(winner, why, entries, plan.describe, time.time() - t0, 0.0,
                        {"train": (X, Y, kept), "val": (Xv, Yv, kept_v)}, {t.entry.name: t for t in trained})
    result.cpu_seconds = time.process_time() - clock.cpu
    say(f"race ({result.seconds:.1f}s, {result.cpu_seconds:.1f} CPU s), scored on {plan.describe}:\n"
        f"{result.table()}")
    return result


def race_linear(cfg: TrainConfig, splits: Splits, kept: list, kept_v: list, plan: Scoring, device: torch.device,
                bad: BadFileLog, workers: int) -> Entry:
    """The frozen backbone's features of the sample and val (into the feature
    cache, where a linear winner's finishing stage finds them: its race entry
    is the finishing run's own encoding), a head fitted by cross-validated
    L-BFGS per fold, as `linear` fits it."""
    clock = Clock()
    entry = Entry("linear", f"frozen {cfg.model} features ({get_model_info(cfg.model).preprocess.size}px), "
                            f"linear head")
    model = build_model(cfg.model, len(splits.classes), pretrained=cfg.pretrained, weights=cfg.weights)
    emb = BackboneEmbedder(cfg.model, model.backbone, get_model_info(cfg.model).preprocess, device, cfg.engine,
                           cfg.cache_dir)
    caches = emb.caches(("plain",), cfg.cache)
    idx = np.unique(np.concatenate([*plan.train_idx, *plan.held_idx]))
    items = [kept[i] for i in idx]
    pos = {int(i): k for k, i in enumerate(idx)}
    ftr, ytr, got = extract(emb.extractor, splits.root, items, caches, cfg.batch_size, workers, bad,
                            "race: linear features")
    fva, yva, got_v = extract(emb.extractor, splits.root, [kept_v[i] for i in plan.val_idx], caches,
                              cfg.batch_size, workers, bad, "race: linear features val")
    if len(got) < len(items) or len(got_v) < len(plan.val_idx):  # unreadable here yet decoded: not comparable
        entry.status = "left out: some images decoded for the others could not be encoded"
        return entry
    F, Fv = torch.from_numpy(ftr["plain"]), torch.from_numpy(fva["plain"])
    correct = n = 0
    for tr, held in zip(plan.train_idx, plan.held_idx):
        rows, hrows = [pos[int(i)] for i in tr], [pos[int(i)] for i in held]
        fit = fit_head_cv(F[rows], torch.from_numpy(ytr[rows]), 1, cfg.cv_folds, cfg.seed)
        for Xs, ys in ((F[hrows], ytr[hrows]), (Fv, yva)):
            if len(ys):
                correct += int(((Xs @ fit.weight.T + fit.bias).argmax(1).numpy() == ys).sum())
                n += len(ys)
    entry.score, entry.images = correct / n, len(items)
    clock.add_to(entry)
    return entry


def race_schedule(name: str, epochs: int, continuable: bool, cv: bool) -> tuple[int, list[int]]:
    """How many of its recipe's `epochs` a candidate races, and the epochs
    after which it is scored. A race model the finishing run continues stops
    one epoch short (the finishing stage runs the last). Otherwise lowres on
    one split races its whole schedule unless a rung or the budget stops it:
    cut at 2 of 6 epochs (mid-schedule, at a high rate) it tied linear on
    cats32 with 2,000 images (89.8%) where its full recipe reached 92.2% on
    val, and the race picked the worse strategy (docs/benchmarks.md). Under
    cross-validation (three models an epoch) it races at most
    LOWRES_CV_EPOCHS. native is scored once, at its end (low until then)."""
    cap = min(epochs, LOWRES_CV_EPOCHS) if name == "lowres" and cv else epochs
    race = epochs - 1 if continuable else cap
    if name == "native":
        return race, [race]
    return race, sorted({e for e in (1, 2, 4, 8, 16, 32) if e < race} | {race})


class Learners:
    """One trained candidate under its finishing recipe (`rc`, the settled
    config): a model per fold, trained epoch by epoch on the decoded images."""

    def __init__(self, name: str, settled: tuple[TrainConfig, Preprocess], n_cls: int, plan: Scoring, X, Y, Xv, Yv,
                 device: torch.device):
        rc, pp = settled
        self.plan, self.X, self.Y, self.Xv, self.Yv, self.rc, self.device = plan, X, Y, Xv, Yv, rc, device
        self.stage = plan_stages(name, rc)[0]
        whole = len(plan.train_idx) == 1 and len(plan.train_idx[0]) == len(X)
        self.continuable = whole and self.stage.epochs > 1  # this race model is the finishing run's, so far
        self.race_epochs, self.rungs = race_schedule(name, self.stage.epochs, self.continuable,
                                                     cv=len(plan.train_idx) > 1)
        self.stoppable = name != "native"
        clock = Clock()
        base = build_model(rc.model, n_cls, pretrained=rc.pretrained, weights=rc.weights,
                           head_hidden=rc.head_hidden, dropout=rc.dropout)
        self.prepare = memory_prepare(pp)
        size = f"{rc.image_size}px"
        self.entry = Entry(name, f"small_cnn from scratch at {size}" if name == "native" else
                           f"{rc.model} at {size}: linear probe, then every layer fine-tuned")
        self.models, self.opts, self.scheds, probes = [], [], [], []
        for tr in plan.train_idx:
            m = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last)
            if name == "lowres":
                probes.append(probe_head(m, X[tr], Y[tr], self.prepare, device, rc.cv_folds, rc.seed))
            self.models.append(m)
            self._optimizer(m, name, len(tr))
        self.gen = torch.Generator().manual_seed(rc.seed)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=rc.label_smoothing)
        self.epochs_done = 0
        # rung 0 (lowres): the probe's cross-validated accuracy on the sample, known before any fine-tuning
        self.probe_acc = float(np.mean([p.acc for p in probes])) if probes and None not in probes else None
        clock.add_to(self.entry)

    def _optimizer(self, m, name: str, n: int) -> None:
        """AdamW and warm-up + cosine over the stage's steps, as stages._optimizer
        builds them for the finishing stage, so that stage can continue them."""
        lr = self.stage.lr
        groups = lowres_groups(m, lr) if name == "lowres" else [{"params": m.parameters(), "lr": lr}]
        opt = torch.optim.AdamW(groups, weight_decay=self.rc.weight_decay)
        steps = -(-n // self.rc.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.stage.epochs * steps, int(self.rc.warmup_epochs * steps)))
        self.opts.append(opt)
        self.scheds.append(sched)

    def next_rung(self) -> None:
        """Train every fold's model up to the next rung, then score it."""
        clock = Clock()
        target = next(r for r in self.rungs if r > self.epochs_done)
        while self.epochs_done < target:
            for m, opt, sched, tr in zip(self.models, self.opts, self.scheds, self.plan.train_idx):
                self._epoch(m, opt, sched, torch.from_numpy(tr))
            self.epochs_done += 1
        self.entry.score = self.score()
        clock.add_to(self.entry)

    def _epoch(self, m, opt, sched, tr: torch.Tensor) -> None:
        """One epoch as stages.run_memory_stage trains it: shifts, flips, erasing, frozen BN for lowres."""
        m.train()
        if self.stage.name == "lowres":
            for mod in m.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        order = tr[torch.randperm(len(tr), generator=self.gen)]
        pad, b = max(1, self.X.shape[-1] // 12), self.rc.batch_size
        for i in range(0, len(order), b):
            j = order[i:i + b]
            x = erase_batch(augment_batch(self.X[j], pad, bool(self.rc.flip_features), self.gen),
                            self.rc.erase or 0.0, self.gen)
            loss = self.loss(m(self.prepare(x.to(self.device))), self.Y[j].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        self.entry.images += len(order)

    @property
    def done(self) -> bool:
        return self.epochs_done >= self.race_epochs

    @torch.inference_mode()
    def score(self) -> float:
        correct = n = 0
        for m, held in zip(self.models, self.plan.held_idx):
            m.eval()
            for Xs, ys in ((self.X[held], self.Y[held]), (self.Xv[self.plan.val_idx], self.Yv[self.plan.val_idx])):
                for i in range(0, len(ys), 256):
                    logits = m(self.prepare(Xs[i:i + 256].to(self.device))).cpu()
                    correct += int((logits.argmax(1) == ys[i:i + 256]).sum())
                n += len(ys)
        return correct / max(1, n)


def run_rungs(trained: list[Learners], linear: Entry, deadline: float) -> None:
    """Successive halving: each active candidate trains to its next rung and
    is scored; a stoppable one trailing the leader by more than MARGIN, or
    past the budget, stops; the rest go on until their race schedule ends.
    Rung 0, before any fine-tuning: lowres's linear probe, cross-validated on
    the sample, trailing by more than twice MARGIN stops it there."""
    active = list(trained)

    def leader() -> float:
        return max(e.score for e in [linear, *(t.entry for t in trained)] if e.score is not None)

    while active:
        for t in list(active):
            if t.epochs_done == 0 and t.probe_acc is not None and t.probe_acc < leader() - 2 * MARGIN:
                t.entry.score = t.probe_acc
                t.entry.status = (f"stopped before fine-tuning: its linear probe scored {100 * t.probe_acc:.1f}% "
                                  f"(cross-validated on the sample), {100 * (leader() - t.probe_acc):.1f} points "
                                  f"behind the leader")
                active.remove(t)
                continue
            t.next_rung()
        for t in list(active):
            lead = leader()
            where = f"after epoch {t.epochs_done} of {t.stage.epochs}"
            if t.done:
                t.entry.status = f"finished its race schedule ({where})"
            elif t.stoppable and t.entry.score < lead - MARGIN:
                t.entry.status = f"stopped {where}: {100 * (lead - t.entry.score):.1f} points behind the leader"
            elif t.stoppable and time.time() > deadline:
                t.entry.status = f"stopped {where}: the race's time budget was spent"
            else:
                continue
            active.remove(t)


def pick(entries: list[Entry]) -> tuple[str, str]:
    """The best score wins (a tie goes to the cheaper, earlier strategy), and why."""
    scored = sorted((e for e in entries if e.score is not None), key=lambda e: (-e.score, ORDER.index(e.name)))
    best = scored[0]
    best.status = f"winner ({best.status})" if best.status != "raced" else "winner"
    rest = ", ".join(f"{e.name} {100 * e.score:.1f}%" for e in scored[1:])
    return best.name, (f"won the race on these small images: {100 * best.score:.1f}% held-out accuracy against "
                       f"{rest or 'no other candidate'}; it now trains on all the data")
