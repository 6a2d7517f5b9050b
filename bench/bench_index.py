"""Nearest-neighbour search: numpy brute force vs an HNSW index (usearch).

  .venv/bin/python bench/bench_index.py [--sizes 1000,10000,100000,1000000] [--hnsw-max 100000]

Unit vectors of dimension 1280 (EfficientNet-Lite0's pooled features),
cosine similarity, k = 10, one query at a time (what `imgclf similar` and
/v1/similar do). Vectors are random Gaussian, the hardest case for an
approximate index (no clusters to exploit); recall@10 is measured against
the brute-force answer. Brute force is `imgclf.inference.similar.brute_force`
itself, float32 matrix-vector product + argpartition. HNSW (usearch, M=16,
expansion_add=128, expansion_search=64) is built with all cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import machine, table


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 50_000):  # in chunks: no float64 copy of a 5 GB matrix
        x = rng.standard_normal((min(50_000, n - i), d), dtype=np.float32)
        out[i:i + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
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
    a = ap.parse_args()

    from usearch.index import Index

    from imgclf.inference.similar import brute_force

    k, rows = 10, []
    queries = unit_vectors(a.queries, a.dim, seed=1)
    for n in [int(s) for s in a.sizes.split(",")]:
        X = unit_vectors(n, a.dim, seed=0)
        row = {"N": f"{n:,}", "brute force ms": f"{median_ms(lambda q: brute_force(X, q[None], k), queries):.2f}"}
        if n <= a.hnsw_max:
            idx = Index(ndim=a.dim, metric="cos", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)
            t0 = time.perf_counter()
            idx.add(np.arange(n), X)
            row["HNSW build s"] = f"{time.perf_counter() - t0:.1f}"
            row["HNSW ms"] = f"{median_ms(lambda q: idx.search(q, k), queries):.3f}"
            truth = [set(brute_force(X, q[None], k)[0][0].tolist()) for q in queries]
            found = [set(idx.search(q, k).keys.tolist()) for q in queries]
            row["HNSW recall@10"] = f"{np.mean([len(t & f) / k for t, f in zip(truth, found)]):.3f}"
            del idx
        rows.append(row)
        print(row, flush=True)
        del X
    print(f"\n{machine()}\n")
    print(table(rows, ["N", "brute force ms", "HNSW ms", "HNSW recall@10", "HNSW build s"]))


if __name__ == "__main__":
    main()
