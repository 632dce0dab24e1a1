"""Features and genres of music the model never saw: the encoding of unseen frames and the trained model.

Orientation (see :mod:`sae`): ``X`` (N', n) new frames (scaled model input),
``Z`` (N', m) their codes, ``C`` (m, n) components, ``E`` (m, n) encoder;
``X_T`` (N, n) the training frames and ``Z_T`` (N, m) their learned codes.

Encoding methods (`METHODS`)
----------------------------
``encoder``
    ``Z = h_{lambda_z / lambda_e}(X E^T)`` (`sae.model.encode_direct`): one
    matrix product and a soft threshold, no optimisation; needs ``lambda_e > 0``.
``exact``
    The Z step with ``C`` and ``E`` fixed, without the graph term
    (`sae.model.solve_codes` with ``lambda_g = 0``)::

        argmin_Z lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1 + lambda_e/2 ||Z - X E^T||^2

    solved as the training's Z step was (``ModelConfig.z_step_method``, with
    its stopping rule ``z_stop`` and inner tolerance): FISTA stopped on the
    relative change for a model trained with the graph term; for one trained
    without, every frame's lasso to the same per-frame duality gap, by its
    homotopy path from ``Z = 0`` (`sae.lars.lars_codes`: the minimiser that
    coordinate descent certifies; 24 times faster on real music at
    lambda_z = 0.03, where the codes are dense).
``exact_graph``
    The Z step with the graph term extended to the new frames (`NeighbourGraph`):
    each new frame joins the training graph through its K nearest training
    frames, whose learned codes stay fixed, so the graph term pulls its code
    towards theirs.  Needs ``lambda_g > 0`` and the training frames and codes
    (`TrainingGraph`).  Solved by FISTA (`sae.solvers.fista`).

Every clip is encoded on its own (its frames form one problem), so the codes of
a clip never depend on the other clips encoded with it.

Each method has its own classifier, fitted on the training clips coded as new
music coded by that method will be (`classifier_codes`): for "encoder" and
"exact", every training clip encoded on its own by the method (`ClipCodes`);
for "exact_graph", which pulls a new clip's codes towards the training codes,
the training codes themselves.  A classifier fitted on the training codes and
applied to "exact" codes sees another distribution of codes (the graph term
is missing, and at small ``lambda_z`` the sparsity differs): on the
development set's works that no model saw, 51.3 % against 55.4 % with the
classifier fitted on "exact" codes (README, "Using a trained model on new
music").

A new clip meets the model as the training clips did: its CQT frames
(`sae.audio.clip_cqt`, the store's CQT configuration), then
`sae.preprocess.clip_transform` and ``(F - offset) / scale`` with the
training statistics (no noise), then an encoding method, then the aggregation
of `sae.pooling` (`sae.pooling.aggregate_config`) and the classifier fitted
on the training clips.  `TrainedModel` does all of it (load one with
`sae.load_model`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.metaestimators import available_if

from sae.config import ClassifyConfig, CQTConfig, GraphConfig, ModelConfig, PreprocessConfig
from sae.terms import L1Norm, QuadraticTerm

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "NeighbourGraph",
    "TrainingGraph",
    "encode_frames",
    "ClipCodes",
    "classifier_codes",
    "available_methods",
    "TrainedModel",
    "InputError",
    "collect_audio",
    "collection_clips",
    "predict_files",
]

logger = logging.getLogger(__name__)

#: `ClipCodes` logs how many clips it has encoded at most this often, in seconds.
PROGRESS_SECONDS = 30.0

METHODS = ("encoder", "exact", "exact_graph")
"""Encoding methods of unseen frames (module docstring)."""

DEFAULT_METHOD = "exact"
"""The method a model uses unless told otherwise: every model has it, and it costs no search through the
training frames ("exact_graph" does, per clip: ~N_train x n_frames x n_bins multiply-adds)."""


# --------------------------------------------------------------------------- the graph term of new frames


class NeighbourGraph(QuadraticTerm):
    """The graph term of new frames joined to the training graph, the training codes held fixed.

    New frame ``u`` (row of ``Z``, (N', m)) is joined to its K nearest training
    frames ``j in N(u)`` with weights ``w_uj`` (``indices``, ``weights``, both
    (N', K)); the training frames keep their codes ``Z_T`` (N, m) and their
    degrees, and new frames are not joined to each other.  The part of
    ``lambda_g/2 tr(Z_all^T L Z_all)`` that depends on the new codes is then

        g(Z) = lambda_g/2 sum_u sum_{j in N(u)} w_uj ||a_u z_u - b_j z_j||^2

    with ``a = b = 1`` for the combinatorial Laplacian (``tr(Z^T (D - W) Z)`` is
    the sum over edges of ``w ||z_i - z_j||^2``) and ``a_u = 1 / sqrt(d_u)``,
    ``b_j = 1 / sqrt(d_j)`` for the normalised one (``d_j`` the training degree
    of ``j``, ``d_u`` the degree ``u`` has: the sum of its weights, plus 1 with
    self-loops).  As a quadratic term ``1/2 <Z, A(Z)> - <Z, B> + c``:

        A(Z) = lambda_g diag(s) Z,           s_u = a_u^2 sum_j w_uj          (N',)
        B    = lambda_g diag(a) W diag(b) Z_T, row u: lambda_g a_u sum_j w_uj b_j z_j   (N', m)
        c    = lambda_g/2 sum_u sum_j w_uj b_j^2 ||z_j||^2

    with ``W`` the (N', N) sparse weights; Lipschitz constant
    ``lambda_g max_u s_u``.  ``A`` is diagonal: the problem separates over
    new frames.  With ``lambda_z = 0`` the Z step's minimiser is, row by row,

        z_u (lambda_d C C^T + (lambda_e + lambda_g s_u) I) = lambda_d x_u C^T + lambda_e x_u E^T + B_u

    each new code pulled towards the (scaled) weighted mean of its neighbours'
    codes: the inductive extension of the transductive graph term.

    Parameters
    ----------
    neighbour_codes : ndarray (N', K, m)
        ``b_j z_j`` for the K neighbours of every new frame.
    weights : ndarray (N', K)
        ``w_uj``.
    scale : ndarray (N',)
        ``a_u``.
    weight : float
        ``lambda_g``.
    """

    def __init__(self, neighbour_codes: np.ndarray, weights: np.ndarray, scale: np.ndarray, weight: float) -> None:
        super().__init__(weight)
        neighbour_codes = np.asarray(neighbour_codes)
        n_rows, n_neighbors = np.shape(weights)
        if neighbour_codes.ndim != 3 or neighbour_codes.shape[:2] != (n_rows, n_neighbors):
            raise ValueError(
                f"neighbour_codes must be (N', K, m) with (N', K) = {(n_rows, n_neighbors)}, got {neighbour_codes.shape}"
            )
        dtype = neighbour_codes.dtype
        weights = np.asarray(weights, dtype=np.float64)
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != (n_rows,):
            raise ValueError(f"scale must be (N',) = ({n_rows},), got {scale.shape}")
        self.diagonal = (self.weight * scale**2 * weights.sum(axis=1)).astype(dtype)
        pulled = np.einsum("uk,ukm->um", weights, neighbour_codes.astype(np.float64))
        self._linear = (self.weight * scale[:, None] * pulled).astype(dtype)
        sq_norms = np.einsum("ukm,ukm->uk", neighbour_codes, neighbour_codes, dtype=np.float64)
        self._constant = 0.5 * self.weight * float(np.sum(weights * sq_norms))

    def apply(self, V: np.ndarray) -> np.ndarray:
        return self.diagonal[:, None] * V

    def _operator_norm(self) -> float:
        return float(self.diagonal.max(initial=0.0))


@dataclass(frozen=True)
class TrainingGraph:
    """What `NeighbourGraph` needs from the training: frames, codes, degrees and the graph's settings.

    Attributes
    ----------
    frames : array (N, n)
        The training frames ``X_T`` the graph was built on (a memory map is fine).
    codes : array (N, m)
        Their learned codes ``Z_T``.
    degrees : ndarray (N,) float64
        Their degrees ``d_j = sum_i W_ji`` in the training graph (self-loops included).
    sigma : float
        The training kernel width (`sae.graph.kernel_sigma`).
    config : GraphConfig
        Metric, kernel, K, self-loops and Laplacian kind of the training graph.
    """

    frames: Any
    codes: Any
    degrees: np.ndarray
    sigma: float
    config: GraphConfig

    def term(self, X: np.ndarray, lambda_g: float, *, block_size: int = 50_000) -> NeighbourGraph:
        """`NeighbourGraph` of new frames ``X`` (N', n): their K nearest training frames (exact search,
        `sae.knn.neighbors_among`) weighted by the training kernel (`sae.graph.kernel_weights`)."""
        from sae.graph import kernel_weights
        from sae.knn import neighbors_among

        config = self.config
        indices, distances = neighbors_among(X, self.frames, config.n_neighbors, metric=config.metric,
                                             block_size=block_size)
        weights = kernel_weights(distances, self.sigma, kernel=config.kernel)
        weights[indices < 0] = 0.0
        rows = np.maximum(indices, 0)
        codes = np.asarray(self.codes[rows.ravel()], dtype=X.dtype).reshape(*indices.shape, -1)
        if config.laplacian == "normalized":
            neighbour_degrees = self.degrees[rows]
            codes = codes / np.sqrt(neighbour_degrees)[..., None].astype(X.dtype)
            own = weights.sum(axis=1) + (1.0 if config.self_loops else 0.0)
            scale = np.divide(1.0, np.sqrt(own), out=np.zeros_like(own), where=own > 0)
        else:
            scale = np.ones(indices.shape[0])
        return NeighbourGraph(codes, weights, scale, lambda_g)


# --------------------------------------------------------------------------- encoding


def available_methods(config: ModelConfig, has_graph: bool) -> tuple[str, ...]:
    """The encoding methods a model trained with ``config`` supports (with its training graph or not).

    >>> available_methods(ModelConfig(lambda_e=1.0, lambda_g=10.0), has_graph=True)
    ('encoder', 'exact', 'exact_graph')
    >>> available_methods(ModelConfig(), has_graph=False)
    ('exact',)
    """
    return tuple(
        method for method, usable in zip(METHODS, (config.lambda_e > 0, True, config.lambda_g > 0 and has_graph))
        if usable
    )


def encode_frames(X: np.ndarray, components: np.ndarray, encoder: np.ndarray | None, config: ModelConfig,
                  method: str = "exact", graph: TrainingGraph | None = None) -> np.ndarray:
    """Codes ``Z`` (N', m) of new frames ``X`` (N', n) by one of `METHODS` (module docstring), in ``config.dtype``.

    ``config`` holds the weights the model was trained with; the Z step runs
    from ``Z = 0`` with its inner tolerance (``config.inner_tolerance``,
    ``atol``, ``max_inner``, ``fista_restart``), "exact" with the training's
    solver and stopping rule (``config.z_step_method``, ``config.z_stop``; the homotopy
    path for the per-frame solvers, module docstring).  ``graph`` is required by
    "exact_graph".  All of ``X`` is one problem: give one clip at a time for
    codes that do not depend on the batch (FISTA stops on the batch's objective).

    >>> C = np.eye(2, dtype=np.float32)
    >>> encode_frames(np.array([[3.0, 0.05]]), C, None, ModelConfig(n_atoms=2, lambda_d=1.0, lambda_z=0.1))
    array([[2.9, 0. ]], dtype=float32)
    """
    from sae.model import code_step_options, code_terms, encode_direct, solve_codes
    from sae.outer import inner_options
    from sae.solvers import fista

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = np.dtype(config.dtype)
    X = np.asarray(X, dtype=dtype)
    components = np.asarray(components, dtype=dtype)
    if X.ndim != 2 or X.shape[1] != components.shape[1]:
        raise ValueError(f"X must be (n_frames, {components.shape[1]}), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"X holds {np.count_nonzero(~np.isfinite(X))} NaN or infinite values: frames to encode "
                         "must be finite")
    if method == "encoder":
        if encoder is None or config.lambda_e <= 0:
            raise ValueError(f"method 'encoder' needs an encoder, learned only when lambda_e > 0 (got {config.lambda_e})")
        return encode_direct(X, encoder, config.lambda_z, config.lambda_e)
    zeros = np.zeros((X.shape[0], components.shape[0]), dtype=dtype)
    tolerance = inner_options(config)
    if method == "exact":
        solver = "lars" if config.z_step_method in ("cd", "lars") else config.z_step_method
        options = code_step_options(config) | dict(lambda_g=0.0, method=solver)
        return solve_codes(X, components, encoder if config.lambda_e > 0 else None, None, zeros, **options).solution
    if graph is None or config.lambda_g <= 0:
        raise ValueError(
            f"method 'exact_graph' needs lambda_g > 0 (got {config.lambda_g}) and the training graph (got {graph})"
        )
    terms = [graph.term(X, config.lambda_g), *code_terms(X, components, encoder, config.lambda_d, config.lambda_e)]
    return fista(terms, L1Norm(config.lambda_z), zeros, **tolerance, stop=config.z_stop).solution


class ClipCodes:
    """The codes of stored clips, each clip encoded on its own by ``method`` as new music is; read by rows.

    An array-like of shape (N, n_atoms) over the model input ``X`` (N, n_bins;
    numpy or Zarr) whose rows are clip after clip (``row_clips``, the rows of
    a clip contiguous): ``codes[a:b]`` reads rows ``a:b`` of ``X`` and encodes
    every clip among them with `encode_frames` (``graph`` for "exact_graph").
    A slice must start and end on clip boundaries (a clip encoded in two parts
    is not coded as a new clip is), which `sae.pooling.aggregate_clips`
    respects, reading by chunks of clips: only a chunk of frames and codes is
    in memory.  Progress is logged every `PROGRESS_SECONDS`.  ``X`` is the
    stored model input: with ``PreprocessConfig.noise_std > 0`` the training
    clips are coded with the noise they were trained with (new music gets none).

    >>> X = np.array([[3.0, 0.05], [0.5, 1.0], [2.0, 2.0]], dtype=np.float32)
    >>> codes = ClipCodes(X, np.array([0, 0, 1]), np.eye(2, dtype=np.float32), None,
    ...                   ModelConfig(n_atoms=2, lambda_d=1.0, lambda_z=0.1), "exact")
    >>> codes.shape, codes[0:3].astype(float).round(2).tolist()
    ((3, 2), [[2.9, 0.0], [0.4, 0.9], [1.9, 1.9]])
    >>> codes[0:1]
    Traceback (most recent call last):
    ...
    ValueError: rows 0:1 do not start and end on clip boundaries
    """

    def __init__(self, X: Any, row_clips: np.ndarray, components: np.ndarray, encoder: np.ndarray | None,
                 config: ModelConfig, method: str, graph: TrainingGraph | None = None) -> None:
        from sae.pooling import clip_runs

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.X, self.row_clips = X, np.asarray(row_clips)
        if self.row_clips.shape != (X.shape[0],):
            raise ValueError(f"row_clips must have one entry per row of X ({X.shape[0]}), got {self.row_clips.shape}")
        self.components, self.encoder, self.config, self.method, self.graph = components, encoder, config, method, graph
        self.shape = (int(X.shape[0]), int(components.shape[0]))
        self.dtype = np.dtype(config.dtype)
        self.ndim = 2
        self._done, self._started = 0, time.perf_counter()
        self._reported = self._started
        self._n_clips = clip_runs(self.row_clips)[0].size if self.row_clips.size else 0

    def _boundary(self, row: int) -> bool:
        return row in (0, self.shape[0]) or bool(self.row_clips[row - 1] != self.row_clips[row])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        from sae.pooling import clip_runs, read_rows

        if not isinstance(rows, slice):
            raise TypeError(f"ClipCodes is read by slices of rows, got {rows!r}")
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"ClipCodes is read by contiguous rows, got a step of {step}")
        if not (self._boundary(start) and self._boundary(stop)):
            raise ValueError(f"rows {start}:{stop} do not start and end on clip boundaries")
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        if stop == start:
            return out
        frames = read_rows(self.X, start, stop)
        _, starts, stops = clip_runs(self.row_clips[start:stop])
        for a, b in zip(starts, stops):
            out[a:b] = encode_frames(frames[a:b], self.components, self.encoder, self.config, self.method, self.graph)
        self._done += starts.size
        if time.perf_counter() - self._reported >= PROGRESS_SECONDS:
            self._reported = time.perf_counter()
            logger.info("encoded %d of %d clips on their own (method %s, %.0f s)", self._done, self._n_clips,
                        self.method, self._reported - self._started)
        return out


def classifier_codes(method: str, X: Any, row_clips: np.ndarray, training_codes: Any, components: np.ndarray,
                     encoder: np.ndarray | None, config: ModelConfig) -> Any:
    """The codes of the training rows that the classifier of ``method`` is fitted on (module docstring).

    ``training_codes`` (N, m) for "exact_graph", which encodes a new clip towards
    them; else `ClipCodes` of ``X`` (N, n): every training clip encoded on its
    own by ``method``, lazily, as `sae.pooling.aggregate_clips` reads it.
    """
    if method == "exact_graph":
        return training_codes
    return ClipCodes(X, row_clips, components, encoder, config, method)


# --------------------------------------------------------------------------- the trained model


def _has_classifier_method(name: str) -> Any:
    return lambda model: all(hasattr(classifier, name) for classifier in model.classifiers_.values())


class TrainedModel:
    """A trained model applied to new music, with scikit-learn's conventions.

    Load one from a model folder with `sae.load_model` (`sae.artifact`).  A
    *clip* is an audio file (path), a mono waveform (1-D, at
    ``cqt.sample_rate``, at least ``cqt.clip_samples`` long) or the CQT frames
    of one clip as ingested (2-D, (F, n_bins), `sae.audio.clip_cqt`); ``clips``
    is one clip or a sequence of them (a 3-D array is a stack of frames).

    ========================  ======================================================
    ``model_input(clip)``     the scaled frames X (n_rows, n_bins) the model encodes
    ``transform(clips)``      codes (n_clips * n_rows, n_atoms), clip after clip
    ``features(clips)``       aggregated vectors (n_clips * V, n_atoms * P), as classified
    ``predict(clips)``        label names (n_clips,): majority vote of the clip's vectors
    ``predict_scores(clips)`` vote shares (n_clips, n_classes), rows summing to 1
    ``predict_proba``         mean class probabilities of the clip's vectors (if the classifier has them)
    ``decision_function``     mean decision values of the clip's vectors (if the classifier has them)
    ========================  ======================================================

    ``method`` (default ``self.method``) is one of `METHODS` among
    ``self.methods``; it chooses the encoding and the classifier (each method
    has its own, fitted on the training clips coded as that method codes new
    music: `classifier_codes`).  Columns of scores are ``classes_`` (label names).

    Attributes
    ----------
    cqt, preprocess, model, classify, graph_config
        The configurations the model was trained with (``model`` with the weights
        it was trained with, rescaled ones included).
    offset_, scale_ : ndarray (n_bins,) float64
        Scaling statistics of the training frames.
    components_, encoder_ : ndarray (n_atoms, n_bins)
        ``C`` and ``E`` (``encoder_`` None when ``lambda_e = 0``).
    classifiers_ : dict of str to scikit-learn classifier
        Per method, fitted on the window vectors of every training clip (label indices)
        coded as that method codes new music (`classifier_codes`).
    classifier_ : scikit-learn classifier
        The classifier of the default ``method``.
    labels : list of str
        Label names of the training store (``labels[i]`` is label index i).
    classes_ : ndarray of str
        Names of the classifier's classes, in its order.
    graph : TrainingGraph or None
        The training frames, codes and graph (method "exact_graph"; None without graph term).
    methods : tuple of str
        The encoding methods this model has (`available_methods`); ``method`` is its default.
    info : dict
        What the model folder records besides (accuracies, source, versions).
    """

    def __init__(
        self,
        *,
        cqt: CQTConfig,
        preprocess: PreprocessConfig,
        model: ModelConfig,
        classify: ClassifyConfig,
        offset: np.ndarray,
        scale: np.ndarray,
        components: np.ndarray,
        encoder: np.ndarray | None,
        classifiers: dict[str, Any],
        labels: Sequence[str],
        graph: TrainingGraph | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.cqt, self.preprocess, self.model, self.classify = cqt, preprocess, model, classify
        self.graph = graph
        self.graph_config = graph.config if graph is not None else None
        self.offset_ = np.asarray(offset, dtype=np.float64)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        self.components_ = np.asarray(components)
        self.encoder_ = None if encoder is None else np.asarray(encoder)
        self.labels = list(labels)
        self.methods = available_methods(model, graph is not None)
        missing = sorted(set(self.methods) - set(classifiers))
        if missing:
            raise ValueError(f"no classifier for the methods {missing} of this model (methods {self.methods})")
        self.classifiers_ = {name: classifiers[name] for name in self.methods}
        classes = {tuple(np.asarray(c.classes_).tolist()) for c in self.classifiers_.values()}
        if len(classes) != 1:
            raise ValueError(f"the classifiers of the methods know different classes: {sorted(classes)}")
        self.classes_ = np.array([self.labels[int(k)] for k in classes.pop()])
        self.method = DEFAULT_METHOD
        self.method = self.resolve_method(method)
        self.info = dict(info or {})

    @property
    def classifier_(self) -> Any:
        """The classifier of the default ``method``."""
        return self.classifiers_[self.method]

    def _classifier(self, method: str | None) -> Any:
        """The classifier of ``method`` (default: the model's), fitted on codes made as that method makes them."""
        return self.classifiers_[self.resolve_method(method)]

    def __repr__(self) -> str:
        return (f"TrainedModel(n_atoms={self.model.n_atoms}, classes={self.classes_.tolist()}, "
                f"method={self.method!r}, methods={self.methods})")

    @property
    def n_rows(self) -> int:
        """Rows of model input per clip (frames kept by the preprocessing)."""
        from sae.audio import frames_per_clip

        probe = np.zeros((frames_per_clip(self.cqt), self.cqt.n_bins))
        return int(self._scaled(probe).shape[0])

    def resolve_method(self, method: str | None) -> str:
        """``method``, or the model's default when None; a method this model does not have is a ValueError."""
        method = self.method if method is None else method
        if method not in self.methods:
            raise ValueError(f"method must be one of this model's methods {self.methods}, got {method!r}")
        return method

    # ----------------------------------------------------------------- input

    def clip_frames(self, clip: Any) -> np.ndarray:
        """The CQT frames (F, n_bins) float32 of one clip (path, waveform or frames; class docstring).

        Raises `sae.audio.ClipError` for an audio file that cannot be used (the kinds of ingestion).
        """
        from sae.audio import clip_cqt, clip_frames

        if isinstance(clip, str | os.PathLike):
            return clip_frames(clip, self.cqt)
        clip = np.asarray(clip)
        if clip.ndim == 1:
            if clip.shape[0] < self.cqt.clip_samples:
                raise ValueError(f"a waveform must hold at least clip_samples = {self.cqt.clip_samples} samples "
                                 f"at {self.cqt.sample_rate} Hz, got {clip.shape[0]}")
            return clip_cqt(clip[: self.cqt.clip_samples], self.cqt)
        if clip.ndim == 2 and clip.shape[1] == self.cqt.n_bins:
            return clip.astype(np.float32, copy=False)
        raise ValueError(f"a clip must be a path, a 1-D waveform or 2-D frames (F, {self.cqt.n_bins}), "
                         f"got an array of shape {clip.shape}")

    def _scaled(self, frames: np.ndarray) -> np.ndarray:
        from sae.preprocess import clip_transform

        F = clip_transform(frames, self.preprocess)
        return ((F - self.offset_) / self.scale_).astype(self.model.dtype)

    def model_input(self, clip: Any) -> np.ndarray:
        """``X = (clip_transform(frames) - offset) / scale`` (n_rows, n_bins) of one clip, in the model's dtype."""
        return self._scaled(self.clip_frames(clip))

    @staticmethod
    def _clip_list(clips: Any) -> list[Any]:
        if isinstance(clips, str | os.PathLike):
            return [clips]
        if isinstance(clips, np.ndarray):
            return list(clips) if clips.ndim == 3 else [clips]
        return list(clips)

    # ----------------------------------------------------------------- codes and vectors

    def encode(self, X: np.ndarray, method: str | None = None) -> np.ndarray:
        """Codes (n_rows, n_atoms) of the model input of ONE clip (`model_input`), by ``method``."""
        method = self.resolve_method(method)
        return encode_frames(X, self.components_, self.encoder_, self.model, method, self.graph)

    def transform(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Codes (n_clips * n_rows, n_atoms) of ``clips``, clip after clip; each clip encoded on its own."""
        codes = [self.encode(self.model_input(clip), method) for clip in self._clip_list(clips)]
        if not codes:
            raise ValueError("clips is empty")
        return np.concatenate(codes)

    def vectors(self, codes: np.ndarray, n_clips: int) -> np.ndarray:
        """Window vectors (n_clips * V, n_atoms * P) of the codes of ``n_clips`` clips (`sae.pooling.aggregate_config`)."""
        from sae.pooling import aggregate_config

        codes = np.asarray(codes)
        if n_clips < 1 or codes.shape[0] % n_clips:
            raise ValueError(f"codes ({codes.shape[0]} rows) must hold the rows of {n_clips} clips of equal length")
        row_clips = np.repeat(np.arange(n_clips), codes.shape[0] // n_clips)
        return aggregate_config(codes, row_clips, self.classify).vectors

    def features(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Aggregated vectors (n_clips * V, n_atoms * P, P pooling statistics) of ``clips``: what the classifier sees."""
        clips = self._clip_list(clips)
        return self.vectors(self.transform(clips, method=method), len(clips))

    # ----------------------------------------------------------------- classification

    def _per_clip(self, values: np.ndarray, n_clips: int) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(n_clips, -1, values.shape[-1]).mean(axis=1)

    def scores_of_vectors(self, vectors: np.ndarray, n_clips: int, method: str | None = None) -> np.ndarray:
        """Vote shares (n_clips, n_classes) of the window vectors of ``n_clips`` clips (`sae.classify.vote_shares`)
        by the classifier of ``method`` (the method that coded them)."""
        from sae.classify import vote_shares

        classifier = self._classifier(method)
        predicted = classifier.predict(vectors)
        groups = np.repeat(np.arange(n_clips), vectors.shape[0] // n_clips)
        return vote_shares(predicted, groups, classifier.classes_)[1]

    def predict_scores(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Share of each class (columns ``classes_``) among the predictions of each clip's vectors (n_clips, n_classes)."""
        clips = self._clip_list(clips)
        return self.scores_of_vectors(self.features(clips, method=method), len(clips), method)

    def predict(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Label name of each clip (n_clips,): the majority vote of its vectors (ties: the first class)."""
        return self.classes_[np.argmax(self.predict_scores(clips, method=method), axis=1)]

    @available_if(_has_classifier_method("predict_proba"))
    def predict_proba(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Mean class probabilities (n_clips, n_classes) of each clip's vectors."""
        clips = self._clip_list(clips)
        probabilities = self._classifier(method).predict_proba(self.features(clips, method=method))
        return self._per_clip(probabilities, len(clips))

    @available_if(_has_classifier_method("decision_function"))
    def decision_function(self, clips: Any, *, method: str | None = None) -> np.ndarray:
        """Mean decision values (n_clips, n_classes) of each clip's vectors (two classes: (n_clips,))."""
        clips = self._clip_list(clips)
        values = np.asarray(self._classifier(method).decision_function(self.features(clips, method=method)))
        if values.ndim == 1:
            return values.reshape(len(clips), -1).mean(axis=1)
        return self._per_clip(values, len(clips))


# --------------------------------------------------------------------------- input files


class InputError(ValueError):
    """A command-line input that cannot be used at all (nothing was done); the message names it."""


def _audio_extensions() -> tuple[str, ...]:
    from sae.audio import SUPPORTED_EXTENSIONS

    return SUPPORTED_EXTENSIONS


def _audio_below(folder: Path) -> list[Path]:
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [Path(root) / name for name in sorted(files)
                  if not name.startswith(".") and Path(name).suffix.lower() in _audio_extensions()]
    return found


def collect_audio(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The audio files named by command-line arguments: files, and every audio file below each folder.

    Checked before any work: every argument must exist; a file must have an
    audio extension (`sae.audio.SUPPORTED_EXTENSIONS`); a folder must hold at
    least one audio file (hidden files and folders are skipped, other files
    ignored).  Files are returned once each, in the order given (a folder's
    sorted).  Whether a file decodes is found out later, per file.

    Raises
    ------
    InputError
        Naming the argument and what is wrong with it.
    """
    if not paths:
        raise InputError("no input: give audio files or folders")
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = _audio_below(path)
            if not found:
                raise InputError(f"folder {str(path)!r} holds no audio file ({', '.join(_audio_extensions())})")
            out += [str(p) for p in found]
        elif path.exists():
            if path.suffix.lower() not in _audio_extensions():
                raise InputError(f"{str(path)!r} is not an audio file: extension {path.suffix or '(none)'!r}, "
                                 f"supported: {', '.join(_audio_extensions())}")
            out.append(str(path))
        else:
            raise InputError(f"{str(path)!r}: no such file or folder")
    return list(dict.fromkeys(out))


def collection_clips(data: str | os.PathLike) -> list[tuple[str, str, str]]:
    """The clips of a collection to encode: a CSV manifest (`sae.datasets.read_manifest`) or a folder.

    In a folder, every audio file below it (`collect_audio`) is a clip; its
    label is the name of its first sub-folder (GTZAN layout), or "" for files
    directly in the folder (music without labels); its id is its path relative
    to the folder, without extension (with it where two files share a stem).

    Returns
    -------
    list of (clip_id, path, label)
    """
    from sae.datasets import read_manifest

    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        return read_manifest(data)
    if not data.is_dir():
        raise InputError(f"data must be a folder of audio files or a .csv manifest (path,label), got {str(data)!r}")
    clips, seen = [], set()
    for file in map(Path, collect_audio([data])):
        relative = file.relative_to(data)
        clip_id = relative.with_suffix("").as_posix()
        if clip_id in seen:
            clip_id = relative.as_posix()
        seen.add(clip_id)
        clips.append((clip_id, str(file), relative.parts[0] if len(relative.parts) > 1 else ""))
    return clips


def predict_files(model: TrainedModel, paths: Sequence[str], *, method: str | None = None) -> list[dict[str, Any]]:
    """Classify audio files one by one; a file that cannot be used is reported, the others proceed.

    Returns
    -------
    list of dict
        One per file, in order: ``path``, ``status`` ("ok" or "error"),
        ``seconds``; when ok, ``label`` and ``scores`` (class name -> vote
        share, best first); in error, ``error_kind`` (`sae.audio.ERROR_KINDS`)
        and ``error`` (the message).
    """
    from sae.audio import ClipError

    method = model.resolve_method(method)
    records = []
    for path in paths:
        start = time.perf_counter()
        record: dict[str, Any] = {"path": str(path)}
        try:
            X = model.model_input(path)
        except ClipError as error:
            record.update(status="error", error_kind=error.kind, error=error.message)
        else:
            vectors = model.vectors(model.encode(X, method), 1)
            shares = model.scores_of_vectors(vectors, 1, method)[0]
            order = np.argsort(-shares, kind="stable")
            record.update(status="ok", label=str(model.classes_[order[0]]),
                          scores={str(model.classes_[k]): float(shares[k]) for k in order})
        record["seconds"] = time.perf_counter() - start
        records.append(record)
    return records
