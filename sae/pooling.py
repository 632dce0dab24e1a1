"""Aggregation of per-frame features into window vectors per clip (as the thesis).

The F frames of a clip (rows of ``X``, in time order) are cut into
``n_windows`` windows of ``w`` frames,

    w = floor(F / (n_windows + 1/2))          (or ``window_frames`` if given),

starting at frames ``0, w, 2w, ...`` (the *aligned* set) and, with
``shifted``, a second set starting at ``floor(w / 2) + k w`` (the *shifted*
set): ``2 n_windows = 12`` windows per clip, each half a window after the
previous one.  The frames after the last window of each set are dropped.  A
window is aggregated by one or more statistics (``pooling``) of its frames,
concatenated in the order given.  With ``r_c`` the first row of clip ``c``,
``s_j`` the start of window j and ``x_t = X[r_c + s_j + t]`` (t < w):

=============  ===============================================  ==========
``sum_abs``    ``sum_t |x_t[i]|`` (the thesis)                  d values
``sum``        ``sum_t x_t[i]``                                  d
``mean``       ``1/w sum_t x_t[i]``                              d
``mean_abs``   ``1/w sum_t |x_t[i]|``                            d
``std``        ``sqrt(1/w sum_t (x_t[i] - mean[i])^2)``          d
``max``        ``max_t x_t[i]``                                  d
``max_abs``    ``max_t |x_t[i]|``                                d
``mean_pos``   ``1/w sum_t max(x_t[i], 0)``                      d
``mean_neg``   ``1/w sum_t max(-x_t[i], 0)``                     d
=============  ===============================================  ==========

The vectors of a clip are ordered window by window, the aligned one first:
``(a_0, s_0, a_1, s_1, ...)``.  ``X`` is (n_rows, d) (samples by features,
as everywhere in ``sae``): per-frame codes ``Z`` (d = n_atoms) or scaled CQT
frames (d = n_bins, the baseline); the vectors are (n_clips * V, p d) with
``V = n_windows * (1 + shifted)`` and p statistics.  They are classified by
`sae.classify`.

>>> import numpy as np
>>> X = np.arange(26.0).reshape(13, 2)          # one clip of 13 frames, d = 2
>>> windows = window_starts(13, n_windows=2)    # w = floor(13 / 2.5) = 5
>>> windows.tolist()
[0, 2, 5, 7]
>>> features = aggregate_clips(X, np.zeros(13, dtype=int), n_windows=2)
>>> features.vectors[:, 0].tolist()             # sums of X[s:s+5, 0] = 2 (s + 2) * 5
[20.0, 40.0, 70.0, 90.0]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae.config import ClassifyConfig

__all__ = [
    "POOLINGS",
    "AggregatedFeatures",
    "window_length",
    "window_starts",
    "clip_runs",
    "read_rows",
    "pool_windows",
    "aggregate_clips",
    "aggregate_options",
    "aggregate_config",
]

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
"""Bytes of frames (as float64) that `aggregate_clips` reads at a time, at most (but one clip)."""

POOLINGS = ("sum_abs", "sum", "mean", "mean_abs", "std", "max", "max_abs", "mean_pos", "mean_neg")
"""Statistics of a window's frames (module docstring), concatenated in the order given."""


def window_length(n_frames: int, n_windows: int = 6, window_frames: int | None = None) -> int:
    """Frames per window for a clip of ``n_frames`` frames.

    ``window_frames`` if given, else the thesis's ``floor(n_frames / (n_windows + 1/2))``,
    the longest window such that ``n_windows`` windows plus half a window fit.

    >>> window_length(298), window_length(1288), window_length(1288, window_frames=100)
    (45, 198, 100)
    """
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    if window_frames is not None:
        if window_frames < 1:
            raise ValueError(f"window_frames must be >= 1 or None, got {window_frames}")
        return int(window_frames)
    length = (2 * int(n_frames)) // (2 * n_windows + 1)
    if length < 1:
        raise ValueError(
            f"a clip of {n_frames} frames is too short for n_windows={n_windows}: "
            f"it needs at least n_windows + 1/2 = {n_windows + 0.5} frames"
        )
    return length


def window_starts(
    n_frames: int, n_windows: int = 6, window_frames: int | None = None, shifted: bool = True
) -> np.ndarray:
    """First frame of every window of a clip of ``n_frames`` frames, in output order.

    Aligned windows start at ``k w``, shifted ones at ``floor(w / 2) + k w``
    (k = 0 .. n_windows - 1, ``w`` from `window_length`); with ``shifted`` the
    two sets interleave: ``(0, w//2, w, w + w//2, ...)``.

    Returns
    -------
    np.ndarray
        int64, of length ``n_windows * (1 + shifted)``.

    >>> window_starts(298).tolist()
    [0, 22, 45, 67, 90, 112, 135, 157, 180, 202, 225, 247]
    >>> window_starts(298, shifted=False).tolist()
    [0, 45, 90, 135, 180, 225]
    """
    w = window_length(n_frames, n_windows, window_frames)
    aligned = np.arange(n_windows, dtype=np.int64) * w
    starts = np.stack([aligned, aligned + w // 2], axis=1).ravel() if shifted else aligned
    last = int(starts.max()) + w
    if last > n_frames:
        raise ValueError(
            f"window_frames={window_frames} is too long for a clip of {n_frames} frames: "
            f"{n_windows} windows of {w} frames{' plus half a window' if shifted else ''} need {last} frames"
        )
    return starts


def clip_runs(row_clips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clips of a row->clip mapping as contiguous runs of rows.

    Parameters
    ----------
    row_clips : array (n_rows,) of int
        ``row_clips[r]`` is the clip of row r.  The rows of a clip must be
        contiguous (and in time order, which cannot be checked here).

    Returns
    -------
    clips, starts, stops : np.ndarray
        int64, one entry per clip in order of appearance: clip ``clips[i]``
        owns rows ``starts[i]:stops[i]``.

    >>> [a.tolist() for a in clip_runs(np.array([4, 4, 4, 2, 2, 7]))]
    [[4, 2, 7], [0, 3, 5], [3, 5, 6]]
    """
    row_clips = np.asarray(row_clips)
    if row_clips.ndim != 1 or row_clips.size == 0:
        raise ValueError(f"row_clips must be a non-empty 1-D array, got shape {row_clips.shape}")
    if not np.issubdtype(row_clips.dtype, np.integer):
        raise ValueError(f"row_clips must hold integer clip indices, got dtype {row_clips.dtype}")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(row_clips)) + 1]).astype(np.int64)
    stops = np.concatenate([starts[1:], [row_clips.size]]).astype(np.int64)
    clips = row_clips[starts].astype(np.int64)
    unique, counts = np.unique(clips, return_counts=True)
    if unique.size != clips.size:
        repeated = unique[counts > 1]
        raise ValueError(
            f"row_clips must list the rows of each clip contiguously; clips {repeated[:5].tolist()} "
            "appear in several runs"
        )
    return clips, starts, stops


@dataclass(frozen=True)
class AggregatedFeatures:
    """Window vectors of clips (output of `aggregate_clips`).

    Attributes
    ----------
    vectors : ndarray (n_clips * V, d) float64
        Clip after clip, ``V`` vectors each (module docstring).
    labels : ndarray (n_clips * V,) int64 or None
        The label of each vector's clip (None if no ``clip_labels`` were given).
    groups : ndarray (n_clips * V,) int64
        The clip index of each vector (groups of the grouped protocol).
    clips : ndarray (n_clips,) int64
        Clip indices in the order of the vectors.
    vectors_per_clip : int
        ``V = n_windows * (1 + shifted)``.
    """

    vectors: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray
    clips: np.ndarray
    vectors_per_clip: int


def read_rows(X: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a numpy, Zarr or Dask array, as numpy."""
    block = X[start:stop]
    if hasattr(block, "compute"):
        block = block.compute()
    return np.asarray(block)


def _statistic(windows: np.ndarray, name: str) -> np.ndarray:
    """One pooling statistic over axis 2 of windows (k, n, w, d) -> (k, n, d)."""
    if name == "sum_abs":
        return np.abs(windows).sum(axis=2)
    if name == "sum":
        return windows.sum(axis=2)
    if name == "mean":
        return windows.mean(axis=2)
    if name == "mean_abs":
        return np.abs(windows).mean(axis=2)
    if name == "std":
        return windows.std(axis=2)
    if name == "max":
        return windows.max(axis=2)
    if name == "max_abs":
        return np.abs(windows).max(axis=2)
    if name == "mean_pos":
        return np.maximum(windows, 0).mean(axis=2)
    if name == "mean_neg":
        return np.maximum(-windows, 0).mean(axis=2)
    raise ValueError(f"pooling statistics must be among {POOLINGS}, got {name!r}")


def pool_windows(
    clips: np.ndarray,
    n_windows: int = 6,
    window_frames: int | None = None,
    shifted: bool = True,
    pooling: Sequence[str] = ("sum_abs",),
) -> np.ndarray:
    """Window vectors of clips of equal length: (k, F, d) -> (k, V, p d), in the order of `window_starts`.

    Every window of every clip is reduced by each statistic of ``pooling``
    (`POOLINGS`, module docstring); the p results are concatenated.

    >>> clip = np.arange(13.0).reshape(1, 13, 1)          # w = 5: windows [0:5], [2:7], [5:10], [7:12]
    >>> pool_windows(clip, n_windows=2, pooling=("mean", "max"))[0].tolist()
    [[2.0, 4.0], [4.0, 6.0], [7.0, 9.0], [9.0, 11.0]]
    """
    if not pooling:
        raise ValueError("pooling must name at least one statistic")
    unknown = [name for name in pooling if name not in POOLINGS]
    if unknown:
        raise ValueError(f"pooling statistics must be among {POOLINGS}, got {unknown}")
    k, n_frames, d = clips.shape
    starts = window_starts(n_frames, n_windows, window_frames, shifted)  # validates the lengths
    w = window_length(n_frames, n_windows, window_frames)
    offsets = (0, int(starts[1])) if shifted else (0,)
    sets = []
    for offset in offsets:
        windows = clips[:, offset : offset + n_windows * w].reshape(k, n_windows, w, d)
        sets.append(np.concatenate([_statistic(windows, name) for name in pooling], axis=-1))
    return np.stack(sets, axis=2).reshape(k, len(starts), d * len(pooling))


def aggregate_clips(
    X: Any,
    row_clips: np.ndarray,
    *,
    clip_labels: np.ndarray | None = None,
    n_windows: int = 6,
    window_frames: int | None = None,
    shifted: bool = True,
    pooling: Sequence[str] = ("sum_abs",),
    chunk_clips: int = 64,
    chunk_bytes: int = CHUNK_BYTES,
) -> AggregatedFeatures:
    """Aggregate per-frame features into window vectors per clip (module docstring).

    Reads ``X`` by chunks of at most ``chunk_clips`` clips and about ``chunk_bytes``
    (as float64), so only one chunk of frames is ever in memory: ``X`` may be a
    numpy array, a Zarr array or a Dask array.

    Parameters
    ----------
    X : array (n_rows, d)
        Per-frame features, the rows of a clip contiguous and in time order.
    row_clips : array (n_rows,) of int
        Clip index of every row of ``X``.
    clip_labels : array, optional
        Label of clip ``c`` at ``clip_labels[c]`` (e.g. the ``label_index``
        column of the clip table).
    n_windows, window_frames, shifted, pooling
        As `sae.config.ClassifyConfig` (`aggregate_options` gives them from one).
    chunk_clips : int
        Clips read at once, at most.
    chunk_bytes : int
        Bytes of frames (float64) read at once, at most (but one clip): 64
        clips of 1288 frames of 512 codes would be 338 MB, and the statistics
        need as much again.

    Returns
    -------
    AggregatedFeatures
        ``vectors`` (n_clips * V, p d) float64; with the thesis's pooling
        ("sum_abs",) ``vectors[c V + j] = sum_{t < w} |X[r_c + s_j + t]|``.
    """
    row_clips = np.asarray(row_clips)
    if len(X.shape) != 2:
        raise ValueError(f"X must be a 2-D array (n_rows, n_features), got shape {tuple(X.shape)}")
    if row_clips.shape != (X.shape[0],):
        raise ValueError(
            f"row_clips must have one entry per row of X ({X.shape[0]}), got shape {row_clips.shape}"
        )
    if chunk_clips < 1:
        raise ValueError(f"chunk_clips must be >= 1, got {chunk_clips}")
    clips, starts, stops = clip_runs(row_clips)
    if clips.size:
        clip_bytes = 8 * int(X.shape[1]) * max(1, int(np.max(stops - starts)))
        chunk_clips = max(1, min(chunk_clips, chunk_bytes // clip_bytes))
    n_vectors = n_windows * (2 if shifted else 1)
    n_features = int(X.shape[1])
    width = n_features * len(pooling)
    vectors = np.empty((clips.size * n_vectors, width), dtype=np.float64)
    for first in range(0, clips.size, chunk_clips):
        last = min(first + chunk_clips, clips.size)
        offset = int(starts[first])
        block = read_rows(X, offset, int(stops[last - 1])).astype(np.float64, copy=False)
        # Runs of consecutive clips of equal length are aggregated together by reshapes.
        lengths = stops[first:last] - starts[first:last]
        run_starts = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [lengths.size]])
        for a, b in zip(run_starts[:-1], run_starts[1:]):
            n_frames = int(lengths[a])
            rows = block[int(starts[first + a]) - offset : int(stops[first + b - 1]) - offset]
            windows = pool_windows(rows.reshape(b - a, n_frames, n_features), n_windows, window_frames, shifted,
                                   pooling)
            vectors[(first + a) * n_vectors : (first + b) * n_vectors] = windows.reshape(-1, width)
    groups = np.repeat(clips, n_vectors)
    labels = None
    if clip_labels is not None:
        clip_labels = np.asarray(clip_labels)
        if clips.max() >= clip_labels.shape[0]:
            raise ValueError(
                f"clip_labels must have an entry for every clip index (max {int(clips.max())}), "
                f"got length {clip_labels.shape[0]}"
            )
        labels = np.repeat(clip_labels[clips], n_vectors).astype(np.int64)
    logger.debug("aggregated %d clips into %d vectors of dimension %d", clips.size, vectors.shape[0], n_features)
    return AggregatedFeatures(vectors, labels, groups, clips, n_vectors)


def aggregate_options(config: ClassifyConfig) -> dict[str, Any]:
    """The keyword arguments of `aggregate_clips` that ``config`` sets.

    >>> sorted(aggregate_options(ClassifyConfig()))
    ['chunk_clips', 'n_windows', 'pooling', 'shifted', 'window_frames']
    """
    return dict(n_windows=config.n_windows, window_frames=config.window_frames, shifted=config.shifted,
                pooling=config.pooling, chunk_clips=config.chunk_clips)


def aggregate_config(
    X: Any, row_clips: np.ndarray, config: ClassifyConfig, *, clip_labels: np.ndarray | None = None
) -> AggregatedFeatures:
    """`aggregate_clips` with the aggregation settings of ``config``: what every feature set goes through."""
    return aggregate_clips(X, row_clips, clip_labels=clip_labels, **aggregate_options(config))

