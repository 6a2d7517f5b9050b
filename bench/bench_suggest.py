"""`imgclf suggest` against random choice: accuracy for the number of labels.

  .venv/bin/python bench/bench_suggest.py [--seeds 3] [--rounds 10] [--out docs/suggest.png]
  .venv/bin/python bench/bench_suggest.py --model efficientnet_lite0 --head epochs   # the run before issue 12
  .venv/bin/python bench/bench_suggest.py --score-on dev --novelty suggest,ramp,none   # choosing

Simulated labelling on cats_and_dogs_filtered and hymenoptera: the training
images are the unlabeled pool, 5% of them (random, not stratified) start
labelled, and each round 5% more are chosen, by `rank_for_labelling` with the
novelty `imgclf suggest` gives it (the run's open-set unknown scorer, refitted
every round on the labelled images: fitted_scorer) or at random; the head is
retrained from scratch on the labelled images' cached features every round
and scored on the data's validation folder, which nothing in the loop looks at
(no early stopping, no selection: a fixed number of epochs). Choices about the
ranking are made with --score-on dev, which scores on a held-back quarter of
the training folder instead and never reads the validation folder.

Features and head are what `imgclf train` does by default: its default
backbone's cached features (--model; EfficientNet-Lite1 since issue 12) and
`--head cv`, the linear head of training/head_fit.py with its L2 strength
chosen by 5-fold cross-validation on the labelled images alone (3-fold below
50 labels). `--head epochs` is the recipe before issue 12 (plain + mirrored
features, dropout 0.2 + linear layer, AdamW lr 1e-3, weight decay 0.01, label
smoothing 0.1, 1 warm-up epoch then cosine, batch 128) for a fixed 40 epochs
instead of early stopping on a validation split (the simulation has none to
spare). Temperature 1 in both (for two classes a temperature keeps the order
of the margins; it changes only how much uncertainty weighs against density).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import DATASETS, ROOT, machine, table


def features(data: Path, model: str):
    """(train plain, train flip, train labels, val plain, val labels) through the feature cache."""
    from imgclf.data.datasets import discover
    from imgclf.models.embedder import BackboneEmbedder

    emb = BackboneEmbedder.pretrained(model)
    s = discover(data)
    tr, ytr, _ = emb.features_items(s.root, s.train, variants=("plain", "flip"), workers=1)
    va, yva, _ = emb.features_items(s.root, s.val, workers=1)
    return tr["plain"], tr["flip"], ytr, va["plain"], yva


def fit_head(X: np.ndarray, Xf: np.ndarray, y: np.ndarray, classes: int, seed: int, head: str = "cv"):
    """imgclf's head on features (see the module docstring); returns a predict_proba function."""
    return (fit_head_cv if head == "cv" else fit_head_epochs)(X, Xf, y, classes, seed)


def fit_head_cv(X: np.ndarray, Xf: np.ndarray, y: np.ndarray, classes: int, seed: int):
    """`imgclf train`'s default head: head_fit.fit_head_cv on plain features."""
    import torch

    from imgclf.training.head_fit import fit_head_cv as fit

    k = 5 if np.bincount(y, minlength=classes).min() >= 10 else 3  # each fold needs images of every class
    f = fit(torch.from_numpy(X).float(), torch.from_numpy(y).long(), 1, k, seed)

    def proba(F: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(F).float() @ f.weight.T + f.bias, 1).numpy()

    return proba


def fit_head_epochs(X: np.ndarray, Xf: np.ndarray, y: np.ndarray, classes: int, seed: int, epochs: int = 40):
    import torch

    from imgclf.training.loop import make_loss, train_one_epoch, warmup_cosine

    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(X.shape[1], classes))
    XX = torch.from_numpy(np.concatenate([X, Xf])).float()
    YY = torch.from_numpy(np.concatenate([y, y])).long()
    steps = (len(XX) + 127) // 128
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps, steps))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        idx = torch.randperm(len(XX), generator=gen)
        batches = [(XX[idx[i:i + 128]], YY[idx[i:i + 128]]) for i in range(0, len(XX), 128)]
        train_one_epoch(head, batches, make_loss(None, 0.1), opt, sched)
    head.eval()

    def proba(F: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(head(torch.from_numpy(F).float()), 1).numpy()

    return proba


def fitted_scorer(F: np.ndarray):
    """The unknown scorer `imgclf train` fits (inference/unknown.py, the one
    `imgclf suggest` reads from the run), with the labelled images as its kNN
    bank. Its scale, the known images' own distances, comes from leave-one-out
    (each labelled image against the other labelled ones) instead of a
    validation split: the simulation has no labelled images to spare, and the
    data's validation folder is the scoring set, which nothing may look at."""
    import torch

    from imgclf.inference.unknown import KNN_K, UnknownScorer, normalise_bank

    bank = normalise_bank(F)
    sims = torch.nn.functional.normalize(torch.from_numpy(F).float(), dim=1) @ bank.half().float().T
    sims.fill_diagonal_(-2.0)  # not its own neighbour
    return UnknownScorer(bank, 1 - torch.topk(sims, min(KNN_K, len(F) - 1), dim=1).values[:, -1])


def novelty_for(kind: str, F_lab: np.ndarray, F_pool: np.ndarray) -> np.ndarray:
    """suggest: what `imgclf suggest` does with the run's scorer (open_set_novelty);
    ramp: the unknown score ramped from --reject auto's 0.95 to 1 (the version
    before the conformal q-value); none: no novelty term."""
    import torch

    from imgclf.data_engine.suggest import open_set_novelty
    from imgclf.inference.predictor import AUTO_KEEP

    if kind == "none":
        return np.zeros(len(F_pool), np.float32)
    scorer = fitted_scorer(F_lab)
    with torch.inference_mode():
        unknown = scorer(torch.from_numpy(F_pool).float()).numpy()
    if kind == "ramp":
        return np.clip((unknown - AUTO_KEEP) / (1 - AUTO_KEEP), 0, 1)
    return open_set_novelty(unknown, len(scorer.val_sorted))


def simulate(data, strategy: str, seed: int, rounds: int, step: float, novelty: str = "suggest", head: str = "cv"):
    from imgclf.data_engine.suggest import rank_for_labelling
    from imgclf.inference.neighbours import unit_rows

    X, Xf, y, Xv, yv = data
    classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    n_step = max(1, int(round(step * len(y))))
    labelled = list(rng.choice(len(y), n_step, replace=False))
    U = unit_rows(X)
    curve = []
    for r in range(rounds):
        proba = fit_head(X[labelled], Xf[labelled], y[labelled], classes, seed * 100 + r, head)
        curve.append((len(labelled), float((proba(Xv).argmax(1) == yv).mean())))
        if r == rounds - 1:
            break
        pool = np.setdiff1d(np.arange(len(y)), labelled)
        if strategy == "random":
            pick = rng.choice(pool, n_step, replace=False)
        else:
            nov = novelty_for(novelty, X[labelled], X[pool])
            order, _ = rank_for_labelling(proba(X[pool]), U[pool], U[labelled], n_step, novelty=nov)
            pick = pool[order]
        labelled += [int(i) for i in pick]
    return curve


def dev_split(data, share: float = 0.25, seed: int = 1234):
    """For choosing the ranking without the validation folder: a fixed,
    per-class `share` of the training images becomes the scoring set and the
    rest the pool (the validation folder is not used at all)."""
    X, Xf, y, _, _ = data
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:round(share * (y == c).sum())]
                           for c in np.unique(y)])
    keep = np.setdiff1d(np.arange(len(y)), held)
    return X[keep], Xf[keep], y[keep], X[held], y[held]


def reach(n: list[int], sug: np.ndarray, rnd_final: float, rnd_se: float):
    """Labels at which suggest's mean first comes within one standard error of random's final mean."""
    return next((k for k, v in zip(n, sug) if v >= rnd_final - rnd_se), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="labelled fractions 5%%, 10%%, ... (rounds x 5%%)")
    ap.add_argument("--datasets", default="cats_and_dogs_filtered,hymenoptera")
    ap.add_argument("--novelty", default="suggest", help="comma-separated: suggest, ramp, none (novelty_for)")
    ap.add_argument("--score-on", choices=("val", "dev"), default="val",
                    help="val: the data's validation folder (report); dev: 25%% of the training folder (choose)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "suggest.png")
    ap.add_argument("--model", default=None, help="backbone (default: imgclf train's default)")
    ap.add_argument("--head", choices=("cv", "epochs"), default="cv", help="cv: imgclf train's default head")
    a = ap.parse_args()
    from imgclf.config import TrainConfig

    a.model = a.model or TrainConfig().model
    import torch

    torch.set_num_threads(1)  # tiny matmuls: one thread is faster (training/stage_head.py)
    names, kinds = a.datasets.split(","), a.novelty.split(",")
    strategies = [f"suggest:{k}" for k in kinds] + ["random"]
    results, t0 = {}, time.time()
    for name in names:
        data = features(DATASETS / name, a.model)
        data = dev_split(data) if a.score_on == "dev" else data
        for strategy in strategies:
            kind = strategy.partition(":")[2]
            curves = [simulate(data, strategy.partition(":")[0], s, a.rounds, 0.05, kind, a.head)
                      for s in range(a.seeds)]
            n = [c[0] for c in curves[0]]
            acc = np.array([[c[1] for c in cur] for cur in curves])
            results[(name, strategy)] = (n, acc.mean(0), acc.std(0, ddof=1))
            print(name, strategy, [f"{x:.4f}" for x in acc.mean(0)], f"{time.time() - t0:.0f} s", flush=True)
        X, Xf, y, Xv, yv = data  # the ceiling: every training label
        full = [float((fit_head(X, Xf, y, int(y.max()) + 1, s, a.head)(Xv).argmax(1) == yv).mean())
                for s in range(a.seeds)]
        results[(name, "all")] = (len(y), float(np.mean(full)), float(np.std(full, ddof=1)))
    print(f"\n{machine()}; {time.time() - t0:.0f} s; {a.model}, head {a.head}; scored on {a.score_on}; "
          f"sd over {a.seeds} seeds (ddof 1)\n")
    rows = []
    for name in names:
        _, rnd, rnd_sd = results[(name, "random")]
        se = rnd_sd[-1] / np.sqrt(a.seeds)
        for strategy in strategies[:-1]:
            n, sug, sug_sd = results[(name, strategy)]
            for i, k in enumerate(n):
                rows.append({"data": name, "ranking": strategy, "labels": k,
                             "suggest acc %": f"{100 * sug[i]:.2f} ± {100 * sug_sd[i]:.2f}",
                             "random acc %": f"{100 * rnd[i]:.2f} ± {100 * rnd_sd[i]:.2f}"})
            r = reach(n, sug, rnd[-1], se)
            print(f"{name} {strategy}: random's final {100 * rnd[-1]:.2f}% (SE {100 * se:.2f}) with {n[-1]} labels; "
                  f"suggest within one SE of it from {r if r is not None else 'more than ' + str(n[-1])} labels; "
                  f"mean over rounds 2-{len(n)}: suggest {100 * sug[1:].mean():.2f}, random {100 * rnd[1:].mean():.2f}")
        n_all, acc_all, sd_all = results[(name, "all")]
        print(f"{name}: all {n_all} labels: {100 * acc_all:.2f} ± {100 * sd_all:.2f}%")
    print(table(rows, ["data", "ranking", "labels", "suggest acc %", "random acc %"]))
    if a.score_on == "val" and kinds == ["suggest"] and names == ["cats_and_dogs_filtered", "hymenoptera"]:
        plot(results, a.out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, name in zip(axes, ("cats_and_dogs_filtered", "hymenoptera")):
        n_all, acc_all, _ = results[(name, "all")]
        ax.axhline(100 * acc_all, color="tab:green", ls="--", lw=1, label=f"all {n_all} labels")
        for strategy, color in (("suggest:suggest", "tab:blue"), ("random", "tab:gray")):
            n, m, sd = results[(name, strategy)]
            ax.plot(n, 100 * m, "o-", color=color, label="imgclf suggest" if strategy != "random" else "random")
            ax.fill_between(n, 100 * (m - sd), 100 * (m + sd), color=color, alpha=0.15)
        ax.set_title(f"{name} (mean of seeds, ± sd)")
        ax.set_xlabel("labelled training images")
        ax.set_ylabel("validation accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
