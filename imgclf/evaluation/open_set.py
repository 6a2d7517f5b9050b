"""`imgclf evaluate RUN --unknown DIR`: how well the model says "none of these".

The known images are the evaluated split; the unknowns are every image in
DIR (photos of none of the classes). Scores come from the same
`TorchPredictor.unknown_from_features` that predict and serve use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data.datasets import multi_hot
from imgclf.data.images import list_files
from imgclf.errors import DataError, RunError

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)  # rows of the trade-off table, plus the model's own


def unknown_section(clf, sc, folder: str | Path, workers: int, bad, use_cache: bool = True) -> dict:
    """AUROC (known vs unknown) and, per threshold, the share of known images
    kept, kept and correct, and of unknown images rejected."""
    from sklearn.metrics import roc_auc_score


    if sc.unknown is None:
        raise RunError(f"{clf.source} has no unknown-input scorer",
                       "train it again with this imgclf version (every new run has one)")
    folder = Path(folder)
    files = list_files(folder) if folder.is_dir() else []
    if not files:
        raise DataError(f"--unknown {folder}: no images found", "pass a folder of images from none of the classes")
    feats, _, kept = clf.features_items(folder, [(str(f.relative_to(folder)), 0) for f in files], workers=workers,
                                        bad=bad, progress=False, use_cache=use_cache)
    u_unk = clf.unknown_from_features(feats["plain"])
    u_known, correct = sc.unknown, answered_right(clf, sc)
    y = np.r_[np.zeros(len(u_known)), np.ones(len(u_unk))]
    auroc = float(roc_auc_score(y, np.r_[u_known, u_unk])) if len(u_known) and len(u_unk) else None
    ts = sorted({*THRESHOLDS, *([clf.reject] if clf.reject is not None else [])})
    rows = [{"threshold": t, "known_kept": float((u_known <= t).mean()),
             "known_correct": float(((u_known <= t) & correct).mean()),
             "unknown_rejected": float((u_unk > t).mean()), "stored": t == clf.reject} for t in ts]
    order = np.argsort(u_unk)[:8]  # the unknowns that look most familiar: where the scorer fails first
    return {"folder": str(folder), "split": sc.name, "n_known": len(u_known), "n_unknown": len(u_unk), "auroc": auroc,
            "method": "kNN distance in feature space, as a percentile of the validation images'",
            "reject": clf.reject, "tradeoff": rows,
            "most_familiar_unknowns": [{"path": str(folder / files[kept[i]].relative_to(folder)),
                                        "unknown": float(u_unk[i])} for i in order]}


def answered_right(clf, sc) -> np.ndarray:
    """Per known image: the top class is right; multi-label: the label set is."""
    if clf.multi_label:
        return ((sc.probs >= clf.thresholds[None]) == (multi_hot(sc.labels, len(clf.classes)) > 0.5)).all(1)
    return sc.probs.argmax(1) == sc.labels


def format_unknown(u: dict) -> str:
    lines = [f"\nunknown inputs: {u['n_known']} known vs {u['n_unknown']} images of {u['folder']}: "
             f"AUROC {u['auroc']:.4f}" if u["auroc"] is not None else "AUROC n/a",
             "  threshold  known kept  known correct  unknown rejected"]
    for r in u["tradeoff"]:
        lines.append(f"  {r['threshold']:>9.2f}  {100 * r['known_kept']:>9.1f}%  {100 * r['known_correct']:>12.1f}%  "
                     f"{100 * r['unknown_rejected']:>15.1f}%{'  <- the model' + chr(39) + 's --reject' if r['stored'] else ''}")
    return "\n".join(lines)
