"""A trained model on new music: time to classify one 30 s clip (cold and warm) and batch throughput.

For models with m = 128 and m = 512 atoms, trained by ``sae run`` on the built-in dataset (5 genres x
--train-clips clips of 30 s, all 1288 frames per clip, lambda_g = 100, lambda_e = 10, --max-outer outer
iterations) and exported by it, prints for every encoding method (encoder, exact, exact_graph):

- cold: wall time of ``sae predict --model M clip.wav`` in a fresh process (imports, model check and
  load, CQT, encoding, classification), median of --cold-repeats;
- warm: one clip in a process that has classified one before (`sae.inference.predict_files`), median of
  --repeats, with the CQT's share (`sae.audio.clip_frames`);
- batch: clips per second for --batch held-out clips (another seed of the generator) on 1 and 2 Dask
  worker processes (1 thread each, single-threaded BLAS and numba), tasks of --chunk-clips clips, the
  model loaded once per worker (`sae.artifact.cached_model`); Prefect's per-task overhead and the writes
  of `sae encode` are not included;
- accuracy: the share of those held-out clips whose predicted label is their genre.

    python bench/bench_predict.py                                  # 40 training clips, 200 held-out
    python bench/bench_predict.py --train-clips 4 --batch 20 --repeats 2 --cold-repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
from _timing import timed
from distributed import Client, LocalCluster

from flows._dask import LOOPBACK
from sae.artifact import cached_model, load_model
from sae.audio import clip_frames
from sae.config import BuiltinDatasetConfig
from sae.datasets import make_builtin_dataset
from sae.inference import predict_files

SINGLE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                        "NUMBA_NUM_THREADS")}
SAE = str(Path(sys.executable).with_name("sae"))


def train(store: Path, n_atoms: int, clips_per_genre: int, max_outer: int) -> str:
    """``sae run`` on the built-in dataset; returns the model folder the pipeline exported."""
    settings = {
        "ingest.dataset.clips_per_genre": clips_per_genre, "ingest.dataset.duration": 30,
        "ingest.cqt.clip_samples": 660000, "preprocess.frames_per_clip": "null", "train.model.n_atoms": n_atoms,
        "train.model.lambda_e": 10, "train.model.max_outer": max_outer, "train.model.max_inner": 100,
        "classify.n_repeats": 1, "cluster": "local",
    }
    argv = [SAE, "run", "--store", str(store), "--json"]
    for name, value in settings.items():
        argv += ["--set", f"{name}={value}"]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    print(f"m = {n_atoms}: sae run in {time.perf_counter() - start:.0f} s; "
          + ", ".join(f"{name} {100 * row['accuracy_mean']:.1f} %" for name, row in summary["results"].items()))
    return summary["model"]


def classify_chunk(model: str, paths: list[str], method: str) -> list[str | None]:
    records = predict_files(cached_model(model), paths, method=method)
    return [record.get("label") for record in records]


def batch(model: str, paths: list[str], method: str, n_workers: int, chunk: int) -> tuple[float, list]:
    """Clips per second on ``n_workers`` single-threaded worker processes, and the predicted labels."""
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      env=SINGLE_THREAD, **LOOPBACK) as cluster, Client(cluster) as client:
        client.run(classify_chunk, model, paths[:1], method)  # load the model and compile, on every worker
        start = time.perf_counter()
        futures = [client.submit(classify_chunk, model, paths[i : i + chunk], method, pure=False)
                   for i in range(0, len(paths), chunk)]
        labels = [label for part in client.gather(futures) for label in part]
        return len(paths) / (time.perf_counter() - start), labels


def cold(model: str, path: str, method: str, repeats: int) -> float:
    def run() -> None:
        subprocess.run([SAE, "predict", "--model", model, "--method", method, path], capture_output=True, check=True)

    return timed(run, repeats)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-clips", type=int, default=8, help="training clips per genre (5 genres)")
    parser.add_argument("--batch", type=int, default=200, help="held-out clips (5 genres)")
    parser.add_argument("--max-outer", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="warm single-clip repeats")
    parser.add_argument("--cold-repeats", type=int, default=2)
    parser.add_argument("--chunk-clips", type=int, default=10)
    parser.add_argument("--atoms", default="128,512")
    parser.add_argument("--workdir", default=None, help="keep the stores and clips here (default: a temporary folder)")
    parser.add_argument("--malloc-env", default="",
                        help="glibc settings of the batch workers, e.g. deploy/cluster.py's "
                             "MALLOC_TRIM_THRESHOLD_=65536,MALLOC_MMAP_THRESHOLD_=33554432 (default: Dask's, "
                             "MALLOC_TRIM_THRESHOLD_=65536 only)")
    args = parser.parse_args()
    if args.malloc_env:  # set before the worker processes start: distributed.nanny.pre-spawn-environ
        dask.config.set({"distributed.nanny.pre-spawn-environ": {
            **dask.config.get("distributed.nanny.pre-spawn-environ"),
            **dict(item.split("=", 1) for item in args.malloc_env.split(","))}})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        held_out = make_builtin_dataset(workdir / "held-out", BuiltinDatasetConfig(
            n_genres=5, clips_per_genre=-(-args.batch // 5), duration=30.0, seed=1))[: args.batch]
        paths, truth = [c[1] for c in held_out], [c[2] for c in held_out]
        print(f"held-out: {len(paths)} clips of 30 s (seed 1); machine: {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f} at the start; batch workers' environment: "
              f"{args.malloc_env or 'Dask default'}")
        rows = []
        for n_atoms in (int(m) for m in args.atoms.split(",")):
            folder = train(workdir / "train.zarr", n_atoms, args.train_clips, args.max_outer)
            model = load_model(folder)
            clip_frames(paths[0], model.cqt)  # compile librosa's kernels first
            cqt_seconds, _ = timed(lambda: clip_frames(paths[0], model.cqt), args.repeats)
            for method in model.methods:
                predict_files(model, paths[:1], method=method)  # warm
                warm, _ = timed(lambda: predict_files(model, paths[1:2], method=method), args.repeats)
                rates, labels = {}, None
                for n_workers in (1, 2):
                    rates[n_workers], found = batch(folder, paths, method, n_workers, args.chunk_clips)
                    labels = labels or found
                accuracy = float(np.mean([a == b for a, b in zip(labels, truth)]))
                row = {"m": n_atoms, "method": method, "cold": cold(folder, paths[2], method, args.cold_repeats),
                       "warm": warm, "cqt": cqt_seconds, "rate1": rates[1], "rate2": rates[2], "accuracy": accuracy}
                rows.append(row)
                print(f"m = {n_atoms:4d} {method:12s} cold {row['cold']:5.2f} s | warm {warm:6.3f} s (CQT "
                      f"{1000 * cqt_seconds:4.0f} ms) | 1 worker {rates[1]:5.2f} clips/s, 2 workers {rates[2]:5.2f} "
                      f"clips/s ({rates[2] / (2 * rates[1]):.0%} efficiency) | accuracy {100 * accuracy:.1f} %",
                      flush=True)
        print("\n| m | method | cold (s) | warm (s) | CQT (ms) | clips/s, 1 worker | clips/s, 2 workers | accuracy (%) |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['m']} | {row['method']} | {row['cold']:.2f} | {row['warm']:.3f} | {1000 * row['cqt']:.0f} | "
                  f"{row['rate1']:.2f} | {row['rate2']:.2f} | {100 * row['accuracy']:.1f} |")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
