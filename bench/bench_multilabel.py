"""Multi-label on real photos composed side by side (imgclf/demo_multilabel.py):
a cat or dog photo (cats_and_dogs_filtered) and/or an ant or bee photo
(hymenoptera) per image, labels = the photos' classes. Default `imgclf train`
with `--resize squash` (the canvas is 2:1), thresholds tuned on val; mAP and
F1 on the held-out test split, which no choice has seen. Three compositions
(seeds), each photo used once.

    python bench/bench_multilabel.py        # about 6 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, machine, table, timed_cli  # noqa: E402


def main() -> None:
    from imgclf.demo_multilabel import compose

    rows = []
    for seed in (0, 1, 2):
        work = Path(tempfile.mkdtemp(prefix=f"bench-ml-{seed}-"))
        data = compose(DATASETS, work / "data", n=480, seed=seed, pets="cats_and_dogs_filtered")
        wall, peak, _ = timed_cli(["train", data, "--out", work / "run", "--resize", "squash", "--seed", seed,
                                   "--val-fraction", "0.2", "--test-fraction", "0.25"])
        m = json.loads((work / "run" / "eval_test.json").read_text())
        rows.append({"seed": seed, "test images": m["n"], "mAP": f"{m['map']:.4f}",
                     **{f"AP {c}": f"{d['ap']:.3f}" for c, d in m["per_label"].items()},
                     "micro F1": f"{m['micro']['f1']:.3f}", "macro F1": f"{m['macro']['f1']:.3f}",
                     "subset acc": f"{m['subset_accuracy']:.3f}", "Hamming": f"{m['hamming_loss']:.3f}",
                     "train s": f"{wall:.0f}"})
    maps = np.array([float(r["mAP"]) for r in rows])
    print(f"machine: {machine()}\n")
    print(table(rows, list(rows[0])))
    print(f"\nmAP mean {maps.mean():.4f}, min {maps.min():.4f}, max {maps.max():.4f} over {len(rows)} seeds")


if __name__ == "__main__":
    main()
