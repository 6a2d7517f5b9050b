"""A linear head fitted exactly, its regularisation chosen by cross-validation.

On cached features a linear head is a convex problem: full-batch L-BFGS
solves it in well under a second, where AdamW needs dozens of epochs and an
early stop chosen on val. Choosing the L2 strength by k-fold cross-validation
on the training features leaves the validation split untouched by every
choice, so its accuracy is an honest estimate (docs/benchmarks.md,
"generalisation, not validation luck": CV and val agree, where early
stopping on val overstates it).

The one cross-validated logistic regression of imgclf (label-noise suspects
use it too), on torch rather than scikit-learn's LogisticRegression: the same
lbfgs solver, chosen by measurement (bench/bench_logreg.py, docs/benchmarks.md:
as accurate, and faster), and it fits multi-label (sigmoid) heads, takes
class weights as the epoch loop does, runs on the GPU when training does, and
warm-starts along the regularisation path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.folds import stratified_folds

# L2 strengths tried, strongest first (warm starts run from the simplest model).
# Per example, on standardised features: 1 is a strongly shrunk model, 1e-3 nearly unregularised
# (smaller values never won on the benchmarks and take the most iterations).
L2_GRID = tuple(float(v) for v in np.logspace(0, -3, 7))


@dataclass
class LinearFit:
    weight: torch.Tensor  # (classes, features), for raw (unstandardised) features
    bias: torch.Tensor  # (classes,)
    l2: float  # the chosen strength
    cv: dict  # l2 -> {"loss", "acc"} on held-out folds


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool, weights: torch.Tensor | None) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=weights)
    return F.cross_entropy(logits, y, weight=weights)


def fit_linear(X: torch.Tensor, Y: torch.Tensor, l2: float, multi_label: bool = False,
               weights: torch.Tensor | None = None, init: tuple | None = None,
               max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean loss + l2/2 |W|^2 over standardised features X (float32)
    with L-BFGS; returns (W, b). init: a previous (W, b) to start from."""
    k = Y.shape[1] if multi_label else int(Y.max()) + 1
    W = (init[0].clone() if init else torch.zeros(k, X.shape[1], device=X.device)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(k, device=X.device)).requires_grad_(True)
    # Tolerances: tighter ones (1e-6 / 1e-9) took 3x the time on cats_and_dogs_filtered
    # for held-out losses equal to 3 decimals and the same chosen strength.
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-4,
                            tolerance_change=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(X @ W.T + b, Y, multi_label, weights) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def standardise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Z, mean, sd): features scaled per dimension, so one L2 strength suits every backbone."""
    X = X.float()
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
    return (X - mu) / sd, mu, sd


def held_out(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> tuple[float, float]:
    """(summed unweighted loss, hits) of a held-out fold: comparable across settings and folds."""
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum().item()
        return loss, ((logits > 0).float() == y).all(1).sum().item()
    return F.cross_entropy(logits, y, reduction="sum").item(), (logits.argmax(1) == y).sum().item()


def cross_validate(Z: torch.Tensor, Y: torch.Tensor, folds: np.ndarray, variants: int, grid=L2_GRID,
                   multi_label: bool = False, weights: torch.Tensor | None = None) -> dict:
    """Held-out loss and accuracy of each strength in `grid`. Z holds `variants`
    stacked copies of the n images (plain, mirrored); a fold holds out all
    copies of its images and is scored on the plain ones."""
    n = len(folds)
    f = torch.from_numpy(np.tile(folds, variants)).to(Z.device)
    total = {l2: [0.0, 0.0] for l2 in grid}
    for i in range(int(folds.max()) + 1):
        tr, te = f != i, torch.from_numpy(np.flatnonzero(folds == i)).to(Z.device)
        init = None
        for l2 in grid:  # strongest first, each warm-started from the last
            init = fit_linear(Z[tr], Y[tr], l2, multi_label, weights, init)
            loss, hits = held_out(Z[te] @ init[0].T + init[1], Y[te], multi_label)
            total[l2][0] += loss
            total[l2][1] += hits
    return {l2: {"loss": v[0] / n, "acc": v[1] / n} for l2, v in total.items()}


def choose_l2(cv: dict) -> float:
    """The strongest regularisation within 1% of the lowest held-out loss:
    among near-equal models, the simplest transfers best."""
    best = min(v["loss"] for v in cv.values())
    return max(l2 for l2, v in cv.items() if v["loss"] <= best * 1.01 + 1e-12)


def fit_head_cv(X: torch.Tensor, Y: torch.Tensor, variants: int, k: int, seed: int, multi_label: bool = False,
                weights: torch.Tensor | None = None, grid=L2_GRID) -> LinearFit:
    """Standardise, cross-validate the L2 strength over `grid`, refit on all of
    X, and fold the standardisation into (W, b) so the head takes raw features."""
    Z, mu, sd = standardise(X)
    y_img = Y[: len(Y) // variants].cpu().numpy()
    folds = stratified_folds(y_img if not multi_label else np.zeros(len(y_img), np.int64), k, seed)
    cv = cross_validate(Z, Y, folds, variants, grid, multi_label, weights)
    l2 = choose_l2(cv)
    init = None
    for s in [g for g in grid if g >= l2]:  # the same warm-start path as in each fold
        init = fit_linear(Z, Y, s, multi_label, weights, init)
    return LinearFit(*for_raw_features(*init, mu, sd), l2, cv)


def for_raw_features(W: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor):
    """(W, b) fitted on z = (x - mu) / sd, rewritten for x: (W / sd, b - (W / sd) mu)."""
    w = W / sd
    return w, b - w @ mu


def cv_summary(fit: LinearFit, k: int) -> str:
    v = fit.cv[fit.l2]
    return (f"L2 {fit.l2:.3g} chosen by {k}-fold cross-validation on train: held-out acc {v['acc']:.4f}, "
            f"loss {v['loss']:.4f}")
