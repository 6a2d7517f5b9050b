"""Which unknown ("none of these") score? Methods compared on real data.

Known classes: a model trained on one dataset; unknowns: another dataset's
photos. Each method gives every image a score (higher = less like the training
data). Columns:
  AUROC            known vs unknown images, threshold-free
  reject@95        share of unknowns rejected at the threshold that keeps 95%
                   of the known VALIDATION images (what `--reject auto` does)
  known acc        share of known TEST images (never used for any choice)
                   answered with their correct label and not rejected
The method and k were chosen on pair A; pair B is reported as measured.

    python bench/bench_unknown.py      # about 2 minutes on 2 cores, cold cache
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table  # noqa: E402

PAIRS = [  # (name, known data, known test folder, unknown folder)
    ("A: ants/bees known, cats/dogs unknown", "hymenoptera", None, "cats_dogs_tiny"),
    ("B: cats/dogs known, ants/bees unknown", "cats_dogs_tiny", "cats_and_dogs_filtered/validation", "hymenoptera"),
]


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))


def scores_of(clf, root: Path, files: list[str]) -> dict[str, np.ndarray]:
    """Every method's unknown score for these files, plus the predicted label."""
    import torch

    from imgclf.inference.neighbours import kth_distance as knn_distance
    from imgclf.inference.torch_predictor import probs_from_logits
    from imgclf.inference.unknown import energy, mahalanobis

    feats, _, _ = clf.features_items(root, [(f, 0) for f in files], progress=False)
    f = feats["plain"]
    logits = clf.logits_from_features(f)
    p = probs_from_logits({"plain": logits}, clf.temperature)
    bank, maha = clf.bench_bank, clf.bench_maha
    out = {"max prob (calibrated)": -p.max(1), "energy": energy(torch.from_numpy(logits), clf.temperature).numpy(),
           "mahalanobis": mahalanobis(torch.from_numpy(f), *maha).numpy(), "pred": p.argmax(1)}
    for k in (1, 5, 10, 50):
        out[f"kNN cosine k={k}"] = knn_distance(torch.from_numpy(f), bank, k).numpy()
    return out


def fit_banks(clf, root: Path, train: list[tuple[str, int]]) -> None:
    from imgclf.inference.unknown import fit_mahalanobis, normalise_bank

    feats, labels, _ = clf.features_items(root, train, progress=False)
    clf.bench_bank = normalise_bank(feats["plain"])
    clf.bench_maha = fit_mahalanobis(feats["plain"], labels, len(clf.classes))


def run_pair(name: str, known: str, known_test: str | None, unknown: str, work: Path) -> list[dict]:
    import imgclf
    from imgclf.data.images import list_files
    from imgclf.runs import RunDir

    out = work / known
    if not (out / "model.pt").exists():
        imgclf.train(data=str(DATASETS / known), out=str(out), evaluate=False)
    clf = imgclf.load(out)
    splits = RunDir(out).splits()
    root = Path(splits.root)
    fit_banks(clf, root, splits.train)
    val = scores_of(clf, root, [p for p, _ in splits.val])
    val_y = np.array([y for _, y in splits.val])
    test_files, test_y = [p for p, _ in splits.val], val_y
    if known_test:  # images of the known classes that no choice has seen
        tdir = DATASETS / known_test
        test_files = [str(p) for c in clf.classes for p in list_files(tdir / c)]
        test_y = np.array([i for i, c in enumerate(clf.classes) for _ in list_files(tdir / c)])
    test = scores_of(clf, Path("/"), test_files) if known_test else val
    unk = scores_of(clf, Path("/"), [str(p) for p in list_files(DATASETS / unknown)])
    rows = []
    for m in (k for k in val if k != "pred"):
        thr = np.quantile(val[m], 0.95, method="higher")
        ok = (test["pred"] == test_y) & (test[m] <= thr)
        rows.append({"pair": name, "method": m, "AUROC": f"{auroc(test[m], unk[m]):.4f}",
                     "reject@95": f"{100 * (unk[m] > thr).mean():.1f}%", "known acc": f"{100 * ok.mean():.1f}%",
                     "known n": len(test_y), "unknown n": len(unk["pred"])})
    return rows


def main() -> None:
    import os

    work = Path(os.environ.get("BENCH_WORK", tempfile.mkdtemp(prefix="bench-unknown-")))
    rows = []
    for pair in PAIRS:
        rows += run_pair(*pair, work)
    print(f"machine: {machine()}\n")
    print(table(rows, ["pair", "method", "AUROC", "reject@95", "known acc", "known n", "unknown n"]))


if __name__ == "__main__":
    main()
