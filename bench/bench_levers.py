"""Issue 12, goal 1: what each lever gives on cats_and_dogs_filtered.

    .venv/bin/python bench/bench_levers.py      # about 12 minutes on 2 cores

For each backbone, input size and centre crop: frozen features of train
(and mirrored train where asked) and val, their extraction speed, and the
validation accuracy of the linear head fitted by cross-validation on train
(training/head_fit.py; val chooses nothing), over 3 fold seeds. Also the
Lite0+Lite1 feature ensemble and Lite1 at two scales (each concatenated),
and mirrored features. The
engine levers (INT8, OpenVINO, batch size, memory arena) are measured by
hand; their numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table  # noqa: E402

CONFIGS = [  # (model, size, crop_pct, with mirrored train features)
    ("efficientnet_lite0", 224, 1.0, True),  # the former default
    ("efficientnet_lite0", 224, 0.875, False),
    ("efficientnet_lite1", 200, 1.0, False),
    ("efficientnet_lite1", 224, 1.0, False),
    ("efficientnet_lite1", 240, 1.0, True),
    ("efficientnet_lite1", 224, 0.875, False),
    ("efficientnet_lite1", 208, 208 / 240, False),  # the new default
    ("efficientnet_lite2", 260, 1.0, False),
]


def features(name: str, size: int, crop: float, flip: bool, splits, cache: Path) -> tuple[dict, float]:
    from imgclf.models.embedder import BackboneEmbedder
    from imgclf.models.registry import build_model, get_model_info

    model = build_model(name, 2, pretrained=True)
    pp = dataclasses.replace(get_model_info(name).preprocess, size=size, crop_pct=crop)
    emb = BackboneEmbedder(name, model.backbone, pp, torch.device("cpu"), "onnxruntime", cache)
    variants = ("plain", "flip") if flip else ("plain",)
    t0 = time.time()
    ftr, ytr, _ = emb.features_items(splits.root, splits.train, variants=variants, progress=False, desc="train")
    fva, yva, _ = emb.features_items(splits.root, splits.val, progress=False, desc="val")
    rate = (len(ytr) * len(variants) + len(yva)) / (time.time() - t0)
    return {"tr": ftr["plain"], "trf": ftr.get("flip"), "va": fva["plain"], "ytr": ytr, "yva": yva}, rate


def cv_head_acc(f: dict, flip: bool, seeds=(0, 1, 2)) -> tuple[list[float], list[float]]:
    from imgclf.training.head_fit import fit_head_cv

    X = np.concatenate([f["tr"], f["trf"]]) if flip else f["tr"]
    Y = torch.from_numpy(np.concatenate([f["ytr"]] * (2 if flip else 1)))
    va, yv = torch.from_numpy(f["va"]).float(), torch.from_numpy(f["yva"])
    vals, cvs = [], []
    for s in seeds:
        fit = fit_head_cv(torch.from_numpy(X).float(), Y, 2 if flip else 1, 5, s)
        vals.append(((va @ fit.weight.T + fit.bias).argmax(1) == yv).float().mean().item())
        cvs.append(fit.cv[fit.l2]["acc"])
    return vals, cvs


def main() -> None:
    from imgclf.data.datasets import discover

    torch.set_num_threads(2)
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    splits = discover(str(DATASETS / "cats_and_dogs_filtered"), 0.1, 0.0, 0, False)
    rows, feats = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        for name, size, crop, flip in CONFIGS:
            f, rate = features(name, size, crop, flip, splits, Path(tmp))
            feats[(name, size, crop)] = f
            for use_flip in ((False, True) if flip else (False,)):
                torch.set_num_threads(1)
                vals, cvs = cv_head_acc(f, use_flip)
                torch.set_num_threads(2)
                rows.append({"backbone": name.replace("efficientnet_", ""), "input": f"{size} px, crop {crop:.3g}",
                             "mirrored train": "yes" if use_flip else "no", "images/s": round(rate, 1),
                             "cv acc (train folds)": f"{np.mean(cvs):.4f}",
                             "val acc (3 fold seeds)": " / ".join(f"{v:.3f}" for v in vals)})
                print(rows[-1], flush=True)
    torch.set_num_threads(1)
    combos = [("lite0 + lite1 (concatenated)", "224 + 240 px, crop 1",
               ("efficientnet_lite0", 224, 1.0), ("efficientnet_lite1", 240, 1.0)),
              ("lite1 multi-scale (concatenated)", "208 of 240 + 240 px",  # the default's view and the whole image
               ("efficientnet_lite1", 208, 208 / 240), ("efficientnet_lite1", 240, 1.0))]
    for label, inp, ka, kb in combos:
        a, b = feats[ka], feats[kb]
        both = {"tr": np.concatenate([a["tr"], b["tr"]], 1), "va": np.concatenate([a["va"], b["va"]], 1),
                "trf": None, "ytr": a["ytr"], "yva": a["yva"]}
        vals, cvs = cv_head_acc(both, False)
        rows.append({"backbone": label, "input": inp, "mirrored train": "no", "images/s": "",
                     "cv acc (train folds)": f"{np.mean(cvs):.4f}",
                     "val acc (3 fold seeds)": " / ".join(f"{v:.3f}" for v in vals)})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
