"""The inductive protocol: the auto-encoder fitted per fold on the training clips only, applied as to new music.

The folds are the grouped folds of `sae.classify` (`sae.classify.cv_splits`
with protocol "grouped") over the window vectors of the clips, so the results
pair with `sae.classify.cross_validate` fold by fold.  Each fold is one task
(`evaluate_inductive_split`): it fits the model (and, when ``lambda_g > 0``,
builds its exact kNN graph) on the frames of the training clips, then does
for every method of ``ClassifyConfig.encode_methods`` what a model folder
exported from that training does with new music (`inductive_fold`): each test
clip encoded on its own (`sae.inference.encode_frames`), a classifier fitted
on the training clips coded as that method codes new music
(`sae.inference.classifier_codes`).  Both sides are aggregated
(`sae.pooling`) and classified (`sae.classify.evaluate_split`).  Everything
is in memory: for small datasets.
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
    "InductiveFold",
    "inductive_fold",
    "evaluate_inductive_split",
    "inductive_cross_validate",
]

logger = logging.getLogger(__name__)


def _fold_graph(frames: np.ndarray, config: ClassifyConfig) -> tuple[Any, np.ndarray | None, float | None]:
    """Laplacian, degrees and kernel width of the exact kNN graph of ``frames`` (Nones when lambda_g = 0)."""
    if config.model.lambda_g <= 0:
        return None, None, None
    import dask

    from sae.graph import adjacency_matrix, degree_vector, kernel_sigma, laplacian_matrix
    from sae.knn import exact_neighbors

    graph = config.graph
    # The fold is one task: its kNN runs inside it, never as sub-tasks of the cluster.
    with dask.config.set(scheduler="synchronous"):
        indices, distances = exact_neighbors(frames, graph.n_neighbors, metric=graph.metric,
                                             block_size=graph.block_size)
    W = adjacency_matrix(indices, distances, kernel=graph.kernel, sigma_factor=graph.sigma_factor,
                         self_loops=graph.self_loops, dtype=np.float64)
    return (laplacian_matrix(W, laplacian=graph.laplacian), degree_vector(W),
            kernel_sigma(distances, sigma_factor=graph.sigma_factor))


@dataclass(frozen=True)
class InductiveFold:
    """A fold's model and codes (`inductive_fold`).

    Attributes
    ----------
    model : StructuredAutoEncoder
        Fitted on the training frames (with their graph when ``lambda_g > 0``).
    train_codes : ndarray (n_train_rows, n_atoms)
        ``fit_transform`` codes of the training frames, in row order.
    classifier_codes : dict of str to ndarray (n_train_rows, n_atoms)
        Per method, the training frames coded as the classifier of a model
        folder of this method sees them (`sae.inference.classifier_codes`).
    test_codes : dict of str to ndarray (n_test_rows, n_atoms)
        Per method, the test frames (in row order), each clip encoded on its own.
    """

    model: Any
    train_codes: np.ndarray
    classifier_codes: dict[str, np.ndarray]
    test_codes: dict[str, np.ndarray]


def inductive_fold(frames: np.ndarray, row_clips: np.ndarray, test_clips: np.ndarray,
                   config: ClassifyConfig) -> InductiveFold:
    """Fit the auto-encoder on the training clips of a fold and code both sides as a model folder would.

    The model (``config.model``) and, when ``lambda_g > 0``, its graph (exact
    kNN of the training frames, `sae.graph` with ``config.graph``) see only
    the frames of the clips not in ``test_clips``.  Then, for every method of
    ``config.encode_methods`` (`sae.inference.METHODS`), the test clips are
    encoded each on its own (`sae.inference.ClipCodes`; "exact_graph" joins
    their frames to the training graph) and the training clips are coded as
    the method's classifier sees them (`sae.inference.classifier_codes`):
    each on its own by the method, or the learned training codes for
    "exact_graph".  The test frames never influence the model.
    """
    from sae.estimator import StructuredAutoEncoder
    from sae.inference import ClipCodes, TrainingGraph, classifier_codes

    row_clips = np.asarray(row_clips)
    is_test = np.isin(row_clips, np.asarray(test_clips))
    if not is_test.any() or is_test.all():
        raise ValueError("test_clips must select some but not all of the rows' clips")
    train_frames = np.asarray(frames[~is_test])
    test_frames = np.asarray(frames[is_test])
    model = StructuredAutoEncoder(**config.model.model_dump())
    laplacian, degrees, sigma = _fold_graph(train_frames, config)
    train_codes = model.fit_transform(train_frames, laplacian=laplacian)
    graph = None if laplacian is None else TrainingGraph(train_frames, train_codes, degrees, sigma, config.graph)
    weights = model.config_
    train_rows, test_rows = row_clips[~is_test], row_clips[is_test]
    fitted_on, test_codes = {}, {}
    for method in config.encode_methods:
        codes = classifier_codes(method, train_frames, train_rows, train_codes, model.components_, model.encoder_,
                                 weights)
        fitted_on[method] = np.asarray(codes[:])
        test_codes[method] = ClipCodes(test_frames, test_rows, model.components_, model.encoder_, weights, method,
                                       graph)[:]
    return InductiveFold(model, train_codes, fitted_on, test_codes)


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
    the training clips as the method's classifier sees them (training set) and
    of the test codes (test set).
    ``clip_groups`` (the group of every clip) keeps groups together in the
    inner folds that choose C (`choose_C`).
    """
    repeat, fold, test_clips = split_clips
    row_clips = np.asarray(row_clips)
    coded = inductive_fold(frames, row_clips, test_clips, config)
    is_test = np.isin(row_clips, np.asarray(test_clips))
    options = aggregate_options(config)
    out = {}
    for method, codes in coded.test_codes.items():
        train = aggregate_clips(coded.classifier_codes[method], row_clips[~is_test], clip_labels=clip_labels,
                                **options)
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
