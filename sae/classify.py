"""Genre classification of per-frame features: aggregation per clip and cross-validation.

Aggregation (as the thesis)
---------------------------
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
``V = n_windows * (1 + shifted)`` and p statistics.

Protocols
---------
See `sae.config.ClassifyConfig`: "thesis" (ShuffleSplit over vectors, with
its clip leak), "grouped" (StratifiedGroupKFold over clips) and "inductive"
(the grouped folds, with the auto-encoder fitted per fold on the training
clips only).  Every split is a separate task when a Dask client is given;
the data are scattered to the cluster once and each task receives only the
indices of its test vectors.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import ShuffleSplit, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC, LinearSVC

from sae.progress import ProgressCallback, gather

from sae.config import ClassifyConfig

__all__ = [
    "CLASSIFIERS",
    "PROTOCOLS",
    "POOLINGS",
    "AggregatedFeatures",
    "Split",
    "window_length",
    "window_starts",
    "clip_runs",
    "aggregate_clips",
    "aggregate_options",
    "pool_windows",
    "make_classifier",
    "cv_splits",
    "evaluate_split",
    "summarize_splits",
    "split_groups",
    "cross_validate",
    "inductive_fold",
    "evaluate_inductive_split",
    "inductive_cross_validate",
    "chance_level",
    "aggregate_config",
    "fit_classifier",
    "vote_shares",
]

logger = logging.getLogger(__name__)

CLASSIFIERS = ("svc", "linear_svc", "logistic_regression", "ridge")
"""Classifiers selectable by name (`make_classifier`)."""

PROTOCOLS = ("thesis", "grouped", "inductive")
"""Cross-validation protocols (`sae.config.ClassifyConfig`)."""

SCALINGS = ("none", "minmax", "standard")
"""Scalings of the window vectors, fitted per split on the training vectors."""

POOLINGS = ("sum_abs", "sum", "mean", "mean_abs", "std", "max", "max_abs", "mean_pos", "mean_neg")
"""Statistics of a window's frames (module docstring), concatenated in the order given."""


# --------------------------------------------------------------------------- aggregation


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


def _read_rows(X: Any, start: int, stop: int) -> np.ndarray:
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
) -> AggregatedFeatures:
    """Aggregate per-frame features into window vectors per clip (module docstring).

    Reads ``X`` by chunks of ``chunk_clips`` clips, so only one chunk of
    frames is ever in memory: ``X`` may be a numpy array, a Zarr array or a
    Dask array.

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
        Clips read at once.

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
    n_vectors = n_windows * (2 if shifted else 1)
    n_features = int(X.shape[1])
    width = n_features * len(pooling)
    vectors = np.empty((clips.size * n_vectors, width), dtype=np.float64)
    for first in range(0, clips.size, chunk_clips):
        last = min(first + chunk_clips, clips.size)
        offset = int(starts[first])
        block = _read_rows(X, offset, int(stops[last - 1])).astype(np.float64, copy=False)
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


# --------------------------------------------------------------------------- classifiers and splits


def make_classifier(
    name: str = "svc", *, C: float = 1.0, scaling: str = "none", random_state: int | None = None
) -> Any:
    """A scikit-learn classifier by name, optionally behind a scaler.

    ========================  ===================================================
    ``"svc"``                 ``SVC(kernel="linear", C=C)`` (libsvm, one-vs-one), the thesis's
    ``"linear_svc"``          ``LinearSVC(C=C)`` (liblinear, one-vs-rest)
    ``"logistic_regression"`` ``LogisticRegression(C=C)``
    ``"ridge"``               ``RidgeClassifier(alpha=1/C)``
    ========================  ===================================================

    ``scaling`` "minmax" or "standard" puts the scaler in a pipeline, so it is
    fitted on the training vectors of each split only.

    >>> make_classifier("svc")
    SVC(kernel='linear')
    >>> make_classifier("linear_svc", C=0.5, scaling="minmax")
    Pipeline(steps=[('minmaxscaler', MinMaxScaler()),
                    ('linearsvc', LinearSVC(C=0.5))])
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {name!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if name == "svc":
        model = SVC(kernel="linear", C=C)
    elif name == "linear_svc":
        model = LinearSVC(C=C, random_state=random_state)
    elif name == "logistic_regression":
        model = LogisticRegression(C=C, max_iter=1000)
    else:
        model = RidgeClassifier(alpha=1.0 / C)
    if scaling == "minmax":
        return make_pipeline(MinMaxScaler(), model)
    if scaling == "standard":
        return make_pipeline(StandardScaler(), model)
    return model


def _classifier(config: ClassifyConfig, C: float | None = None) -> Any:
    return make_classifier(config.classifier, C=config.C if C is None else C, scaling=config.scaling,
                           random_state=config.random_state)


INNER_SPLITS = 3
"""Folds of the inner cross-validation that chooses C among ``ClassifyConfig.C_grid``."""


def choose_C(vectors: np.ndarray, labels: np.ndarray, groups: np.ndarray, config: ClassifyConfig) -> float:
    """The C of ``config.C_grid`` with the best mean accuracy over an inner grouped cross-validation.

    ``StratifiedGroupKFold(INNER_SPLITS)`` over ``groups`` of the given
    (training) vectors only, so the choice never sees a test vector of the
    outer split; ties go to the smallest C (the most regularised).  Without a
    grid, ``config.C``.
    """
    if not config.C_grid:
        return config.C
    n_inner = min(INNER_SPLITS, np.unique(groups).size)
    if n_inner < 2:
        return config.C
    splitter = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=config.random_state)
    scores = np.zeros(len(config.C_grid))
    for train, test in splitter.split(vectors, labels, groups):
        for i, C in enumerate(config.C_grid):
            model = clone(_classifier(config, C)).fit(vectors[train], labels[train])
            scores[i] += np.mean(model.predict(vectors[test]) == labels[test])
    grid = np.asarray(config.C_grid, dtype=np.float64)
    best = np.flatnonzero(scores == scores.max())
    return float(grid[best].min())


@dataclass(frozen=True)
class Split:
    """One train/test split: repetition, fold, and the indices of its test vectors.

    The training vectors are all the others.
    """

    repeat: int
    fold: int
    test: np.ndarray = field(repr=False)


def _repeat_seeds(random_state: int, n_repeats: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(random_state).generate_state(n_repeats)]


def cv_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    protocol: str = "grouped",
    n_splits: int = 10,
    n_repeats: int = 20,
    test_size: float = 0.1,
    random_state: int = 0,
) -> list[Split]:
    """The splits of a protocol: ``n_repeats`` repetitions of ``n_splits`` splits.

    "thesis": ``ShuffleSplit(n_splits, test_size)`` over the vectors, ignoring
    ``groups`` (vectors of one clip may be on both sides).  "grouped" and
    "inductive": ``StratifiedGroupKFold(n_splits, shuffle=True)`` over
    ``groups`` (the clip of every vector, or its recording, album or artist):
    no group on both sides; every vector is tested once per repetition.
    Repetition r uses the seed ``SeedSequence(random_state)``'s
    r-th state, so the splits depend only on the arguments.

    Returns
    -------
    list of Split
        ``n_repeats * n_splits`` splits, repetition-major.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D of equal length, got {labels.shape} and {groups.shape}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    placeholder = np.zeros((labels.size, 1))
    splits = []
    for repeat, seed in enumerate(_repeat_seeds(random_state, n_repeats)):
        if protocol == "thesis":
            splitter = ShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)
            folds = splitter.split(placeholder)
        else:
            n_groups = np.unique(groups).size
            if n_splits > n_groups:
                raise ValueError(f"n_splits must be <= the number of groups ({n_groups}), got {n_splits}")
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            folds = splitter.split(placeholder, labels, groups)
        for fold, (_, test) in enumerate(folds):
            splits.append(Split(repeat, fold, np.asarray(test, dtype=np.int64)))
    return splits


def _votes(predictions: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of each group's predictions (ties: the smallest label); groups sorted."""
    clips, inverse = np.unique(groups, return_inverse=True)
    classes, coded = np.unique(predictions, return_inverse=True)
    counts = np.zeros((clips.size, classes.size), dtype=np.int64)
    np.add.at(counts, (inverse, coded), 1)
    return clips, classes[np.argmax(counts, axis=1)]


def evaluate_split(
    vectors: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    split: Split,
    config: ClassifyConfig,
    classes: np.ndarray | None = None,
    fold_groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit the classifier on the training vectors of ``split`` and score it on its test vectors.

    ``groups`` is the clip of every vector (for the vote), ``fold_groups`` what
    the inner folds of `choose_C` keep together (default ``groups``).

    Returns
    -------
    dict
        ``repeat``, ``fold``, ``accuracy`` (share of test vectors well
        classified), ``confusion`` ((k, k) int64 counts, rows = true class,
        columns = predicted, over ``classes``), ``n_test``, ``C`` (the one
        used); with ``config.voting``: ``clip_accuracy`` and ``clip_confusion``
        of the majority vote of each test clip's test vectors.
    """
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    fold_groups = groups if fold_groups is None else fold_groups
    test = split.test
    train = np.ones(labels.size, dtype=bool)
    train[test] = False
    C = choose_C(vectors[train], labels[train], fold_groups[train], config)
    model = clone(_classifier(config, C))
    model.fit(vectors[train], labels[train])
    predicted = model.predict(vectors[test])
    truth = labels[test]
    out = {
        "repeat": split.repeat,
        "fold": split.fold,
        "accuracy": float(np.mean(predicted == truth)),
        "confusion": confusion_matrix(truth, predicted, labels=classes),
        "n_test": int(test.size),
        "C": float(C),
    }
    if config.voting:
        clips, voted = _votes(predicted, groups[test])
        clip_truth = _votes(truth, groups[test])[1]
        out["clip_accuracy"] = float(np.mean(voted == clip_truth))
        out["clip_confusion"] = confusion_matrix(clip_truth, voted, labels=classes)
        out["n_test_clips"] = int(clips.size)
    return out


def chance_level(labels: np.ndarray) -> float:
    """Share of the majority class: the accuracy of always predicting it.

    >>> chance_level(np.array([0, 0, 1, 2]))
    0.5
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


def summarize_splits(
    results: Sequence[dict[str, Any]], labels: np.ndarray, classes: np.ndarray | None = None, *, prefix: str = ""
) -> dict[str, Any]:
    """Mean, std and pooled confusion of the per-split results of `evaluate_split`.

    ``accuracy_std`` is the population std (``ddof=0``) of the split scores, as
    the thesis reported.  ``per_class_accuracy[k]`` is the recall of class k
    over all splits pooled: ``confusion[k, k] / sum_j confusion[k, j]``.
    ``prefix`` "clip_" summarises the majority-vote fields instead.
    """
    classes = np.unique(labels) if classes is None else np.asarray(classes)
    results = sorted(results, key=lambda r: (r["repeat"], r["fold"]))
    scores = np.array([r[f"{prefix}accuracy"] for r in results], dtype=np.float64)
    confusion = np.sum([r[f"{prefix}confusion"] for r in results], axis=0).astype(np.int64)
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.full(classes.size, np.nan), where=support > 0)
    return {
        "accuracy_mean": float(scores.mean()),
        "accuracy_std": float(scores.std()),
        "scores": scores.tolist(),
        "n_scores": int(scores.size),
        "chance": chance_level(labels),
        "classes": classes.tolist(),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def _summary(results: Sequence[dict[str, Any]], labels: np.ndarray, classes: np.ndarray, config: ClassifyConfig,
             protocol: str) -> dict[str, Any]:
    summary = summarize_splits(results, labels, classes)
    summary.update(protocol=protocol, classifier=config.classifier, n_vectors=int(labels.size))
    if config.C_grid:
        chosen = [r["C"] for r in sorted(results, key=lambda r: (r["repeat"], r["fold"]))]
        summary["C_chosen"] = {f"{c:g}": chosen.count(c) for c in sorted(set(chosen))}
    if config.voting:
        summary["voting"] = {
            k: v for k, v in summarize_splits(results, labels, classes, prefix="clip_").items() if k != "chance"
        }
    return summary


@dataclass(frozen=True)
class _Data:
    """What every split task needs, scattered to the cluster once."""

    vectors: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    classes: np.ndarray
    fold_groups: np.ndarray


def _evaluate_task(split: Split, data: _Data, config: ClassifyConfig) -> dict[str, Any]:
    return evaluate_split(data.vectors, data.labels, data.groups, split, config, data.classes, data.fold_groups)


def _run_splits(function: Any, splits: Sequence[Split], data: Any, config: ClassifyConfig, client: Any,
                progress: ProgressCallback | None = None) -> list:
    """``[function(split, data, config) for split in splits]``, one Dask task per split if ``client``.

    ``progress(done, len(splits))`` is called as splits complete (`sae.progress`).
    """
    if client is None:
        results = []
        if progress is not None:
            progress(0, len(splits))
        for split in splits:
            results.append(function(split, data, config))
            if progress is not None:
                progress(len(results), len(splits))
        return results
    data_future = client.scatter(data, broadcast=False, hash=False)
    futures = client.map(function, list(splits), data=data_future, config=config, pure=False)
    try:
        return gather(client, futures, progress)
    finally:
        client.cancel([*futures, data_future])


def split_groups(clips: np.ndarray, clip_groups: np.ndarray | None) -> tuple[np.ndarray, str]:
    """What the grouped folds keep together, per vector: the group of its clip, and the grouping's name.

    ``clips`` is the clip of every vector; ``clip_groups[c]`` the group (an
    integer: recording, album, artist) of clip c, or None for "every clip its
    own group".  The name is "clip" when every group holds one clip, else "group".

    >>> split_groups(np.array([0, 0, 1, 2]), np.array([5, 5, 6]))
    (array([5, 5, 5, 6]), 'group')
    >>> split_groups(np.array([0, 0, 1]), None)[1]
    'clip'
    """
    clips = np.asarray(clips)
    if clip_groups is None:
        return clips, "clip"
    clip_groups = np.asarray(clip_groups)
    if clips.size and clips.max() >= clip_groups.shape[0]:
        raise ValueError(
            f"clip_groups must have an entry for every clip index (max {int(clips.max())}), "
            f"got length {clip_groups.shape[0]}"
        )
    used = np.unique(clips)
    kind = "clip" if np.unique(clip_groups[used]).size == used.size else "group"
    return clip_groups[clips].astype(np.int64), kind


def cross_validate(
    features: AggregatedFeatures,
    config: ClassifyConfig,
    *,
    client: Any = None,
    protocol: str | None = None,
    clip_groups: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Cross-validated accuracy of window vectors under ``config`` (protocol "thesis" or "grouped").

    Parameters
    ----------
    features : AggregatedFeatures
        With labels.
    config : ClassifyConfig
    client : distributed.Client, optional
        Run one task per split on it (the data scattered once); serial if None.
        The results are the same either way.
    protocol : str, optional
        Overrides ``config.protocol``; "inductive" is evaluated here as
        "grouped" (same splits) for features that do not depend on the fold,
        and reported as "grouped": these features were not learned per fold.
    clip_groups : array, optional
        ``clip_groups[c]`` is the group (int) of clip c: the grouped folds keep
        each group on one side (`split_groups`).  None: each clip is its own group.
    progress : callable, optional
        ``progress(done, n_splits)`` as splits complete (`sae.progress`).

    Returns
    -------
    dict
        Of `summarize_splits` plus ``protocol``, ``classifier``, ``n_vectors``,
        ``grouping`` ("clip", "group" or "none" for the thesis's protocol) and
        ``n_groups``, and, with voting, ``voting`` (the same statistics for whole clips).
    """
    if features.labels is None:
        raise ValueError("features must have labels: pass clip_labels to aggregate_clips")
    protocol = protocol or config.protocol
    split_protocol = "grouped" if protocol == "inductive" else protocol
    groups, grouping = split_groups(features.groups, clip_groups)
    splits = cv_splits(
        features.labels, groups, protocol=split_protocol, n_splits=config.n_splits,
        n_repeats=config.n_repeats, test_size=config.test_size, random_state=config.random_state,
    )
    classes = np.unique(features.labels)
    data = _Data(features.vectors, features.labels, features.groups, classes, groups)
    logger.info("%s protocol (grouped by %s): %d splits of %d vectors", split_protocol, grouping, len(splits),
                features.labels.size)
    results = _run_splits(_evaluate_task, splits, data, config, client, progress)
    summary = _summary(results, features.labels, classes, config, split_protocol)
    summary.update(grouping="none" if split_protocol == "thesis" else grouping, n_groups=int(np.unique(groups).size))
    return summary


# --------------------------------------------------------------------------- inductive protocol


def _fold_laplacian(frames: np.ndarray, config: ClassifyConfig) -> Any:
    """Laplacian of the exact kNN graph of ``frames`` (None when lambda_g = 0)."""
    if config.model.lambda_g <= 0:
        return None
    import dask

    from sae.graph import graph_options, laplacian_from_neighbors
    from sae.knn import exact_neighbors

    # The fold is one task: its kNN runs inside it, never as sub-tasks of the cluster.
    with dask.config.set(scheduler="synchronous"):
        indices, distances = exact_neighbors(
            frames, config.graph.n_neighbors, metric=config.graph.metric, block_size=config.graph.block_size
        )
    return laplacian_from_neighbors(indices, distances, **graph_options(config.graph))


def inductive_fold(
    frames: np.ndarray, row_clips: np.ndarray, test_clips: np.ndarray, config: ClassifyConfig
) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
    """Fit the auto-encoder on the training clips of a fold and encode both sides.

    The model (``config.model``) and, when ``lambda_g > 0``, its graph (exact
    kNN of the training frames, `sae.graph` with ``config.graph``) see only
    the frames of the clips not in ``test_clips``.  The test frames are then
    encoded with ``StructuredAutoEncoder.transform`` for every method of
    ``config.encode_methods``: "encoder" is the direct encoder (no graph);
    "exact" re-solves the Z step, whose graph term (when ``lambda_g > 0``)
    needs a Laplacian between the test frames: the one of their own exact kNN
    graph, built the same way (the test frames are encoded together, as a
    batch, but never influence the model).

    Returns
    -------
    model : StructuredAutoEncoder
        Fitted on the training frames.
    train_codes : ndarray (n_train_rows, n_atoms)
        ``fit_transform`` codes of the training frames, in row order.
    test_codes : dict of str to ndarray (n_test_rows, n_atoms)
        Codes of the test frames (in row order) per encoding method.
    """
    from sae.estimator import StructuredAutoEncoder

    row_clips = np.asarray(row_clips)
    is_test = np.isin(row_clips, np.asarray(test_clips))
    if not is_test.any() or is_test.all():
        raise ValueError("test_clips must select some but not all of the rows' clips")
    train_frames = np.asarray(frames[~is_test])
    test_frames = np.asarray(frames[is_test])
    model = StructuredAutoEncoder(**config.model.model_dump())
    train_codes = model.fit_transform(train_frames, laplacian=_fold_laplacian(train_frames, config))
    test_laplacian = _fold_laplacian(test_frames, config) if "exact" in config.encode_methods else None
    test_codes = {
        method: model.transform(test_frames, laplacian=test_laplacian if method == "exact" else None, method=method)
        for method in config.encode_methods
    }
    return model, train_codes, test_codes


@dataclass(frozen=True)
class _FrameData:
    frames: np.ndarray
    row_clips: np.ndarray
    clip_labels: np.ndarray
    classes: np.ndarray
    clip_groups: np.ndarray | None


def evaluate_inductive_split(
    frames: np.ndarray,
    row_clips: np.ndarray,
    clip_labels: np.ndarray,
    split_clips: tuple[int, int, np.ndarray],
    config: ClassifyConfig,
    classes: np.ndarray | None = None,
    clip_groups: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """One fold of the inductive protocol: `inductive_fold`, aggregation, classification.

    ``split_clips`` is ``(repeat, fold, test clip indices)``.  Returns, per
    encoding method, the dict of `evaluate_split` for the window vectors of
    the training codes (training set) and of the test codes (test set).
    ``clip_groups`` (the group of every clip) keeps groups together in the
    inner folds that choose C (`choose_C`).
    """
    repeat, fold, test_clips = split_clips
    row_clips = np.asarray(row_clips)
    _, train_codes, test_codes = inductive_fold(frames, row_clips, test_clips, config)
    is_test = np.isin(row_clips, np.asarray(test_clips))
    options = aggregate_options(config)
    train = aggregate_clips(train_codes, row_clips[~is_test], clip_labels=clip_labels, **options)
    out = {}
    for method, codes in test_codes.items():
        test = aggregate_clips(codes, row_clips[is_test], clip_labels=clip_labels, **options)
        vectors = np.concatenate([train.vectors, test.vectors])
        labels = np.concatenate([train.labels, test.labels])
        groups = np.concatenate([train.groups, test.groups])
        split = Split(repeat, fold, np.arange(train.labels.size, labels.size, dtype=np.int64))
        out[method] = evaluate_split(vectors, labels, groups, split, config, classes,
                                     split_groups(groups, clip_groups)[0])
    return out


def _inductive_task(split_clips: tuple[int, int, np.ndarray], data: _FrameData, config: ClassifyConfig) -> dict:
    return evaluate_inductive_split(data.frames, data.row_clips, data.clip_labels, split_clips, config, data.classes,
                                    data.clip_groups)


def inductive_cross_validate(
    frames: Any,
    row_clips: np.ndarray,
    clip_labels: np.ndarray,
    config: ClassifyConfig,
    *,
    client: Any = None,
    clip_groups: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Cross-validated accuracy of codes learned per fold on the training clips only.

    The folds are those of `cross_validate` with protocol "grouped" on the
    window vectors of the same clips (so the results pair with it fold by
    fold); each fold is one task (`evaluate_inductive_split`) that fits the
    auto-encoder in memory: for small datasets.

    Parameters
    ----------
    frames : array (n_rows, n_features)
        The model input (e.g. scaled CQT frames), read whole into memory.
    row_clips : array (n_rows,) of int
    clip_labels : array
        ``clip_labels[c]`` is the label of clip c.
    config : ClassifyConfig
    client : distributed.Client, optional
    clip_groups : array, optional
        As in `cross_validate`: the group of every clip, kept on one side.
    progress : callable, optional
        ``progress(done, n_folds)`` as folds complete (`sae.progress`).

    Returns
    -------
    dict of str to dict
        For every method of ``config.encode_methods``, the summary of `cross_validate`.
    """
    frames = _read_rows(frames, 0, frames.shape[0])
    row_clips = np.asarray(row_clips)
    clip_labels = np.asarray(clip_labels)
    clips, _, _ = clip_runs(row_clips)
    n_vectors = config.n_windows * (2 if config.shifted else 1)
    labels = np.repeat(clip_labels[clips], n_vectors).astype(np.int64)
    vector_clips = np.repeat(clips, n_vectors)
    groups, grouping = split_groups(vector_clips, clip_groups)
    splits = cv_splits(labels, groups, protocol="grouped", n_splits=config.n_splits, n_repeats=config.n_repeats,
                       random_state=config.random_state)
    split_clips = [(s.repeat, s.fold, np.unique(vector_clips[s.test])) for s in splits]
    classes = np.unique(labels)
    data = _FrameData(frames, row_clips, clip_labels, classes, clip_groups)
    logger.info("inductive protocol: %d folds, %d frames", len(split_clips), frames.shape[0])
    results = _run_splits(_inductive_task, split_clips, data, config, client, progress)
    out = {}
    for method in config.encode_methods:
        out[method] = _summary([r[method] for r in results], labels, classes, config, "inductive")
        out[method].update(grouping=grouping, n_groups=int(np.unique(groups).size))
    return out


# --------------------------------------------------------------------------- a trained classifier on new clips


def aggregate_config(
    X: Any, row_clips: np.ndarray, config: ClassifyConfig, *, clip_labels: np.ndarray | None = None
) -> AggregatedFeatures:
    """`aggregate_clips` with the aggregation settings of ``config``: what every feature set goes through."""
    return aggregate_clips(X, row_clips, clip_labels=clip_labels, **aggregate_options(config))


def fit_classifier(features: AggregatedFeatures, config: ClassifyConfig, groups: np.ndarray | None = None) -> Any:
    """The classifier of ``config`` (`make_classifier`) fitted on every vector of ``features`` (with labels).

    With ``config.C_grid``, C is chosen by `choose_C`, grouped by ``groups``
    (one group per vector's clip when None).
    """
    if features.labels is None:
        raise ValueError("features must have labels: pass clip_labels to aggregate_clips")
    C = choose_C(features.vectors, features.labels, features.groups if groups is None else groups, config)
    return clone(_classifier(config, C)).fit(features.vectors, features.labels)


def vote_shares(predictions: np.ndarray, groups: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of each class among the predicted labels of every group (clip): the majority vote's scores.

    ``classes`` are sorted (a classifier's ``classes_``) and hold every
    prediction.  Returns ``clips`` (sorted group ids) and ``shares`` (n_clips,
    n_classes) float64, rows summing to 1, columns in the order of ``classes``; the
    vote's winner is ``classes[argmax(shares, axis=1)]``, ties going to the
    first class, as the clip accuracy of ``voting``.

    >>> clips, shares = vote_shares(np.array([2, 0, 2, 0, 0]), np.array([7, 7, 7, 9, 9]), np.array([0, 2]))
    >>> clips.tolist(), shares.round(2).tolist()
    ([7, 9], [[0.33, 0.67], [1.0, 0.0]])
    """
    classes = np.asarray(classes)
    clips, inverse = np.unique(np.asarray(groups), return_inverse=True)
    position = np.searchsorted(classes, predictions)
    if np.any(position >= classes.size) or np.any(classes[np.minimum(position, classes.size - 1)] != predictions):
        raise ValueError(f"predictions must be among classes {classes.tolist()}")
    counts = np.zeros((clips.size, classes.size), dtype=np.float64)
    np.add.at(counts, (inverse, position), 1.0)
    return clips, counts / counts.sum(axis=1, keepdims=True)
