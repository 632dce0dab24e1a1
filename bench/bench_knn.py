"""kNN graph build: ours (blocked pynndescent, blocked exact, the faiss method) against faiss, in one run.

On CQT-like synthetic frames (N x 96, float32), for each N of --sizes:

- ``sae exact (blocked)``: `sae.knn.exact_neighbors` on a LocalCluster of 2
  single-threaded worker processes (N <= --exact-max only: its cost grows as N^2);
- ``sae approximate (blocked pynndescent)``: `sae.knn.approximate_neighbors`,
  same cluster (pynndescent compiled on every worker before timing, untimed);
- ``sae exact (local threads, ...)``: the same on Dask's threaded scheduler
  (what ``sae run`` without a cluster runs), BLAS on every core against one
  thread per tile (`sae.blas.one_blas_thread`, what the graph stage sets when
  it runs several tiles);
- ``sae faiss (graph.method=faiss)``: `sae.knn.faiss_neighbors` in this
  process (all cores), self removed, ties by index;
- peers, raw faiss in this process with all cores: ``faiss HNSW``
  (``IndexHNSWFlat`` with the same M / efConstruction / efSearch as our
  faiss method, search of K + 1) and ``faiss exact`` (``IndexFlatL2``,
  search of K + 1).

Every row: median wall time of --repeats, recall@10 on 2000 seeded queries
against their exact neighbours (`sae.knn.exact_neighbors_of`, float64;
tie-aware, self excluded by index), peak resident
memory of this process plus its children (the workers) during the runs, and
the time relative to faiss HNSW.

    python bench/bench_knn.py                           # N = 50,000 and 200,000, 3 repeats
    python bench/bench_knn.py --sizes 20000 --repeats 1
    python bench/bench_knn.py --exact-max 200000        # the exact rows at 200k too (tens of minutes)
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import nullcontext

import dask
import numpy as np
import psutil
from distributed import Client, LocalCluster

from flows._dask import LOOPBACK
from sae.blas import one_blas_thread
from sae.knn import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    approximate_neighbors,
    exact_neighbors,
    exact_neighbors_of,
    faiss_neighbors,
    faiss_threads,
    recall_at_k,
    warm_up,
)


def cqt_like(n: int, n_bins: int = 96, rank: int = 12, n_clusters: int = 60, seed: int = 0) -> np.ndarray:
    """Non-negative low-rank + noise frames, min-max scaled to [0, 1] per bin, float32."""
    rng = np.random.default_rng(seed)
    centers = rng.gamma(2.0, 1.0, size=(n_clusters, rank))
    latent = centers[rng.integers(0, n_clusters, n)] * rng.gamma(4.0, 0.25, size=(n, 1))
    latent += 0.2 * rng.standard_normal((n, rank))
    basis = np.abs(rng.standard_normal((rank, n_bins))) * np.exp(-np.arange(n_bins) / 48)
    X = np.abs(latent @ basis + 0.05 * rng.standard_normal((n, n_bins)))
    X = (X - X.min(0)) / (X.max(0) - X.min(0))
    return X.astype(np.float32)


class PeakMemory:
    """Peak RSS (bytes) of this process and its children while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def without_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's K + 1 results of every frame searched against all frames: self removed by index, else the last."""
    own = indices == np.arange(len(indices))[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return indices[keep].reshape(len(indices), k), np.sqrt(np.maximum(distances[keep], 0)).reshape(len(indices), k)


def faiss_hnsw(X: np.ndarray, k: int, m: int, ef_construction: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(X.shape[1], m)
    index.hnsw.efConstruction = ef_construction
    index.add(X)
    index.hnsw.efSearch = max(ef_search, k + 1)
    distances, indices = index.search(X, k + 1)
    return without_self(indices.astype(np.int64), distances, k)


def faiss_flat(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    distances, indices = index.search(X, k + 1)
    return without_self(indices.astype(np.int64), distances, k)


def measure(run, repeats: int) -> tuple[list[float], int, tuple[np.ndarray, np.ndarray]]:
    """Wall times of ``repeats`` calls, the peak memory over them, the last result."""
    times, result = [], None
    with PeakMemory() as mem:
        for _ in range(repeats):
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
    return times, mem.peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each) of our blocked methods")
    parser.add_argument("--block-size", type=int, default=50_000)
    parser.add_argument("--exact-block-size", type=int, default=4096)
    parser.add_argument("--n-neighbors-build", type=int, default=30)
    parser.add_argument("--hnsw-m", type=int, default=HNSW_M)
    parser.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    parser.add_argument("--ef-search", type=int, default=HNSW_EF_SEARCH)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-max", type=int, default=50_000, help="largest N of the two exact rows")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    k = 10
    print(f"{psutil.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in psutil.getloadavg())}; "
          f"faiss threads {faiss_threads(None)}; HNSW M={args.hnsw_m}, efConstruction={args.ef_construction}, "
          f"efSearch={args.ef_search}", flush=True)
    for n in args.sizes:
        X = cqt_like(n)
        sample = np.sort(np.random.default_rng(1).choice(n, size=min(args.queries, n), replace=False))
        rows = []
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          memory_limit=None, **LOOPBACK) as cluster, Client(cluster) as client:
            start = time.perf_counter()
            client.run(warm_up)
            compile_s = time.perf_counter() - start
            if n <= args.exact_max:
                rows.append(("sae exact (blocked)", *measure(
                    lambda: exact_neighbors(X, k, block_size=args.exact_block_size), args.repeats)))
            rows.append((f"sae approximate (blocked pynndescent, build K {args.n_neighbors_build})", *measure(
                lambda: approximate_neighbors(X, k, block_size=args.block_size,
                                              n_neighbors_build=args.n_neighbors_build, random_state=0),
                args.repeats)))
        if n <= args.exact_max:  # what `sae run` without a cluster runs: the tiles on Dask's local threads
            for name, blas in (("BLAS on every core", nullcontext), ("BLAS on one thread", one_blas_thread)):
                with dask.config.set(scheduler="threads"), blas():
                    rows.append((f"sae exact (local threads, {name})", *measure(
                        lambda: exact_neighbors(X, k, block_size=args.exact_block_size), args.repeats)))
        rows.append(("sae faiss (graph.method=faiss)", *measure(
            lambda: faiss_neighbors(X, k, block_size=args.block_size, hnsw_m=args.hnsw_m,
                                    ef_construction=args.ef_construction, ef_search=args.ef_search), args.repeats)))
        rows.append(("faiss HNSW (IndexHNSWFlat)", *measure(
            lambda: faiss_hnsw(X, k, args.hnsw_m, args.ef_construction, args.ef_search), args.repeats)))
        if n <= args.exact_max:
            rows.append(("faiss exact (IndexFlatL2)", *measure(lambda: faiss_flat(X, k), args.repeats)))
        true_i, true_d = exact_neighbors_of(X, sample, k, block_size=args.exact_block_size)
        hnsw_s = float(np.median(next(times for name, times, _, _ in rows if name.startswith("faiss HNSW"))))
        print(f"\nN={n} x {X.shape[1]}, K={k}, recall@{k} on {len(sample)} queries against exact search; "
              f"pynndescent compile on the workers {compile_s:.0f} s (untimed)")
        print(f"  {'method':<58} {'median s':>9} {'recall':>7} {'peak GiB':>9} {'/ faiss HNSW':>13}  runs")
        for name, times, peak, (indices, distances) in rows:
            recall = recall_at_k(indices[sample], true_i, found_distances=distances[sample], true_distances=true_d)
            median = float(np.median(times))
            print(f"  {name:<58} {median:9.1f} {recall:7.4f} {peak / 2**30:9.2f} {median / hnsw_s:12.2f}x  "
                  f"({', '.join(f'{t:.1f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
