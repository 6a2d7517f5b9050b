"""`imgclf train --search N`: Optuna trials of the head's settings on the cached features.

Each trial is scored by k-fold cross-validation on the training features
(held-out log loss; accuracy recorded too), never on val, so the validation
figure of the winner stays an honest estimate. TPE proposes the settings; a
median pruner stops a trial after any fold where it is already worse than
half of the finished trials. Every trial goes to RUN/search.csv; the winner
is refitted on all training features and becomes the run's head.

The space: a linear head (its L2 strength) or one hidden layer (width,
dropout, learning rate, weight decay, epochs). A trial of
the linear head takes about 0.3 s, of the MLP a few seconds
(docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
import math
import time

import numpy as np
import torch
from torch import nn

from imgclf.data.folds import stratified_folds
from imgclf.log import get_logger
from imgclf.training.head_fit import fit_linear, for_raw_features, held_out, standardise
from imgclf.training.loop import make_loss, train_one_epoch

log = get_logger(__name__)


def suggest_params(trial) -> dict:
    p = {"head": trial.suggest_categorical("head", ["linear", "mlp"])}
    if p["head"] == "linear":
        p["l2"] = trial.suggest_float("l2", 1e-4, 10.0, log=True)
    else:
        # No label smoothing: the trials are scored by held-out log loss, which
        # smoothing worsens by design (the temperature fitted later recalibrates anyway).
        p["hidden"] = trial.suggest_categorical("hidden", [64, 128, 256])
        p["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
        p["lr"] = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        p["weight_decay"] = trial.suggest_float("weight_decay", 1e-4, 0.3, log=True)
        p["epochs"] = trial.suggest_int("epochs", 5, 30)
    return p


def mlp(d: int, k: int, hidden: int, dropout: float) -> nn.Sequential:
    """The same layers as ImageClassifier.reset_classifier with one hidden layer."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, k))


def train_mlp(Z: torch.Tensor, Y: torch.Tensor, p: dict, k: int, seed: int, batch: int,
              multi_label: bool, weights: torch.Tensor | None) -> nn.Sequential:
    """p['epochs'] AdamW epochs (engine.train_one_epoch) with cosine decay, no
    early stop (there is no split to stop on: the epochs are a searched setting)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = mlp(Z.shape[1], k, p["hidden"], p["dropout"]).to(Z.device)
    steps = p["epochs"] * math.ceil(len(Z) / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = make_loss(weights, 0.0, multi_label)  # no smoothing: trials are scored by log loss
    for _ in range(p["epochs"]):
        order = torch.randperm(len(Z), generator=g).to(Z.device)
        train_one_epoch(net, ((Z[j], Y[j]) for j in order.split(batch)), loss_fn, opt, sched, Z.device)
    return net.eval()


def fit_params(Z: torch.Tensor, Y: torch.Tensor, p: dict, k: int, seed: int, batch: int, multi_label: bool,
               weights: torch.Tensor | None):
    """A function from standardised features to logits, fitted with settings p."""
    if p["head"] == "linear":
        W, b = fit_linear(Z, Y, p["l2"], multi_label, weights)
        return lambda z: z @ W.T + b
    net = train_mlp(Z, Y, p, k, seed, batch, multi_label, weights)
    return lambda z: net(z).detach()


def run_search(X: torch.Tensor, Y: torch.Tensor, variants: int, trials: int, folds_k: int, seed: int,
               batch: int, multi_label: bool = False, weights: torch.Tensor | None = None,
               timeout: float | None = None) -> tuple[dict, list[dict]]:
    """N trials; returns (best settings, one row per trial for search.csv)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Z, _, _ = standardise(X)
    n = len(Z) // variants
    k = Y.shape[1] if multi_label else int(Y.max()) + 1
    y_img = Y[:n].cpu().numpy() if not multi_label else np.zeros(n, np.int64)
    folds = stratified_folds(y_img, folds_k, seed)
    f = torch.from_numpy(np.tile(folds, variants)).to(Z.device)
    rows: list[dict] = []

    def objective(trial) -> float:
        t0 = time.time()
        p = suggest_params(trial)
        loss = hits = seen = 0.0
        for i in range(folds_k):
            tr, te = f != i, torch.from_numpy(np.flatnonzero(folds == i)).to(Z.device)
            predict = fit_params(Z[tr], Y[tr], p, k, seed + i, batch, multi_label, weights)
            fl, fh = held_out(predict(Z[te]), Y[te], multi_label)
            loss, hits, seen = loss + fl, hits + fh, seen + len(te)
            trial.report(loss / seen, i)
            if trial.should_prune():
                rows.append(_row(trial.number, "pruned", p, loss / seen, hits / seen, i + 1, time.time() - t0))
                raise optuna.TrialPruned()
        rows.append(_row(trial.number, "complete", p, loss / seen, hits / seen, folds_k, time.time() - t0))
        trial.set_user_attr("cv_acc", hits / seen)
        return loss / seen

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0))
    # The first trial is today's default (the cross-validated linear head's
    # typical strength), so the search can only improve on it.
    study.enqueue_trial({"head": "linear", "l2": 0.03})
    study.optimize(objective, n_trials=trials, timeout=timeout)
    best = dict(study.best_trial.params)
    log.info(f"search: {len(rows)} trials ({sum(r['state'] == 'pruned' for r in rows)} pruned) in "
             f"{sum(r['seconds'] for r in rows):.1f}s; best (trial {study.best_trial.number}): "
             f"{', '.join(f'{k}={_fmt(v)}' for k, v in best.items())}; cross-validated loss {study.best_value:.4f}, "
             f"acc {study.best_trial.user_attrs['cv_acc']:.4f}")
    return {**best, "cv_loss": study.best_value, "cv_acc": study.best_trial.user_attrs["cv_acc"]}, rows


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _row(number: int, state: str, p: dict, loss: float, acc: float, folds: int, secs: float) -> dict:
    return {"trial": number, "state": state, "cv_loss": round(loss, 5), "cv_acc": round(acc, 5),
            "folds_done": folds, "seconds": round(secs, 3), **{k: _fmt(v) if isinstance(v, float) else v
                                                               for k, v in p.items()}}


def search_csv(rows: list[dict]) -> str:
    keys = ["trial", "state", "cv_loss", "cv_acc", "folds_done", "seconds", "head", "l2", "hidden", "dropout",
            "lr", "weight_decay", "epochs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: r["trial"]))
    return buf.getvalue()


def fit_best(X: torch.Tensor, Y: torch.Tensor, best: dict, seed: int, batch: int, multi_label: bool,
             weights: torch.Tensor | None) -> nn.Sequential:
    """The winner refitted on all training features, as a head module taking
    raw features (the standardisation folded into its first layer)."""
    Z, mu, sd = standardise(X)
    k = Y.shape[1] if multi_label else int(Y.max()) + 1
    if best["head"] == "linear":
        W, b = fit_linear(Z, Y, best["l2"], multi_label, weights)
        head = nn.Sequential(nn.Dropout(0.0), nn.Linear(Z.shape[1], k))
        first = head[1]
        first.weight.data, first.bias.data = W.clone(), b.clone()
    else:
        head = train_mlp(Z, Y, best, k, seed, batch, multi_label, weights)
        first = head[1]
    with torch.no_grad():
        w, b = for_raw_features(first.weight, first.bias, mu, sd)
        first.weight.copy_(w)
        first.bias.copy_(b)
    return head.cpu()
