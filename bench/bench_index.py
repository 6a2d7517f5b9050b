"""Nearest-neighbour search: numpy brute force vs an HNSW index (usearch).

  .venv/bin/python bench/bench_index.py [--sizes 1000,10000,100000,1000000] [--hnsw-max 100000] [--ef 64,128]

Unit vectors of dimension 1280 (EfficientNet-Lite0's pooled features),
cosine similarity, k = 10, one query at a time (what `imgclf similar` and
/v1/similar do). Vectors are drawn from a Gaussian with the mean and
covariance (top 256 principal components) of real Lite0 features of
cats_and_dogs_filtered and hymenoptera (from the feature cache), so they
have real features' spread; `--vectors random` draws isotropic Gaussians
instead, the hardest case for an approximate index (no structure to
exploit). Recall@10 is measured against the brute-force answer. Brute force
is `imgclf.inference.neighbours.knn` itself, float32 matrix-vector
product + argpartition. HNSW (usearch, M=16, expansion_add=128, imgclf's
settings) is built with all cores and searched with each --ef
expansion_search (imgclf uses similar.HNSW_EF_SEARCH).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import machine, table


def real_spectrum(components: int = 256):
    """(mean, scaled principal axes) of real Lite0 features, from the cache."""
    from common import DATASETS

    from imgclf.data.datasets import discover
    from imgclf.models.embedder import BackboneEmbedder

    emb, feats = BackboneEmbedder.pretrained("efficientnet_lite0"), []
    for name in ("cats_and_dogs_filtered", "hymenoptera"):
        s = discover(DATASETS / name)
        feats.append(emb.features_items(s.root, s.train + s.val, progress=False)[0]["plain"])
    F = np.concatenate(feats).astype(np.float64)
    mean = F.mean(0)
    _, sv, vt = np.linalg.svd(F - mean, full_matrices=False)
    return mean.astype(np.float32), (vt[:components] * (sv[:components, None] / np.sqrt(len(F)))).astype(np.float32)


def unit_vectors(n: int, d: int, seed: int, spectrum=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 50_000):  # in chunks: no float64 copy of a 5 GB matrix
        m = min(50_000, n - i)
        if spectrum is None:
            x = rng.standard_normal((m, d), dtype=np.float32)
        else:
            mean, axes = spectrum
            x = mean + rng.standard_normal((m, len(axes)), dtype=np.float32) @ axes
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def median_ms(fn, queries: np.ndarray) -> float:
    fn(queries[0])
    ts = []
    for q in queries[1:]:
        t0 = time.perf_counter()
        fn(q)
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest N to build an HNSW index for")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=51)
    ap.add_argument("--vectors", choices=("real", "random"), default="real")
    ap.add_argument("--ef", default="64,128,256", help="HNSW expansion_search values to search the graph with")
    a = ap.parse_args()

    from imgclf.inference.neighbours import import_usearch
    from imgclf.inference.neighbours import knn as brute_force

    k, rows = 10, []
    spectrum = None
    if a.vectors == "real":
        # In a child process: this one then never runs torch or onnxruntime,
        # whose idle worker threads would be timed along with numpy.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            spectrum = ex.submit(real_spectrum).result()
    Index = import_usearch().Index
    queries = unit_vectors(a.queries, a.dim, 1, spectrum)
    for n in [int(s) for s in a.sizes.split(",")]:
        X = unit_vectors(n, a.dim, 0, spectrum)
        row = {"N": f"{n:,}", "brute force ms": f"{median_ms(lambda q: brute_force(X, q[None], k), queries):.2f}"}
        if n <= a.hnsw_max:
            idx = Index(ndim=a.dim, metric="cos", dtype="f32", connectivity=16, expansion_add=128)
            t0 = time.perf_counter()
            idx.add(np.arange(n), X)
            row["HNSW build s"] = f"{time.perf_counter() - t0:.1f}"
            truth = [set(brute_force(X, q[None], k)[0][0].tolist()) for q in queries]
            for ef in [int(e) for e in a.ef.split(",")]:  # the same graph searched wider: recall for time
                idx.expansion_search = ef
                found = [set(idx.search(q, k).keys.tolist()) for q in queries]
                rows.append({**row, "HNSW expansion_search": ef,
                             "HNSW ms": f"{median_ms(lambda q: idx.search(q, k), queries):.3f}",
                             "HNSW recall@10": f"{np.mean([len(t & f) / k for t, f in zip(truth, found)]):.3f}"})
                print(rows[-1], flush=True)
            del idx
        else:
            rows.append(row)
            print(row, flush=True)
        del X
    print(f"\n{machine()}; {a.vectors} vectors\n")
    print(table(rows, ["N", "brute force ms", "HNSW expansion_search", "HNSW ms", "HNSW recall@10", "HNSW build s"]))


if __name__ == "__main__":
    main()
