"""Benchmark of the distributed training (sae.distributed.fit_distributed).

Generates a synthetic data set at GTZAN scale by default (1,288,000 frames x
96 bins): frames are sparse non-negative combinations of a random dictionary
(8 of 256 atoms per clip of 1288 frames) plus Gaussian noise, generated clip
by clip, with amplitudes that drift slowly in time, so that neighbours in
time are similar, as in music (trained with the thesis's weights, the codes
come out ~20% non-zero, as the thesis's 19.6% with the graph); the kNN
graph is cheap and comes from the generating process (each frame linked to
its K nearest frames in time within its clip), weighted 1 and normalised
(L = I - D^-1/2 W D^-1/2).  X and L go to a Zarr store (L with
sae.store.write_sparse), streamed chunk by chunk, once: a store given by
--store and already written with the same parameters is reused.  It then
trains m atoms for --max-outer outer iterations on a LocalCluster of
single-threaded worker processes, with 1 and
with 2 workers, and prints:

- time per outer iteration (median) and total, per number of workers;
- the 1- vs 2-worker speedup;
- peak resident memory of every process (client, scheduler side, workers), by psutil sampling;
- the share of the machine's measured float32 matmul throughput (single thread x workers) that
  the Z step reaches: Z-step flops = inner iterations x 4 N m n (per FISTA iteration, the
  products y C and x_{k+1} C, each (N, m) x (m, n); the graph and element-wise work not counted).

Run small while developing, e.g.::

    python bench/bench_train.py --n-frames 20000 --n-atoms 64 --max-outer 3

Switches turn the systems mechanisms of the trainer off, one at a time, to
measure what each earns against Dask's own means: ``--no-pool`` (new iterates
from ``np.empty`` instead of the workers' array pool; ``--malloc-env`` gives
the workers glibc's ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_``
instead), ``--no-stealing-pause`` with ``--work-stealing off`` (the cluster's
``distributed.scheduler.work-stealing`` instead of pausing it per training),
``--offload-previous`` against ``--memory-limit`` (Dask spilling block states
to disk).  ``--repeats N`` runs each fit N times on fresh clusters and prints
the medians.

``--lambda-g 0 --fit-method online --z-solver lars`` times the online fit without graph term
(`sae.online`): ``--max-outer`` epochs of mini-batches in this process, reading the store a block
at a time, then the codes of every frame on the workers; e.g. at GTZAN scale::

    python bench/bench_train.py --lambda-g 0 --fit-method online --z-solver lars --max-outer 2 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import dask
import numpy as np
import psutil
import scipy.sparse as sp
import zarr
from distributed import Client, LocalCluster

from _timing import PeakMemory
from flows._dask import LOOPBACK
from sae.config import ModelConfig
from sae.distributed import LaplacianRef, Tuning, fit_distributed
from sae.store import write_sparse


def _clip_frames(seed: int, clip: int, n_frames: int, dictionary: np.ndarray, active: int) -> np.ndarray:
    """The frames of one synthetic clip (before scaling), a pure function of ``(seed, clip)``.

    ``active`` atoms of ``dictionary`` per clip, each with an amplitude that drifts
    slowly in time (a rectified sinusoid of period 50-400 frames and random phase
    and offset), plus Gaussian noise of std 0.05.
    """
    rng = np.random.default_rng([seed, clip])
    atoms = rng.choice(dictionary.shape[0], active, replace=False)
    period = rng.uniform(50, 400, size=(1, active))
    phase = rng.uniform(0, 2 * np.pi, size=(1, active))
    offset = rng.uniform(-0.5, 0.5, size=(1, active))
    time_ = np.arange(n_frames)[:, None]
    amplitude = np.maximum(0.0, np.sin(2 * np.pi * time_ / period + phase) + offset).astype(np.float32)
    noise = 0.05 * rng.standard_normal((n_frames, dictionary.shape[1]), dtype=np.float32)
    return amplitude @ dictionary[atoms] + noise


def _synthetic_chunks(n_frames: int, n_bins: int, clip_frames: int, seed: int, chunk_clips: int):
    """Yield ``(start, frames)`` of consecutive chunks of ``chunk_clips`` clips, unscaled."""
    dictionary = np.random.default_rng(seed).random((256, n_bins), dtype=np.float32)
    chunk_frames = chunk_clips * clip_frames
    for start in range(0, n_frames, chunk_frames):
        stop = min(start + chunk_frames, n_frames)
        clips = range(start // clip_frames, -(-stop // clip_frames))
        yield start, np.vstack([
            _clip_frames(seed, clip, min(clip_frames, stop - clip * clip_frames), dictionary, active=8)
            for clip in clips
        ])


def temporal_laplacian(n_frames: int, clip_frames: int, n_neighbors: int) -> sp.csr_array:
    """Normalised Laplacian of the graph linking each frame to its ``n_neighbors`` nearest frames in time in its clip."""
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
    W = sp.csr_array((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_frames, n_frames))
    degree = np.asarray(W.sum(axis=1)).ravel()
    scale = sp.diags_array(1.0 / np.sqrt(degree))
    return sp.csr_array(sp.eye_array(n_frames, dtype=np.float32) - scale @ W @ scale, dtype=np.float32)


def synthetic(path: str, n_frames: int, n_bins: int, n_neighbors: int, clip_frames: int, seed: int) -> None:
    """Write X (n_frames, n_bins) and its temporal kNN Laplacian to the Zarr group ``path``.

    Streams: a first pass over the clips takes the per-feature minimum and
    maximum, the second regenerates every chunk (clips are pure functions of the
    seed) and writes it min-max scaled to [0, 1], as the thesis's input.  A
    store already written with the same parameters is kept.
    """
    params = {"n_frames": n_frames, "n_bins": n_bins, "n_neighbors": n_neighbors, "clip_frames": clip_frames,
              "seed": seed, "generator": 2}
    try:
        if zarr.open_group(path, mode="r").attrs.get("synthetic") == params:
            return
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        pass
    chunk_clips = max(1, 65536 // clip_frames)
    low = np.full(n_bins, np.inf, dtype=np.float32)
    high = np.full(n_bins, -np.inf, dtype=np.float32)
    for _, frames in _synthetic_chunks(n_frames, n_bins, clip_frames, seed, chunk_clips):
        low, high = np.minimum(low, frames.min(axis=0)), np.maximum(high, frames.max(axis=0))
    group = zarr.open_group(path, mode="w")
    X = group.create_array("X", shape=(n_frames, n_bins), chunks=(min(chunk_clips * clip_frames, n_frames), n_bins),
                           dtype="float32")
    for start, frames in _synthetic_chunks(n_frames, n_bins, clip_frames, seed, chunk_clips):
        X[start:start + len(frames)] = (frames - low) / (high - low)
    write_sparse(group, "laplacian", temporal_laplacian(n_frames, clip_frames, n_neighbors))
    group.attrs["synthetic"] = params


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=1_288_000)
    parser.add_argument("--n-bins", type=int, default=96)
    parser.add_argument("--n-atoms", type=int, default=512)
    parser.add_argument("--max-outer", type=int, default=15)
    parser.add_argument("--max-inner", type=int, default=500)
    parser.add_argument("--inner-rtol", type=float, default=None, help="inner stop (default: rtol, 1e-5)")
    parser.add_argument("--lambda-g", type=float, default=100.0)
    parser.add_argument("--block-size", type=int, default=0, help="frames per block (default: n_frames / 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--store", default=None, help="directory for the synthetic store (default: a temp dir)")
    parser.add_argument("--lookahead", type=int, default=2, help="Z-step iterations submitted ahead (memory!)")
    parser.add_argument("--laplacian-norm", default="power", choices=("power", "bound"))
    parser.add_argument("--offload-previous", action="store_true",
                        help="previous Z-step iterates of dense blocks on the workers' disks (direct I/O)")
    parser.add_argument("--memory-limit", default="auto",
                        help="per worker (e.g. 2.8GB): above 80%% of it Dask spills block states to disk")
    parser.add_argument("--no-pool", action="store_true", help="new iterates from np.empty, not the array pool")
    parser.add_argument("--no-stealing-pause", action="store_true",
                        help="do not pause the scheduler's work stealing during the training")
    parser.add_argument("--work-stealing", default="on", choices=("on", "off"),
                        help="distributed.scheduler.work-stealing of the cluster")
    parser.add_argument("--malloc-env", default="",
                        help="environment of the worker processes, e.g. MALLOC_TRIM_THRESHOLD_=-1,"
                             "MALLOC_MMAP_THRESHOLD_=4294967296 (Dask sets MALLOC_TRIM_THRESHOLD_=65536)")
    parser.add_argument("--z-stop", default=None, choices=("gap", "change"),
                        help="Z-step stopping rule (default: ModelConfig's)")
    parser.add_argument("--order", default="stored", choices=("stored", "cluster"),
                        help="frames into blocks: as stored (the synthetic graph links frames of one clip, so the "
                             "stored order already keeps it inside the blocks) or fit_distributed's k-means order")
    parser.add_argument("--memory-check", default="refuse", choices=("refuse", "warn"),
                        help="fit_distributed's check of the workers' memory before training")
    parser.add_argument("--repeats", type=int, default=1, help="fits per number of workers (medians printed)")
    parser.add_argument("--lambda-z", type=float, default=1.0)
    parser.add_argument("--fit-method", default="alternating", choices=("alternating", "online"),
                        help="'online' (needs --lambda-g 0): --max-outer epochs of mini-batches in this process, "
                             "then the codes of every frame on the workers")
    parser.add_argument("--batch-size", type=int, default=256, help="frames per mini-batch of the online fit")
    parser.add_argument("--z-solver", default=None, choices=("auto", "fista", "cd", "lars"),
                        help="Z-step solver (default: ModelConfig's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    root = args.store or tempfile.mkdtemp(prefix="bench_train_")
    tic = time.perf_counter()
    # in a child process, so that generating the store leaves nothing in this process's memory
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(synthetic, f"{root}/data.zarr", args.n_frames, args.n_bins, 10, 1288, 0).result()
    group = zarr.open_group(f"{root}/data.zarr", mode="r")
    X, laplacian = group["X"], LaplacianRef(group, "laplacian", kind="normalized")
    print(f"synthetic store: {args.n_frames} x {args.n_bins}, nnz(L) = {group['laplacian'].attrs['nnz']}, "
          f"{time.perf_counter() - tic:.1f} s ({root})")
    single = matmul_gflops()
    print(f"float32 GEMM, one thread: {single:.1f} GFLOP/s (median of 5)")
    config = ModelConfig(n_atoms=args.n_atoms, lambda_g=args.lambda_g, lambda_z=args.lambda_z,
                         max_outer=args.max_outer, max_inner=args.max_inner, inner_rtol=args.inner_rtol,
                         random_state=0, fit_method=args.fit_method, batch_size=args.batch_size,
                         **({"z_stop": args.z_stop} if args.z_stop else {}),
                         **({"z_solver": args.z_solver} if args.z_solver else {}))
    if config.lambda_g == 0:
        laplacian = None
    tuning = Tuning(array_pool=not args.no_pool, pause_work_stealing=not args.no_stealing_pause)
    settings = {"distributed.scheduler.work-stealing": args.work_stealing == "on"}
    if args.malloc_env:
        settings["distributed.nanny.pre-spawn-environ"] = {
            **dask.config.get("distributed.nanny.pre-spawn-environ"),
            **dict(item.split("=", 1) for item in args.malloc_env.split(","))}
    dask.config.set(settings)
    print(f"switches: pool {tuning.array_pool}, stealing pause {tuning.pause_work_stealing}, work stealing "
          f"{args.work_stealing}, offload {args.offload_previous}, memory limit {args.memory_limit}, "
          f"worker env {args.malloc_env or '(Dask default)'}, Z stop {config.z_stop}, order {args.order}")
    block_size = args.block_size or -(-args.n_frames // 8)
    m, n, N = args.n_atoms, args.n_bins, args.n_frames
    flops_per_apply = 4 * N * m * n  # per FISTA iteration: y C and x_{k+1} C, each (N, m) x (m, n)
    totals = {}
    if args.memory_limit != "auto":
        # spill block states to disk only near the limit, never kill a worker for its temporaries
        dask.config.set({"distributed.worker.memory.target": 0.8, "distributed.worker.memory.spill": 0.85,
                         "distributed.worker.memory.pause": 0.95, "distributed.worker.memory.terminate": False})
    for n_workers in args.workers:
        runs = []
        for repeat in range(args.repeats):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   memory_limit=args.memory_limit, **LOOPBACK)
            with cluster, Client(cluster) as client, PeakMemory() as memory:
                tic = time.perf_counter()
                fit = fit_distributed(X, config, client=client, laplacian=laplacian, block_size=block_size,
                                      lookahead=args.lookahead, laplacian_norm=args.laplacian_norm,
                                      offload_previous=args.offload_previous, tuning=tuning,
                                      order=args.order, memory_check=args.memory_check,
                                      checkpoint=zarr.open_group(f"{root}/model_{n_workers}.zarr", mode="w"))
                total = time.perf_counter() - tic
            records = fit.history[1:]
            inner = sum(r["inner_codes"] for r in records)
            z_seconds = sum(r["seconds_codes"] for r in records)
            peak = sum(rss for _, rss in memory.peaks.values())
            workers_cpu = sum(cpu for pid, cpu in memory.cpu.items() if pid != psutil.Process().pid)
            runs.append((total, z_seconds, inner, peak, workers_cpu))
            print(f"\n{n_workers} worker(s), run {repeat + 1} of {args.repeats}, {len(records)} outer iterations, "
                  f"blocks of {block_size} frames:")
            print(f"  total {total:.1f} s, median per outer iteration "
                  f"{statistics.median(r['seconds'] for r in records):.2f} s, Z step {z_seconds:.1f} s for {inner} "
                  f"{config.z_step_method} iterations ({1000 * z_seconds / max(inner, 1):.1f} ms each)")
            print(f"  final objective {records[-1]['total']:.6g}, non-zeros {records[-1]['sparsity_percent']:.2f}%")
            if config.z_step_method == "fista" and config.fit_method == "alternating":
                share = inner * flops_per_apply / z_seconds / 1e9 / (single * n_workers)
                print(f"  Z step reaches {100 * share:.1f}% of the measured GEMM throughput "
                      f"({n_workers} x {single:.1f} GFLOP/s)")
            if config.fit_method == "online":
                epochs = [r for r in records if r.get("online")]
                times = ", ".join(f"{r['seconds']:.1f}" for r in epochs)
                objectives = ", ".join(f"{r['total']:.6g}" for r in epochs)
                print(f"  {len(epochs)} epochs in this process: {times} s (objectives {objectives}); codes of "
                      f"every frame on the workers {records[-1]['seconds']:.1f} s")
            for pid, (name, rss) in sorted(memory.peaks.items()):
                print(f"  peak RSS {rss / 2**20:8.1f} MiB  pid {pid} {name}")
            print(f"  sum of the peaks {peak / 2**30:.2f} GiB, CPU time of the other processes {workers_cpu:.1f} s")
        total, z_seconds, inner, peak, workers_cpu = (statistics.median(values) for values in zip(*runs))
        totals[n_workers] = total
        print(f"\n{n_workers} worker(s), median of {len(runs)}: total {total:.1f} s, "
              f"{1000 * z_seconds / max(inner, 1):.1f} ms per {config.z_step_method} iteration, "
              f"sum of the peaks {peak / 2**30:.2f} GiB, CPU time of the other processes {workers_cpu:.1f} s (runs: "
              f"{', '.join(f'{t:.1f} s / {p / 2**30:.2f} GiB / {c:.1f} s CPU' for t, _, _, p, c in runs)})")
    if 1 in totals and 2 in totals:
        print(f"\nspeedup 1 -> 2 workers: {totals[1] / totals[2]:.2f}x")


if __name__ == "__main__":
    main()
