"""Detection on BCCD with the frozen, cached EfficientNet-Lite0 trunk
(imgclf/tasks/detect): the head choice on the val split, and a longer run
whose epoch is chosen on val and scored on the test split no choice saw.

    python bench/bench_detect.py heads 60 9 320        # FCOS vs RetinaNet, 60 train images, 9 epochs, 320 px
    python bench/bench_detect.py final retinanet 8 320   # all train images, 8 epochs, batch 8, scored on test
    python bench/bench_detect.py final retinanet 8 320 4 # the same at batch 4

One intra-op thread: on a contended 2-core machine two threads per process
made each training step several times slower.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATASETS, machine  # noqa: E402


def _data():
    from imgclf.tasks.detect.check import split_dataset
    from imgclf.tasks.detect.data import read_dataset

    ds = read_dataset(DATASETS / "bccd")
    return ds, split_dataset(ds, seed=0)


def heads(n: int, epochs: int, size: int, names: str = "fcos,retinanet") -> None:
    from imgclf.tasks.detect.train import fit

    ds, sp = _data()
    for head in names.split(","):
        r = fit(ds, sp["train"][:n], sp["val"], epochs=epochs, image_size=size, head=head, cache=True,
                eval_every=max(1, epochs // 3), log=lambda row, h=head: print(h, row, flush=True))
        print("RESULT", json.dumps({"head": head, "n": n, "epochs": epochs, "size": size, "seconds": round(r.seconds, 1),
              **{k: v for k, v in r.best.items() if not isinstance(v, dict)},
              "ap50_per_class": r.best["ap50_per_class"]}), flush=True)


def final(head: str, epochs: int, size: int, batch_size: int = 8) -> None:
    from imgclf.tasks.detect.train import evaluate, fit

    ds, sp = _data()
    t = time.time()
    r = fit(ds, sp["train"], sp["val"], epochs=epochs, image_size=size, head=head, cache=True, batch_size=batch_size,
            eval_every=max(1, epochs // 4), log=lambda row: print(row, flush=True))
    m = evaluate(r.model, ds, sp["test"], size)
    print("RESULT", json.dumps({"head": head, "train": len(sp["train"]), "epochs": epochs, "size": size,
          "batch_size": batch_size, "fit_seconds": round(r.seconds, 1), "val_map": r.best["map"], "val_map50": r.best["map50"],
          "best_epoch": r.best["epoch"], "test": {k: v for k, v in m.items() if k != "f1"},
          "total_seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(f"machine: {machine()} (shared with other jobs)", flush=True)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "heads":
        heads(int(args[0]), int(args[1]), int(args[2]), *args[3:])
    else:
        final(args[0], int(args[1]), int(args[2]), *map(int, args[3:]))
