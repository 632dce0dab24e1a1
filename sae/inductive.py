"""The inductive protocol: the auto-encoder fitted per fold on the training clips only.

The folds are the grouped folds of `sae.classify` (`sae.classify.cv_splits`
with protocol "grouped") over the window vectors of the clips, so the results
pair with `sae.classify.cross_validate` fold by fold.  Each fold is one task
(`evaluate_inductive_split`): it fits the model (and, when ``lambda_g > 0``,
builds its exact kNN graph) on the frames of the training clips, encodes the
test clips' frames by every method of ``ClassifyConfig.encode_methods``
(`inductive_fold`), aggregates both sides (`sae.pooling`) and classifies them
(`sae.classify.evaluate_split`).  Everything is in memory: for small datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae.classify import Split, cv_splits, evaluate_split, protocol_summary, run_splits, split_groups
from sae.config import ClassifyConfig
from sae.pooling import aggregate_clips, aggregate_options, clip_runs, read_rows
from sae.progress import ProgressCallback

__all__ = [
    "inductive_fold",
    "evaluate_inductive_split",
    "inductive_cross_validate",
]

logger = logging.getLogger(__name__)


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
    frames = read_rows(frames, 0, frames.shape[0])
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
    results = run_splits(_inductive_task, split_clips, data, config, client, progress)
    out = {}
    for method in config.encode_methods:
        out[method] = protocol_summary([r[method] for r in results], labels, classes, config, "inductive")
        out[method].update(grouping=grouping, n_groups=int(np.unique(groups).size))
    return out
