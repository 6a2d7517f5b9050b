"""`auto` on small images: a short, budgeted race between the strategies that fit them.

On photos the size rule stands (a frozen backbone's cached features win
there, measured, and a race would only add time). On small images no rule
held: linear features, a small network from scratch and the pretrained
network fine-tuned at a low resolution each won somewhere
(docs/benchmarks.md). So each candidate learns from the same stratified
sample of the training images and is scored on the same held-out images:

  linear   the frozen backbone's features of the sample, through the feature
           cache (a linear winner finds them there), a cross-validated head
  native   small_cnn from scratch at the images' own size
  lowres   the pretrained network, every layer, upscaled to --lowres-size

The images are decoded once (at their own size) for native and lowres, and the
finishing stage reuses them. native and lowres train in rounds (a quarter of
their schedule each); after the second, a lowres candidate trailing the
leader by more than MARGIN stops, and the budget stops it too; native (cheap
at its own size, and low until its schedule ends) runs its whole recipe. The scoring images: val, or when val holds fewer than
MIN_SCORED images, 3-fold cross-validation on the sample (each fold's model
scored on its held-out fold and on val). The winner then trains on all the
data with its own full recipe.
"""

from __future__ import annotations

import copy
import time
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
from imgclf.training.loop import warmup_cosine
from imgclf.training.stage_network import (
    LOWRES_LR,
    LOWRES_SIZE,
    decode_items,
    erase_batch,
    lowres_groups,
    memory_prepare,
)

MIN_SCORED = 200  # held-out images below which the race cross-validates on its sample
VAL_MAX = 1000  # at most this many val images score the race (a stratified sample)
MARGIN = 0.05  # after two rounds, a candidate this far behind the leader stops
ROUNDS = 4  # native and lowres train their schedule in this many rounds, scored after each
ORDER = ("linear", "native", "lowres")  # cheapest first: a tie goes to the cheaper strategy


@dataclass
class Entry:
    name: str
    what: str
    score: float | None = None
    seconds: float = 0.0
    images: int = 0  # training images seen (epochs x sample)
    status: str = "raced"

    def row(self) -> dict:
        return {"strategy": self.name, "what": self.what, "score": None if self.score is None else round(self.score, 4),
                "seconds": round(self.seconds, 1), "images_seen": self.images, "status": self.status}


@dataclass
class RaceResult:
    winner: str
    why: str
    entries: list[Entry]
    scored_on: str
    seconds: float
    decoded: dict = field(default_factory=dict)  # "train"/"val" -> (X, Y, kept) at decode_size

    def to_dict(self) -> dict:
        return {"winner": self.winner, "why": self.why, "scored_on": self.scored_on,
                "seconds": round(self.seconds, 1), "candidates": [e.row() for e in self.entries]}

    def table(self) -> str:
        lines = [f"{'strategy':<8} {'score':>7} {'seconds':>8} {'images':>7}  status / what"]
        for e in self.entries:
            score = f"{100 * e.score:6.2f}%" if e.score is not None else "      -"
            lines.append(f"{e.name:<8} {score} {e.seconds:8.1f} {e.images:7d}  {e.status}: {e.what}")
        return "\n".join(lines)


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


def race_strategies(cfg: TrainConfig, splits: Splits, device: torch.device, decode_size: int, bad: BadFileLog,
                    workers: int, grey: bool) -> RaceResult:
    """Race the strategies that fit these small images; the winner, why, the table, the decoded images."""
    t0 = time.time()
    n_cls = len(splits.classes)
    pp = native_preprocess(decode_size)
    X, Y, kept = decode_items(splits.root, splits.train, pp, workers, bad, "race: train")
    Xv, Yv, kept_v = decode_items(splits.root, splits.val, pp, workers, bad, "race: val")
    plan = plan_scoring(Y.numpy(), Yv.numpy(), cfg.race_images, cfg.seed)
    say(f"race: linear, native and lowres, each on {len(plan.train_idx[0]) + len(plan.held_idx[0])} training "
        f"images, scored on {plan.describe}; budget {cfg.race_seconds:g}s")
    entries = [race_linear(cfg, splits, kept, kept_v, plan, device, bad, workers)]
    lowres_size = cfg.lowres_size or LOWRES_SIZE
    trained = [Learners("native", f"small_cnn from scratch at {decode_size}px", cfg, n_cls, plan, X, Y, Xv, Yv,
                        native_pp=pp, grey=grey, device=device),
               Learners("lowres", f"{cfg.model} fine-tuned at {lowres_size}px", cfg, n_cls, plan, X, Y, Xv, Yv,
                        native_pp=pp, grey=grey, device=device, size=lowres_size)]
    run_rounds(trained, entries[0], t0 + cfg.race_seconds)
    entries += [t.entry for t in trained]
    winner, why = pick(entries)
    result = RaceResult(winner, why, entries, plan.describe, time.time() - t0,
                        {"train": (X, Y, kept), "val": (Xv, Yv, kept_v)})
    say(f"race ({result.seconds:.1f}s), scored on {plan.describe}:\n{result.table()}")
    return result


def race_linear(cfg: TrainConfig, splits: Splits, kept: list, kept_v: list, plan: Scoring, device: torch.device,
                bad: BadFileLog, workers: int) -> Entry:
    """The frozen backbone's features of the sample and val (into the feature
    cache), a head fitted by cross-validated L-BFGS per fold, as `linear` fits it."""
    t0 = time.time()
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
    entry.score, entry.seconds, entry.images = correct / n, time.time() - t0, len(items)
    return entry


class Learners:
    """One trained candidate: a model per fold, trained in rounds on the decoded images."""

    def __init__(self, name: str, what: str, cfg: TrainConfig, n_cls: int, plan: Scoring, X, Y, Xv, Yv,
                 native_pp: Preprocess, grey: bool, device: torch.device, size: int | None = None):
        self.entry, self.plan, self.X, self.Y, self.Xv, self.Yv = Entry(name, what), plan, X, Y, Xv, Yv
        self.cfg, self.flip, self.device = cfg, not grey, device
        if name == "native":
            # native's whole recipe (14 epochs): a network from scratch scores low until its schedule ends, and
            # at its own small size the full schedule costs less than linear's features
            self.batch, lr, self.epochs, self.erase = 128, 4e-3, 14, (cfg.erase if cfg.erase is not None else 0.0)
            base = build_model("small_cnn", n_cls, pretrained=False)
            self.prepare = memory_prepare(native_pp)
        else:
            self.batch, lr, self.epochs, self.erase = 64, LOWRES_LR, 2, cfg.erase or 0.0
            base = build_model(cfg.model, n_cls, pretrained=cfg.pretrained, weights=cfg.weights)
            lpp = copy.deepcopy(get_model_info(cfg.model).preprocess)
            lpp.size, lpp.resize, lpp.crop_pct = size, "squash", 1.0
            self.prepare = memory_prepare(lpp)
        self.models, self.opts, self.scheds = [], [], []
        for tr in plan.train_idx:
            m = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last)
            groups = lowres_groups(m, lr) if name == "lowres" else [{"params": m.parameters(), "lr": lr}]
            opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            steps = self.epochs * -(-len(tr) // self.batch)
            self.models.append(m)
            self.opts.append(opt)
            self.scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, max(1, steps // 8))))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.done_rounds = 0
        self.stoppable = name != "native"

    def train_round(self) -> None:
        """A quarter of the schedule (epochs x sample) for every fold's model, then its score."""
        t0 = time.time()
        for m, opt, sched, tr in zip(self.models, self.opts, self.scheds, self.plan.train_idx):
            m.train()
            n = len(tr) * self.epochs // ROUNDS
            order = torch.from_numpy(tr)[torch.randint(0, len(tr), (n,), generator=self.gen)] \
                if self.epochs % ROUNDS else torch.cat([torch.from_numpy(tr)[torch.randperm(len(tr), generator=self.gen)]
                                                        for _ in range(self.epochs // ROUNDS)])
            pad = max(1, self.X.shape[-1] // 12)
            for i in range(0, len(order), self.batch):
                j = order[i:i + self.batch]
                x = erase_batch(augment_batch(self.X[j], pad, self.flip, self.gen), self.erase, self.gen)
                loss = self.loss(m(self.prepare(x.to(self.device))), self.Y[j].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            self.entry.images += len(order)
        self.done_rounds += 1
        self.entry.score = self.score()
        self.entry.seconds += time.time() - t0

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


def run_rounds(trained: list[Learners], linear: Entry, deadline: float) -> None:
    """Rounds until every candidate has finished its schedule, trails the
    leader by more than MARGIN after two rounds, or the budget is spent."""
    active = list(trained)
    for r in range(1, ROUNDS + 1):
        for t in active:
            t.train_round()
        scores = [e.score for e in [linear, *(t.entry for t in trained)] if e.score is not None]
        leader = max(scores)
        for t in list(active):
            if r == ROUNDS:
                t.entry.status = "finished its race schedule"
            elif r >= 2 and t.stoppable and t.entry.score < leader - MARGIN:
                t.entry.status = f"stopped after round {r} of {ROUNDS}: {100 * (leader - t.entry.score):.1f} points " \
                                 f"behind the leader"
                active.remove(t)
            elif time.time() > deadline and t.stoppable:
                t.entry.status = f"stopped after round {r} of {ROUNDS}: the race's time budget was spent"
                active.remove(t)
        if not active:
            break


def pick(entries: list[Entry]) -> tuple[str, str]:
    """The best score wins (a tie goes to the cheaper, earlier strategy), and why."""
    scored = sorted((e for e in entries if e.score is not None), key=lambda e: (-e.score, ORDER.index(e.name)))
    best = scored[0]
    best.status = f"winner ({best.status})" if best.status != "raced" else "winner"
    rest = ", ".join(f"{e.name} {100 * e.score:.1f}%" for e in scored[1:])
    return best.name, (f"won the race on these small images: {100 * best.score:.1f}% held-out accuracy against "
                       f"{rest or 'no other candidate'}; it now trains on all the data")
