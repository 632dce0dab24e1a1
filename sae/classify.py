"""Genre classification of window vectors: classifiers, the choice of C, cross-validation splits and protocols.

The window vectors of clips come from `sae.pooling` (`sae.pooling.aggregate_clips`).

Protocols
---------
See `sae.config.ClassifyConfig`: "thesis" (ShuffleSplit over vectors, with
its clip leak), "grouped" (StratifiedGroupKFold over clips) and "inductive"
(the grouped folds, with the auto-encoder fitted per fold on the training
clips only, `sae.inductive`).  Every split is a separate task when a Dask
client is given (`run_splits`); the data are scattered to the cluster once
and each task receives only the indices of its test vectors.

>>> from sae.pooling import aggregate_clips
>>> X = np.repeat(np.arange(4.0), 13)[:, None] + np.tile(np.arange(13.0), 4)[:, None]   # 4 clips of 13 frames
>>> features = aggregate_clips(X, np.repeat(np.arange(4), 13), clip_labels=np.array([0, 1, 0, 1]), n_windows=2)
>>> summary = cross_validate(features, ClassifyConfig(n_splits=2, n_repeats=1, scaling="standard"))
>>> summary["protocol"], summary["n_scores"], summary["grouping"]
('grouped', 2, 'clip')
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import ShuffleSplit, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC, LinearSVC

from sae.config import ClassifyConfig
from sae.pooling import AggregatedFeatures
from sae.progress import ProgressCallback

__all__ = [
    "CLASSIFIERS",
    "PROTOCOLS",
    "VECTOR_SCALINGS",
    "INNER_SPLITS",
    "Split",
    "make_classifier",
    "choose_C",
    "ridge_path_accuracies",
    "cv_splits",
    "evaluate_split",
    "chance_level",
    "summarize_splits",
    "protocol_summary",
    "run_splits",
    "split_groups",
    "cross_validate",
    "fit_classifier",
    "vote_shares",
]

logger = logging.getLogger(__name__)

LOST_DATA_RETRIES = 2
"""How many times `run_splits` scatters its data again after a worker that held it was lost."""

CLASSIFIERS = ("svc", "linear_svc", "logistic_regression", "ridge")
"""Classifiers selectable by name (`make_classifier`)."""

PROTOCOLS = ("thesis", "grouped", "inductive")
"""Cross-validation protocols (`sae.config.ClassifyConfig`)."""

VECTOR_SCALINGS = ("none", "minmax", "standard")
"""Scalings of the window vectors, fitted per split on the training vectors (the frames' are `sae.preprocess`'s)."""


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
    if scaling not in VECTOR_SCALINGS:
        raise ValueError(f"scaling must be one of {VECTOR_SCALINGS}, got {scaling!r}")
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
    scaler = _vector_scaler(scaling)
    return model if scaler is None else make_pipeline(scaler, model)


def _vector_scaler(scaling: str) -> Any:
    """The unfitted scaler of ``scaling`` (one of `VECTOR_SCALINGS`), None for "none"."""
    return {"minmax": MinMaxScaler, "standard": StandardScaler}.get(scaling, lambda: None)()


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
        if config.classifier == "ridge":
            scores += ridge_path_accuracies(vectors[train], labels[train], vectors[test], labels[test],
                                            config.C_grid, config.scaling)
            continue
        for i, C in enumerate(config.C_grid):
            model = clone(_classifier(config, C)).fit(vectors[train], labels[train])
            scores[i] += np.mean(model.predict(vectors[test]) == labels[test])
    grid = np.asarray(config.C_grid, dtype=np.float64)
    best = np.flatnonzero(scores == scores.max())
    return float(grid[best].min())


def ridge_path_accuracies(train_vectors: np.ndarray, train_labels: np.ndarray, test_vectors: np.ndarray,
                          test_labels: np.ndarray, C_grid: Sequence[float], scaling: str = "none") -> np.ndarray:
    """Test accuracy of ``make_classifier("ridge", C=C, scaling=scaling)`` fitted on the training vectors, for
    every C of ``C_grid``, from one Gram matrix.

    ``RidgeClassifier(alpha)`` regresses the one-vs-rest targets (+1 / -1) on
    the centred vectors: ``W = (Xc^T Xc + alpha I)^-1 Xc^T Yc``, the intercept
    making the fit pass through the means, and predicts the class of the
    largest score.  The d x d Gram matrix ``Xc^T Xc``, what a fit costs when
    there are more vectors than features, is formed once for the whole grid
    (a Cholesky factorisation per C then costs d^3 / 3) instead of once per C:
    the choice of C by nested folds is what made a split of 5,220 vectors x
    1,536 take 10-15 s.  The same predictions as scikit-learn's up to rounding
    (a test compares them).
    """
    scaler = _vector_scaler(scaling)
    if scaler is not None:
        scaler.fit(train_vectors)
    X = np.asarray(train_vectors if scaler is None else scaler.transform(train_vectors), dtype=np.float64)
    T = np.asarray(test_vectors if scaler is None else scaler.transform(test_vectors), dtype=np.float64)
    classes, y = np.unique(train_labels, return_inverse=True)
    Y = np.full((y.size, classes.size), -1.0)
    Y[np.arange(y.size), y] = 1.0
    x_mean, y_mean = X.mean(axis=0), Y.mean(axis=0)
    X, T = X - x_mean, T - x_mean  # new arrays: the caller's vectors are left as they are
    Y -= y_mean
    gram, targets = X.T @ X, X.T @ Y
    diagonal = np.diag(gram).copy()
    accuracies = np.empty(len(C_grid))
    for i, C in enumerate(C_grid):
        np.fill_diagonal(gram, diagonal + 1.0 / C)
        scores = T @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram, overwrite_a=False), targets) + y_mean
        accuracies[i] = np.mean(classes[np.argmax(scores, axis=1)] == test_labels)
    return accuracies


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
    if protocol != "thesis":
        n_groups = np.unique(groups).size
        if n_splits > n_groups:
            raise ValueError(f"n_splits must be <= the number of groups ({n_groups}), got {n_splits}")
        check_groups_per_label(labels, groups)
    placeholder = np.zeros((labels.size, 1))
    splits = []
    for repeat, seed in enumerate(_repeat_seeds(random_state, n_repeats)):
        if protocol == "thesis":
            splitter = ShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)
            folds = splitter.split(placeholder)
        else:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            folds = splitter.split(placeholder, labels, groups)
        for fold, (_, test) in enumerate(folds):
            splits.append(Split(repeat, fold, np.asarray(test, dtype=np.int64)))
    return splits


def check_groups_per_label(labels: np.ndarray, groups: np.ndarray, names: Sequence[str] | None = None) -> None:
    """Refuse grouped folds in which a label could never be both trained and tested.

    A label whose vectors (or clips) all belong to one group lands in one test
    fold with nothing of it left to train on: its accuracy would be 0 by
    construction.  ``names``: the label names, when ``labels`` are their indices.

    >>> check_groups_per_label(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2]))
    Traceback (most recent call last):
    ...
    ValueError: grouped folds need at least 2 groups (clips, or the manifest's groups) per label; label 1 has only 1: add clips of it, drop it, or use protocol 'thesis'
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    lonely = [label for label in np.unique(labels) if np.unique(groups[labels == label]).size < 2]
    if lonely:
        shown = ", ".join(repr(names[int(label)]) if names is not None else str(label) for label in lonely[:10])
        shown += ", ..." if len(lonely) > 10 else ""
        raise ValueError(
            "grouped folds need at least 2 groups (clips, or the manifest's groups) per label; "
            f"label {shown} has only 1: add clips of it, drop it, or use protocol 'thesis'"
        )


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


def protocol_summary(results: Sequence[dict[str, Any]], labels: np.ndarray, classes: np.ndarray,
                     config: ClassifyConfig, protocol: str) -> dict[str, Any]:
    """`summarize_splits` of a protocol's splits, with ``protocol``, ``classifier`` and ``n_vectors``.

    With ``config.C_grid``, ``C_chosen`` counts the splits that chose each C;
    with ``config.voting``, ``voting`` summarises the majority votes of whole clips.
    """
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


def run_splits(function: Any, splits: Sequence[Any], data: Any, config: ClassifyConfig, client: Any,
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
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    results: dict[int, Any] = {}
    total = len(splits)
    if progress is not None:
        progress(0, total)
    for attempt in range(LOST_DATA_RETRIES + 1):
        # scattered data has no task to make it again: when the worker that holds it is lost, the splits not run
        # yet are cancelled ('lost dependencies'); the data is scattered again and those splits run again
        data_future = client.scatter(data, broadcast=False, hash=False)
        todo = [i for i in range(total) if i not in results]
        futures = client.map(function, [splits[i] for i in todo], data=data_future, config=config, pure=False)
        index = {future.key: i for future, i in zip(futures, todo)}
        try:
            for future in as_completed(futures):
                results[index[future.key]] = future.result()
                if progress is not None:
                    progress(len(results), total)
            return [results[i] for i in range(total)]
        except FutureCancelledError as error:
            if attempt == LOST_DATA_RETRIES:
                raise RuntimeError(
                    f"the classification lost its data with a worker {attempt + 1} times ({error}); "
                    f"{total - len(results)} of {total} splits did not run: check the workers' logs") from error
            logger.warning("the classification lost its data with a worker (%s): %d of %d splits run again",
                           error, total - len(results), total)
        finally:
            client.cancel([*futures, data_future])
    raise AssertionError("unreachable")  # pragma: no cover


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
    results = run_splits(_evaluate_task, splits, data, config, client, progress)
    summary = protocol_summary(results, features.labels, classes, config, split_protocol)
    summary.update(grouping="none" if split_protocol == "thesis" else grouping, n_groups=int(np.unique(groups).size))
    return summary


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
