"""Benchmark of the distributed training (sae.distributed.fit_distributed).

Generates a synthetic data set at GTZAN scale by default (1,288,000 frames x
96 bins): frames are sparse non-negative combinations of a random dictionary
plus Gaussian noise, generated in "clips" of consecutive frames whose codes
drift slowly; the kNN graph is cheap and comes from the generating process
(each frame linked to its K nearest frames in time within its clip), weighted
1 and normalised (L = I - D^-1/2 W D^-1/2).  X and L go to a Zarr store
(L with sae.store.write_sparse).  It then trains m atoms for --max-outer outer
iterations on a LocalCluster of single-threaded worker processes, with 1 and
with 2 workers, and prints:

- time per outer iteration (median) and total, per number of workers;
- the 1- vs 2-worker speedup;
- peak resident memory of every process (client, scheduler side, workers), by psutil sampling;
- the share of the machine's measured float32 matmul throughput (single thread x workers) that
  the Z step reaches: Z-step flops = inner iterations x 4 N m n (per FISTA iteration, the
  products y C and x_{k+1} C, each (N, m) x (m, n); the graph and element-wise work not counted).

Run small while developing, e.g.::

    python bench/bench_train.py --n-frames 20000 --n-atoms 64 --max-outer 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import numpy as np
import psutil
import scipy.sparse as sp
import zarr
from distributed import Client, LocalCluster

from sae.config import ModelConfig
from sae.distributed import LaplacianRef, fit_distributed
from sae.store import write_sparse


def synthetic(path: str, n_frames: int, n_bins: int, n_neighbors: int, clip_frames: int, seed: int) -> tuple:
    """Write X (n_frames, n_bins) and its temporal kNN Laplacian to a Zarr group; return (X array, LaplacianRef)."""
    rng = np.random.default_rng(seed)
    n_true = 256
    dictionary = rng.random((n_true, n_bins), dtype=np.float32)
    group = zarr.open_group(path, mode="w")
    values = np.empty((n_frames, n_bins), dtype=np.float32)
    step = 65536
    for start in range(0, n_frames, step):
        stop = min(start + step, n_frames)
        rows = stop - start
        codes = rng.random((rows, n_true), dtype=np.float32) * (rng.random((rows, n_true)) < 0.03)
        values[start:stop] = codes @ dictionary + 0.05 * rng.standard_normal((rows, n_bins), dtype=np.float32)
    low, high = values.min(axis=0), values.max(axis=0)
    values -= low
    values /= high - low  # per-feature min-max scaling to [0, 1], as the thesis's input
    X = group.create_array("X", shape=(n_frames, n_bins), chunks=(min(step, n_frames), n_bins), dtype="float32")
    X[:] = values
    del values
    # graph: neighbours in time within a clip (the generating process), K nearest, symmetric
    index = np.arange(n_frames)
    clip_start = (index // clip_frames) * clip_frames
    clip_stop = np.minimum(clip_start + clip_frames, n_frames)
    rows_list, cols_list = [], []
    for offset in range(1, n_neighbors // 2 + 1):
        for sign in (-1, 1):
            other = index + sign * offset
            ok = (other >= clip_start) & (other < clip_stop)
            rows_list.append(index[ok])
            cols_list.append(other[ok])
    rows = np.concatenate(rows_list)
    cols = np.concatenate(cols_list)
    W = sp.csr_array((np.ones(rows.size, dtype=np.float64), (rows, cols)), shape=(n_frames, n_frames))
    degree = np.asarray(W.sum(axis=1)).ravel()
    scale = sp.diags_array(1.0 / np.sqrt(degree))
    L = sp.csr_array(sp.eye_array(n_frames) - scale @ W @ scale)
    write_sparse(group, "laplacian", L)
    return X, LaplacianRef(group, "laplacian")


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured single-thread float32 GEMM throughput (median), in GFLOP/s."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    times = []
    with threadpool_limits(1):
        a @ b
        for _ in range(repeats):
            tic = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times) / 1e9


class PeakMemory:
    """Samples the resident memory of this process and its children every 0.2 s; keeps the peak per pid."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for process in [me] + me.children(recursive=True):
                try:
                    rss = process.memory_info().rss
                    name = "client" if process.pid == me.pid else " ".join(process.cmdline()[-2:])[:40]
                except psutil.Error:
                    continue
                if rss > self.peaks.get(process.pid, ("", 0))[1]:
                    self.peaks[process.pid] = (name, rss)
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=1_288_000)
    parser.add_argument("--n-bins", type=int, default=96)
    parser.add_argument("--n-atoms", type=int, default=512)
    parser.add_argument("--max-outer", type=int, default=15)
    parser.add_argument("--max-inner", type=int, default=500)
    parser.add_argument("--lambda-g", type=float, default=100.0)
    parser.add_argument("--block-size", type=int, default=0, help="frames per block (default: n_frames / 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--store", default=None, help="directory for the synthetic store (default: a temp dir)")
    parser.add_argument("--lookahead", type=int, default=2, help="Z-step iterations submitted ahead (memory!)")
    parser.add_argument("--laplacian-norm", default="power", choices=("power", "bound"))
    args = parser.parse_args()

    root = args.store or tempfile.mkdtemp(prefix="bench_train_")
    tic = time.perf_counter()
    X, laplacian = synthetic(f"{root}/data.zarr", args.n_frames, args.n_bins, 10, 1288, seed=0)
    print(f"synthetic store: {args.n_frames} x {args.n_bins}, nnz(L) = {laplacian.group['laplacian'].attrs['nnz']}, "
          f"{time.perf_counter() - tic:.1f} s ({root})")
    single = matmul_gflops()
    print(f"float32 GEMM, one thread: {single:.1f} GFLOP/s (median of 5)")
    config = ModelConfig(n_atoms=args.n_atoms, lambda_g=args.lambda_g, max_outer=args.max_outer,
                         max_inner=args.max_inner, random_state=0)
    block_size = args.block_size or -(-args.n_frames // 8)
    m, n, N = args.n_atoms, args.n_bins, args.n_frames
    flops_per_apply = 4 * N * m * n  # per FISTA iteration: y C and x_{k+1} C, each (N, m) x (m, n)
    totals = {}
    for n_workers in args.workers:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client, PeakMemory() as memory:
            tic = time.perf_counter()
            fit = fit_distributed(X, config, client=client, laplacian=laplacian, block_size=block_size,
                                  lookahead=args.lookahead, laplacian_norm=args.laplacian_norm,
                                  checkpoint=zarr.open_group(f"{root}/model_{n_workers}.zarr", mode="w"))
            total = time.perf_counter() - tic
        records = fit.history[1:]
        per_outer = statistics.median(r["seconds"] for r in records)
        inner = sum(r["inner_codes"] for r in records)
        z_seconds = sum(r["seconds_codes"] for r in records)
        share = inner * flops_per_apply / z_seconds / 1e9 / (single * n_workers)
        totals[n_workers] = total
        print(f"\n{n_workers} worker(s), {len(records)} outer iterations, blocks of {block_size} frames:")
        print(f"  total {total:.1f} s, median per outer iteration {per_outer:.2f} s, "
              f"Z step {z_seconds:.1f} s for {inner} FISTA iterations ({1000 * z_seconds / max(inner, 1):.1f} ms each)")
        print(f"  final objective {records[-1]['total']:.6g}, non-zeros {records[-1]['sparsity_percent']:.2f}%")
        print(f"  Z step reaches {100 * share:.1f}% of the measured GEMM throughput ({n_workers} x {single:.1f} GFLOP/s)")
        for pid, (name, rss) in sorted(memory.peaks.items()):
            print(f"  peak RSS {rss / 2**20:8.1f} MiB  pid {pid} {name}")
        print(f"  sum of the peaks {sum(rss for _, rss in memory.peaks.values()) / 2**30:.2f} GiB")
    if 1 in totals and 2 in totals:
        print(f"\nspeedup 1 -> 2 workers: {totals[1] / totals[2]:.2f}x")


if __name__ == "__main__":
    main()
