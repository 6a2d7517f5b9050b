"""`imgclf suggest RUN UNLABELED_DIR -n N`: which images to label next.

Each unlabeled image gets
  uncertainty  1 - (p1 - p2), the margin between the two best calibrated
               probabilities (or their entropy / log C with --uncertainty entropy)
  novelty      how likely it is of a class the model does not know: from the
               run's open-set unknown score, one minus the false discovery
               rate of calling it and every image at least as unfamiliar new
               (open_set_novelty; near 0 when the pool holds no more
               unfamiliar images than chance gives), else, for a run without
               a scorer, how far the image is from every training image,
               compared with how far training images are from each other
  density      how typical it is: mean similarity to its 10 nearest pool images
and the N are chosen greedily, uncertainty-weighted k-center style: each
pick maximises max(density x uncertainty^g, novelty) x (cosine distance to
the nearest labelled or already picked image), g = labelled / (labelled +
unlabeled), so a batch covers many uncertain, typical regions instead of N
copies of one ambiguous scene or N outliers, and leans on uncertainty only as
labels make it reliable (core-sets, Sener & Savarese 2018; information
density, Settles & Craven 2008; the schedule of Cardoso et al. 2017).
bench/bench_suggest.py measures it against random choice; the variants tried
are in bench/bench_suggest_variants.py (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from imgclf.data.loading import BadFileLog
from imgclf.errors import ConfigError, DataError
from imgclf.inference.neighbours import knn, nearest_distance, unit_rows
from imgclf.inference.predictor import expand_paths
from imgclf.inference.torch_predictor import TorchPredictor, probs_from_logits
from imgclf.io import atomic_write_text
from imgclf.runs import RunDir


def uncertainty(probs: np.ndarray, kind: str = "margin") -> np.ndarray:
    """Per row in [0, 1]: 1 - (p1 - p2) (margin) or entropy / log(C)."""
    if kind == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        return -(p * np.log(p)).sum(1) / np.log(max(2, probs.shape[1]))
    top2 = -np.sort(-probs, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def distance_novelty(d_pool: np.ndarray, train_unit: np.ndarray, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Novelty from distances alone: where each pool image's distance to its
    nearest training image falls among the training images' own
    nearest-neighbour distances, mapped so only the farthest 5% count
    (0 below the 95th percentile, 1 beyond every training image's)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train_unit), min(sample, len(train_unit)), replace=False)
    _, sims = knn(train_unit, train_unit[idx], 2)  # the first neighbour is the image itself
    nn = np.sort(1.0 - sims[:, 1]) if sims.shape[1] > 1 else np.zeros(1)
    cdf = np.searchsorted(nn, d_pool, side="right") / len(nn)
    return np.clip((cdf - 0.95) / 0.05, 0.0, 1.0)


def density(pool_unit: np.ndarray, k: int = 10, sample: int = 5000, seed: int = 0) -> np.ndarray:
    """How typical each pool image is, in [0, 1]: its mean similarity to its k
    nearest pool images (among a random sample of at most `sample`, so the
    cost stays linear in the pool), min-max scaled."""
    rng = np.random.default_rng(seed)
    ref = pool_unit[rng.choice(len(pool_unit), min(sample, len(pool_unit)), replace=False)]
    k = min(k + 1, len(ref))
    _, sims = knn(ref, pool_unit, k)
    dens = (sims[:, 1:].mean(1) if k > 1 else sims[:, 0]).astype(np.float32)  # the first is usually the image itself
    span = dens.max() - dens.min()
    return (dens - dens.min()) / span if span > 0 else np.ones_like(dens)


def rank_for_labelling(probs: np.ndarray, pool_unit: np.ndarray, labelled_unit: np.ndarray, n: int,
                       kind: str = "margin", novelty: np.ndarray | None = None) -> tuple[list[int], dict]:
    """Indices of the n pool images to label next, best first, and the
    per-image scores behind them. `novelty` (in [0, 1], one per pool image)
    is the hook for an open-set unknown score; None uses distance_novelty."""
    unc = uncertainty(probs, kind)
    dens = density(pool_unit)
    d = nearest_distance(pool_unit, labelled_unit) if len(labelled_unit) else np.ones(len(pool_unit), np.float32)
    d0 = d.copy()
    if novelty is None:
        novelty = distance_novelty(d0, labelled_unit) if len(labelled_unit) > 1 else np.zeros(len(pool_unit))
    # Typical and uncertain (information density, Settles & Craven 2008): an
    # uncertain outlier teaches little about the images the model will meet.
    # Uncertainty counts more as the labelled share grows (exponent
    # |L| / (|L| + |U|), the schedule of Cardoso et al. 2017): with few labels
    # the head's uncertainty is least reliable (measured: no cold-start dip).
    gamma = len(labelled_unit) / max(1, len(labelled_unit) + len(pool_unit))
    priority = np.maximum(dens * unc ** gamma, novelty)
    chosen: list[int] = []
    taken = np.zeros(len(pool_unit), bool)
    for _ in range(min(n, len(pool_unit))):
        score = np.where(taken, -1.0, (priority + 1e-3) * np.maximum(d, 0.0))  # +1e-3: spread even when all are certain
        i = int(np.argmax(score))
        chosen.append(i)
        taken[i] = True
        d = np.minimum(d, nearest_distance(pool_unit, pool_unit[i:i + 1]))
    return chosen, {"uncertainty": unc, "density": dens, "novelty": np.asarray(novelty, np.float32), "distance": d0}


def open_set_novelty(unknown: np.ndarray | None, n_calibration: int) -> np.ndarray | None:
    """The run's unknown score (inference/unknown.py) as novelty: one minus
    the Benjamini-Hochberg q-value of each image's conformal p-value (Bates et
    al., "Testing for outliers with conformal p-values", 2023), i.e. about the
    chance that it and the images at least as unfamiliar are not all of known
    classes. The p-value is the share of the n_calibration known validation
    images at least as unfamiliar (+1 for the image itself); unknown = 0.97
    means 3% of them are. Why not the unknown score itself: 5% of known images
    score above `--reject auto`'s 0.95 by construction, so a ramp from there
    sent ordinary outliers to the front of every batch (bench/bench_suggest.py
    --novelty ramp); the q-value is near 0 unless the pool holds more
    unfamiliar images than chance gives, as when it holds a new class. None (a
    run without a scorer): rank_for_labelling falls back to distance_novelty."""
    if unknown is None:
        return None
    s = np.asarray(unknown, np.float64)
    p = (1 + np.round(n_calibration * (1 - s))) / (n_calibration + 1)
    order = np.argsort(p, kind="stable")
    q = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]  # BH: the smallest ratio at or beyond each rank
    out = np.empty(len(p), np.float32)
    out[order] = 1 - np.minimum(q, 1)
    return out


def suggest(cfg) -> tuple[list[dict], Path]:
    """Rank the images under cfg.unlabeled for labelling; write cfg.out (CSV)."""
    if cfg.n < 1:
        raise ConfigError(f"-n {cfg.n}: must be at least 1", "ask for the number of images you will label, e.g. -n 50")
    run = RunDir(cfg.run)
    clf = TorchPredictor.from_run(run.path, device=cfg.device, engine=cfg.engine, cache_dir=cfg.cache_dir)
    if clf.multi_label:
        raise ConfigError(f"{run}: suggest ranks single-label runs; this one is multi-label",
                          "label a random sample, or rank by `imgclf predict --format csv` scores near the thresholds")
    files = [str(Path(p).resolve()) for p in expand_paths([cfg.unlabeled])]
    if not files:
        raise DataError(f"{cfg.unlabeled}: no files found", "point it at a folder of images to label")
    bad = BadFileLog()
    feats, _, kept = clf.features_items("", [(p, -1) for p in files], cfg.batch_size, cfg.workers, bad,
                                        progress=False)
    if not len(kept):
        raise DataError(f"{cfg.unlabeled}: none of the {len(files)} files is a readable image", "see the list above")
    splits = run.splits()
    lab, _, _ = clf.features_items(splits.root, splits.train, cfg.batch_size, cfg.workers, bad, progress=False)
    pool = feats["plain"]
    probs = probs_from_logits({"plain": clf.logits_from_features(pool)}, clf.temperature)
    n_cal = len(clf.scorer.val_sorted) if clf.scorer is not None else 0
    order, s = rank_for_labelling(probs, unit_rows(pool), unit_rows(lab["plain"]), cfg.n, cfg.uncertainty,
                                  open_set_novelty(clf.unknown_from_features(pool), n_cal))
    rows = []
    for rank, i in enumerate(order, 1):
        top = np.argsort(-probs[i])[:2]
        odds = f"{clf.classes[top[0]]} {probs[i, top[0]]:.2f} vs {clf.classes[top[-1]]} {probs[i, top[-1]]:.2f}"
        why = ("possibly a new class: far from every training image" if s["novelty"][i] > s["uncertainty"][i] else
               f"uncertain: {odds}" if s["uncertainty"][i] >= 0.5 else f"unlike the images chosen so far ({odds})")
        rows.append({"path": files[int(kept[i])], "label": "", "rank": rank, "predicted": clf.classes[top[0]],
                     "confidence": round(float(probs[i, top[0]]), 4), "uncertainty": round(float(s["uncertainty"][i]), 4),
                     "density": round(float(s["density"][i]), 4), "novelty": round(float(s["novelty"][i]), 4),
                     "distance_to_training": round(float(s["distance"][i]), 4), "why": why})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    out = Path(cfg.out)
    atomic_write_text(out, buf.getvalue())
    return rows, out
