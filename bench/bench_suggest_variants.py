"""Ranking variants for `imgclf suggest`, in bench_suggest.py's simulation (how the ranking was chosen).

  .venv/bin/python bench/bench_suggest_variants.py hymenoptera random,current,margin,density 10 6
  (dataset, variants, rounds, seeds; docs/benchmarks.md). `current` is rank_for_labelling as it is now.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_suggest as B
import numpy as np
import torch

from imgclf.data_engine import suggest as S
from imgclf.inference.neighbours import nearest_distance, unit_rows

torch.set_num_threads(1)

def choose(variant, probs, Up, Ul, n):
    unc = S.uncertainty(probs)
    if variant == "margin":
        return list(np.argsort(-unc)[:n])
    if variant == "nonov":
        return S.rank_for_labelling(probs, Up, Ul, n, novelty=np.zeros(len(Up)))[0]
    if variant == "cardoso":
        d = nearest_distance(Up, Ul); alpha = len(Up) / (len(Up) + len(Ul)); chosen = []; taken = np.zeros(len(Up), bool)
        for _ in range(n):
            sc = np.where(taken, -9, alpha * d + (1 - alpha) * unc); i = int(np.argmax(sc)); chosen.append(i); taken[i] = True
            d = np.minimum(d, 1 - Up @ Up[i])
        return chosen
    if variant == "topk_kcenter":  # top 3n by margin, then k-center within
        cand = np.argsort(-unc)[:3 * n]; d = nearest_distance(Up[cand], Ul); chosen = []
        taken = np.zeros(len(cand), bool)
        for _ in range(n):
            i = int(np.argmax(np.where(taken, -9, d))); chosen.append(int(cand[i])); taken[i] = True
            d = np.minimum(d, 1 - Up[cand] @ Up[cand[i]])
        return chosen
    if variant.startswith("density"):
        beta = float(variant[7:] or 1)
        S_ = Up @ Up.T
        kk = min(10, len(Up) - 1)
        dens = np.sort(S_, axis=1)[:, -kk - 1:-1].mean(1)
        dens = (dens - dens.min()) / max(1e-9, dens.max() - dens.min())
        pr = unc * dens ** beta
        d = nearest_distance(Up, Ul); chosen = []; taken = np.zeros(len(Up), bool)
        for _ in range(n):
            i = int(np.argmax(np.where(taken, -9, (pr + 1e-3) * d))); chosen.append(i); taken[i] = True
            d = np.minimum(d, 1 - Up @ Up[i])
        return chosen
    if variant == "dens_gamma":  # typicality first, uncertainty as labels grow (Cardoso-style schedule)
        from imgclf.data_engine.suggest import density
        gamma = len(Ul) / (len(Ul) + len(Up))
        pr = density(Up) * unc ** gamma
        d = nearest_distance(Up, Ul); chosen = []; taken = np.zeros(len(Up), bool)
        for _ in range(n):
            i = int(np.argmax(np.where(taken, -9, (pr + 1e-3) * d))); chosen.append(i); taken[i] = True
            d = np.minimum(d, 1 - Up @ Up[i])
        return chosen
    if variant == "random":
        return list(np.random.default_rng(len(Ul)).permutation(len(Up))[:n])
    if variant == "current":
        return S.rank_for_labelling(probs, Up, Ul, n)[0]
    raise ValueError(variant)

def sim(data, variant, seed, rounds):
    X, Xf, y, Xv, yv = data
    rng = np.random.default_rng(seed); n_step = max(1, int(round(0.05 * len(y))))
    lab = list(rng.choice(len(y), n_step, replace=False)); U = unit_rows(X); out = []
    for r in range(rounds):
        pr = B.fit_head(X[lab], Xf[lab], y[lab], int(y.max()) + 1, seed * 100 + r)
        out.append(float((pr(Xv).argmax(1) == yv).mean()))
        if r == rounds - 1:
            break
        pool = np.setdiff1d(np.arange(len(y)), lab)
        lab += [int(i) for i in pool[choose(variant, pr(X[pool]), U[pool], U[lab], n_step)]]
    return out

name = sys.argv[1]; variants = sys.argv[2].split(","); rounds = int(sys.argv[3])
data = B.features(B.DATASETS / name)
for v in variants:
    t = time.time(); acc = np.array([sim(data, v, s, rounds) for s in range(int(sys.argv[4]) if len(sys.argv) > 4 else 3)])
    print(name, v, " ".join(f"{100*x:.2f}" for x in acc.mean(0)), f"{time.time()-t:.0f}s", flush=True)
