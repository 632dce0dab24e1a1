"""Tests of sae.pooling: windows of a clip, pooling statistics, aggregation of any array by chunks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from sae.config import ClassifyConfig
from sae.pooling import aggregate_clips, clip_runs, pool_windows, window_length, window_starts


def test_aggregation_equals_hand_computed_example():
    # One clip of 13 frames, values 1..13 in column 0 and -(1..13) in column 1.
    # n_windows = 2: w = floor(13 / 2.5) = 5; aligned windows [0:5], [5:10];
    # shifted by floor(5/2) = 2: [2:7], [7:12]; frame 12 (value 13) is dropped.
    # Sums of |x|: 1+..+5 = 15, 3+..+7 = 25, 6+..+10 = 40, 8+..+12 = 50.
    values = np.arange(1.0, 14.0)
    X = np.stack([values, -values], axis=1)
    features = aggregate_clips(X, np.full(13, 7), clip_labels=np.arange(10), n_windows=2)
    assert features.vectors.tolist() == [[15, 15], [25, 25], [40, 40], [50, 50]]
    assert features.groups.tolist() == [7, 7, 7, 7]
    assert features.labels.tolist() == [7, 7, 7, 7]
    assert features.vectors_per_clip == 4
    # Plain sums are signed; without the shifted set only the aligned windows.
    signed = aggregate_clips(X, np.zeros(13, dtype=int), n_windows=2, pooling=("sum",)).vectors
    assert signed[:, 1].tolist() == [-15, -25, -40, -50]
    aligned = aggregate_clips(X, np.zeros(13, dtype=int), n_windows=2, shifted=False).vectors
    assert aligned[:, 0].tolist() == [15, 40]


@pytest.mark.parametrize("shifted", [True, False])
def test_every_pooling_statistic_equals_a_direct_computation(rng, shifted):
    X = rng.normal(size=(3, 41, 4))
    pooling = ("sum_abs", "sum", "mean", "mean_abs", "std", "max", "max_abs", "mean_pos", "mean_neg")
    direct = {
        "sum_abs": lambda w: np.abs(w).sum(0), "sum": lambda w: w.sum(0), "mean": lambda w: w.mean(0),
        "mean_abs": lambda w: np.abs(w).mean(0), "std": lambda w: np.sqrt(((w - w.mean(0)) ** 2).mean(0)),
        "max": lambda w: w.max(0), "max_abs": lambda w: np.abs(w).max(0),
        "mean_pos": lambda w: np.where(w > 0, w, 0).mean(0), "mean_neg": lambda w: np.where(w < 0, -w, 0).mean(0),
    }
    vectors = pool_windows(X, n_windows=3, shifted=shifted, pooling=pooling)
    w = window_length(41, 3)
    starts = window_starts(41, 3, shifted=shifted)
    assert vectors.shape == (3, starts.size, 4 * len(pooling))
    for clip in range(3):
        for j, start in enumerate(starts):
            window = X[clip, start : start + w]
            expected = np.concatenate([direct[name](window) for name in pooling])
            np.testing.assert_allclose(vectors[clip, j], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pooling statistics must be among"):
        pool_windows(X, n_windows=3, pooling=("median",))
    with pytest.raises(ValueError, match="pooling"):
        ClassifyConfig(pooling=())


def test_window_lengths_follow_the_thesis():
    # 2 x 149 frames and 6 windows: 45 frames per window (about 5 s at a 512-sample hop).
    assert window_length(298, 6) == int(np.floor(298 / 6.5)) == 45
    assert window_length(1288, 6) == int(np.floor(1288 / 6.5))
    starts = window_starts(298, 6)
    assert starts[::2].tolist() == [45 * k for k in range(6)]
    assert starts[1::2].tolist() == [22 + 45 * k for k in range(6)]
    assert starts.max() + 45 <= 298


def reference_aggregation(X, row_clips, n_windows, window_frames=None):
    """The thesis's aggregation written with reshapes, clip by clip."""
    out = []
    for clip in dict.fromkeys(row_clips.tolist()):
        frames = np.abs(X[row_clips == clip].astype(np.float64))
        n, d = frames.shape
        w = window_frames or int(np.floor(n / (n_windows + 0.5)))
        aligned = frames[: n_windows * w].reshape(n_windows, w, d).sum(axis=1)
        shifted = frames[w // 2 : w // 2 + n_windows * w].reshape(n_windows, w, d).sum(axis=1)
        out.append(np.stack([aligned, shifted], axis=1).reshape(2 * n_windows, d))
    return np.concatenate(out)


@pytest.mark.parametrize("chunk_clips, chunk_bytes", [(1, 1 << 26), (3, 1 << 26), (100, 1 << 26), (100, 1),
                                                     (100, 3 * 40 * 5 * 8)])
@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask"])
def test_aggregation_streams_any_array_by_chunks(rng, tmp_path, chunk_clips, chunk_bytes, kind):
    """By chunks of clips, at most ``chunk_clips`` and about ``chunk_bytes`` (1: one clip at a time)."""
    X = rng.normal(size=(7 * 40, 5)).astype(np.float32)
    row_clips = np.repeat([3, 0, 6, 1, 2, 5, 4], 40)  # clips in any order, rows contiguous
    expected = reference_aggregation(X, row_clips, n_windows=3)
    if kind == "zarr":
        source = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(33, 5), dtype=X.dtype)
        source[:] = X
    elif kind == "dask":
        source = da.from_array(X, chunks=(50, 5))
    else:
        source = X
    features = aggregate_clips(source, row_clips, n_windows=3, chunk_clips=chunk_clips, chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(features.vectors, expected, rtol=1e-12)
    assert features.clips.tolist() == [3, 0, 6, 1, 2, 5, 4]
    assert features.groups.tolist() == np.repeat([3, 0, 6, 1, 2, 5, 4], 6).tolist()


class RecordedReads:
    """An array whose row reads are recorded (how many rows each read asked for)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.shape, self.dtype, self.reads = values, values.shape, values.dtype, []

    def __getitem__(self, rows: slice) -> np.ndarray:
        self.reads.append(rows.stop - rows.start)
        return self.values[rows]


def test_aggregation_reads_about_chunk_bytes_at_a_time(rng):
    """Wide codes of long clips are read a few clips at a time, not 64 (338 MB at GTZAN's 1288 frames x 512)."""
    X = RecordedReads(rng.normal(size=(10 * 40, 6)).astype(np.float32))
    row_clips = np.repeat(np.arange(10), 40)
    features = aggregate_clips(X, row_clips, n_windows=3, chunk_bytes=3 * 40 * 6 * 8)  # three clips as float64
    assert X.reads == [120, 120, 120, 40]
    np.testing.assert_allclose(features.vectors, reference_aggregation(X.values, row_clips, n_windows=3), rtol=1e-12)


def test_aggregation_of_clips_of_different_lengths(rng):
    X = rng.normal(size=(30 + 50, 4))
    row_clips = np.repeat([0, 1], [30, 50])
    features = aggregate_clips(X, row_clips, n_windows=2)
    np.testing.assert_allclose(features.vectors, reference_aggregation(X, row_clips, 2))
    fixed = aggregate_clips(X, row_clips, n_windows=2, window_frames=10)
    np.testing.assert_allclose(fixed.vectors, reference_aggregation(X, row_clips, 2, window_frames=10))


def test_aggregation_errors_name_the_parameter():
    X = np.ones((20, 2))
    with pytest.raises(ValueError, match="row_clips must list the rows of each clip contiguously"):
        aggregate_clips(X, np.array([0] * 5 + [1] * 10 + [0] * 5))
    with pytest.raises(ValueError, match="too short for n_windows=6"):
        aggregate_clips(X[:6], np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match="window_frames=10 is too long"):
        aggregate_clips(X, np.zeros(20, dtype=int), n_windows=2, window_frames=10)
    with pytest.raises(ValueError, match="row_clips must have one entry per row"):
        aggregate_clips(X, np.zeros(19, dtype=int))
    with pytest.raises(ValueError, match="clip_labels must have an entry for every clip"):
        aggregate_clips(X, np.full(20, 3), n_windows=2, clip_labels=np.zeros(3))
    assert [a.tolist() for a in clip_runs(np.array([5, 5, 1]))] == [[5, 1], [0, 2], [2, 3]]
