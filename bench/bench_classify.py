"""Benchmark of the classification stage: aggregation and cross-validation, serial vs Dask.

Prints medians over --repeats runs of
- the aggregation of per-frame features into window vectors (`sae.pooling.aggregate_clips`)
  from numpy and from a chunked Zarr array (streamed by clip chunks), against a one-shot
  reshape of the whole array in memory (the thesis's way) as the peer;
- the cross-validation (grouped protocol, SVC) serially and on a local Dask cluster of
  --workers processes (one task per split), with the ratio;
and the peak RSS of the process.

    python bench/bench_classify.py                         # 500 clips x 298 frames, d = 128
    python bench/bench_classify.py --clips 200 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import resource
import tempfile

import numpy as np
import zarr
from _timing import timed

from flows._dask import LOOPBACK
from sae.classify import cross_validate
from sae.config import ClassifyConfig
from sae.pooling import aggregate_clips


def make_data(n_clips: int, n_frames: int, n_features: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    patterns = rng.random((n_classes, n_features))
    labels = np.arange(n_clips) % n_classes
    frames = np.abs(patterns[np.repeat(labels, n_frames)] + rng.normal(0, 1.5, (n_clips * n_frames, n_features)))
    return frames.astype(np.float32), np.repeat(np.arange(n_clips), n_frames), labels


def reshape_peer(frames: np.ndarray, n_clips: int, n_windows: int = 6) -> np.ndarray:
    """The whole-array reshape of the original (all frames in memory at once)."""
    n_frames = frames.shape[0] // n_clips
    w = int(np.floor(n_frames / (n_windows + 0.5)))
    X = np.abs(frames.reshape(n_clips, n_frames, -1).astype(np.float64))
    aligned = X[:, : n_windows * w].reshape(n_clips, n_windows, w, -1).sum(axis=2)
    shifted = X[:, w // 2 : w // 2 + n_windows * w].reshape(n_clips, n_windows, w, -1).sum(axis=2)
    return np.stack([aligned, shifted], axis=2).reshape(n_clips * 2 * n_windows, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=500)
    parser.add_argument("--frames", type=int, default=298)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cv-repeats", type=int, default=2, help="repetitions of 10-fold CV")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    frames, row_clips, labels = make_data(args.clips, args.frames, args.features, args.classes, 0)
    print(f"data: {args.clips} clips x {args.frames} frames x {args.features} features "
          f"({frames.nbytes / 1e6:.0f} MB float32)")

    t_peer, reference = timed(lambda: reshape_peer(frames, args.clips), args.repeats)
    t_numpy, features = timed(lambda: aggregate_clips(frames, row_clips, clip_labels=labels), args.repeats)
    assert np.allclose(features.vectors, reference)
    with tempfile.TemporaryDirectory() as root:
        array = zarr.create_array(f"{root}/x.zarr", shape=frames.shape, chunks=(64 * args.frames, args.features),
                                  dtype=frames.dtype)
        array[:] = frames
        t_zarr, _ = timed(lambda: aggregate_clips(array, row_clips, clip_labels=labels), args.repeats)
    print(f"aggregation: reshape peer {t_peer:.3f} s | ours numpy {t_numpy:.3f} s "
          f"({t_numpy / t_peer:.2f}x peer) | ours zarr, streamed {t_zarr:.3f} s ({t_zarr / t_peer:.2f}x peer)")

    config = ClassifyConfig(n_repeats=args.cv_repeats)
    t_serial, serial = timed(lambda: cross_validate(features, config), 1)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1",
                      **LOOPBACK) as cluster, Client(cluster) as client:
        cross_validate(features, ClassifyConfig(n_repeats=1, n_splits=2), client=client)  # warm the workers
        t_dask, parallel = timed(lambda: cross_validate(features, config, client=client), 1)
    assert parallel == serial
    n = len(serial["scores"])
    print(f"cross-validation ({n} splits, {features.vectors.shape[0]} vectors): serial {t_serial:.2f} s | "
          f"dask {args.workers} workers {t_dask:.2f} s (speed-up {t_serial / t_dask:.2f}x); "
          f"accuracy {100 * serial['accuracy_mean']:.1f} ± {100 * serial['accuracy_std']:.1f} %")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
