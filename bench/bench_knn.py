"""Blocked pynndescent kNN vs scikit-learn exact brute force, on CQT-like synthetic frames.

For each N: exact kNN with ``sklearn.neighbors.NearestNeighbors(algorithm="brute")``
(in this process, 1 repeat), then `sae.knn.approximate_neighbors` on a
LocalCluster of 1 and of 2 worker processes (1 thread each; pynndescent
compiled on every worker before timing, see `sae.knn.warm_up`), with recall@10
on 2000 seeded queries against the exact result.  Prints medians of the
repeats, the speed-up over exact, and the peak resident memory of this process
plus its children (the workers) during each measurement.

    python bench/bench_knn.py                    # N = 100,000 and 200,000
    python bench/bench_knn.py --sizes 20000 --repeats 1
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import psutil
from distributed import Client, LocalCluster
from sklearn.neighbors import NearestNeighbors

from flows._dask import LOOPBACK
from sae.knn import approximate_neighbors, recall_at_k, warm_up


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block-size", type=int, default=50_000)
    parser.add_argument("--n-neighbors-build", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    k = 10
    for n in args.sizes:
        X = cqt_like(n)
        with PeakMemory() as mem:
            start = time.perf_counter()
            exact_d, exact_i = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X).kneighbors()
            exact_s = time.perf_counter() - start
        print(f"N={n}: sklearn brute exact {exact_s:.1f} s, peak {mem.peak / 2**30:.2f} GiB", flush=True)
        sample = np.sort(np.random.default_rng(1).choice(n, size=min(args.queries, n), replace=False))
        for n_workers in args.workers:
            with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              memory_limit=None, **LOOPBACK) as cluster, Client(cluster) as client:
                start = time.perf_counter()
                client.run(warm_up)
                compile_s = time.perf_counter() - start
                times, recalls, peaks = [], [], []
                for _ in range(args.repeats):
                    with PeakMemory() as mem:
                        start = time.perf_counter()
                        indices, distances = approximate_neighbors(
                            X, k, block_size=args.block_size, n_neighbors_build=args.n_neighbors_build, random_state=0
                        )
                        times.append(time.perf_counter() - start)
                    peaks.append(mem.peak)
                    recalls.append(recall_at_k(indices[sample], exact_i[sample],
                                               found_distances=distances[sample], true_distances=exact_d[sample]))
            median = float(np.median(times))
            print(
                f"N={n}: blocked pynndescent, {n_workers} worker(s), block {args.block_size}, build K "
                f"{args.n_neighbors_build}: median {median:.1f} s of {len(times)} ({', '.join(f'{t:.1f}' for t in times)}), "
                f"recall@{k} {np.median(recalls):.4f} on {len(sample)} queries, {exact_s / median:.1f}x faster than exact, "
                f"peak {max(peaks) / 2**30:.2f} GiB (compile on workers {compile_s:.0f} s, untimed)",
                flush=True,
            )


if __name__ == "__main__":
    main()
