"""Ingestion throughput: clips/s with 1 and 2 Dask worker processes (1 thread each).

Runs the body of the flow's batch task (`sae.audio.process_batch`) on a
LocalCluster over the built-in dataset (30 s clips), the clip table written by
the client after each batch, as the flow does; Prefect's own per-task
overhead (~75-130 ms per batch task with a DaskTaskRunner) is not included.
Prints medians of a few repeats, the parallel efficiency of 2 workers vs 1 and
peak RSS.

    python bench/bench_ingest.py [--clips 40] [--repeats 3] [--chunk-clips 4]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster, as_completed

from flows._dask import LOOPBACK
from sae import store
from sae.audio import process_batch, warm_up
from sae.config import BuiltinDatasetConfig, CQTConfig
from sae.datasets import make_builtin_dataset


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_once(client: Client, clips: list, cqt: CQTConfig, chunk_clips: int, workdir: Path) -> float:
    path = workdir / f"bench-{time.monotonic_ns()}.zarr"
    group = store.create_store(path, cqt, clips, chunk_clips)
    start = time.perf_counter()
    futures = [client.submit(process_batch, str(path), chunk, todo, pure=False)
               for chunk, todo in store.pending_batches(group)]
    for future in as_completed(futures):
        store.update_clips(group, future.result())
    elapsed = time.perf_counter() - start
    assert len(store.ok_clips(group)) == len(clips)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-clips", type=int, default=4)
    args = parser.parse_args()
    cqt = CQTConfig()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        config = BuiltinDatasetConfig(n_genres=5, clips_per_genre=-(-args.clips // 5))
        clips = make_builtin_dataset(workdir / "data", config)[: args.clips]
        print(f"built-in dataset: {len(clips)} clips of {config.duration:.0f} s in {time.perf_counter() - start:.1f} s")
        rates = {}
        for n_workers in (1, 2):
            with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                              host="127.0.0.1", **LOOPBACK) as cluster, Client(cluster) as client:
                client.run(warm_up, cqt)
                run_once(client, clips[: 2 * args.chunk_clips * n_workers], cqt, args.chunk_clips, workdir)  # warm
                times = [run_once(client, clips, cqt, args.chunk_clips, workdir) for _ in range(args.repeats)]
                worker_rss = max(client.run(peak_rss_mb).values())
            rates[n_workers] = len(clips) / statistics.median(times)
            print(f"{n_workers} worker(s): median {statistics.median(times):.2f} s "
                  f"(runs {', '.join(f'{t:.2f}' for t in times)}), {rates[n_workers]:.2f} clips/s, "
                  f"peak worker RSS {worker_rss:.0f} MB")
        print(f"parallel efficiency, 2 workers vs 1: {rates[2] / (2 * rates[1]):.0%}")
        print(f"peak RSS of the client process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
