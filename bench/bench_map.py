"""The report's data map: seconds for the 2-D projection (t-SNE after PCA to
50 dimensions, data_engine/data_map.py: project) on one thread as the report
runs it and on both cores, for the thumbnails, and
the HTML's size, at report sizes, on real EfficientNet-Lite0 embeddings of
dogs_vs_cats_2k_fullres.

    python bench/bench_map.py            # about 4 minutes with a cold feature cache, 1 warm
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import DATASETS, machine, table  # noqa: E402


def main() -> None:
    from imgclf.data.near_dup import embeddings
    from imgclf.data_engine.data_map import MAP_THUMB, project, render_map
    from imgclf.evaluation.page import data_uri
    from imgclf.evaluation.report import thumbnail

    root = DATASETS / "dogs_vs_cats_2k_fullres"
    items = [(str(p.relative_to(root)), int(p.parent.name == "dogs"))
             for p in sorted(root.rglob("*.jpg"))]
    print(f"machine: {machine()} (shared with other jobs)\n")
    t0 = time.perf_counter()
    feats, kept = embeddings(root, items, progress=False)
    print(f"embeddings of {len(kept)} images: {time.perf_counter() - t0:.1f} s (cache cold or warm)\n")
    rng = np.random.default_rng(0)
    rows = []
    for n in (300, 1000, 2000):
        pick = np.sort(rng.choice(len(kept), size=n, replace=False))
        t0 = time.perf_counter()
        xy = project(feats["plain"][pick])  # as the report runs it: one thread
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        project(feats["plain"][pick], threads=2)  # the baseline: both cores
        t_proj = time.perf_counter() - t0
        t0 = time.perf_counter()
        thumbs = {}
        for k in pick:
            t = thumbnail(root / items[kept[k]][0], size=MAP_THUMB)
            thumbs[items[kept[k]][0]] = data_uri(t, "image/jpeg") if t else None
        t_th = time.perf_counter() - t0
        pts = [{"path": items[kept[k]][0], "true": items[kept[k]][1], "pred": items[kept[k]][1], "split": "eval",
                "wrong": False, "suspect": False} for k in pick]
        size = len(render_map(pts, xy, ["cats", "dogs"], thumbs).encode())
        rows.append({"points": n, "t-SNE s, 1 thread (used)": f"{t_one:.1f}", "t-SNE s, 2 threads": f"{t_proj:.1f}",
                     "thumbnails s": f"{t_th:.1f}",
                     "map HTML MB": f"{size / 1e6:.2f}"})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
