"""The kNN graph between frames: edge weights, symmetrisation, Laplacians.

Everything here is plain numpy / scipy and works on the neighbour lists of
`sae.knn` (self excluded):

- ``indices``   (N, K) int, ``indices[i, k]`` the k-th nearest neighbour of frame i;
  a negative index marks a missing neighbour (an approximate search may return
  fewer than K) and is ignored; an entry equal to ``i`` is ignored too (the
  self-loop is added explicitly, see ``self_loops``);
- ``distances`` (N, K) float, the matching distances (``inf`` where missing).

Matrices are returned as `scipy.sparse.csr_array` (the sparse *array* API:
``@`` is the matrix product, ``*`` is element-wise), float32 by default, with
sorted indices.  Orientation as everywhere in ``sae``: codes ``Z`` are
(N, m), a row per frame, so the graph term reads ``tr(Z^T L Z)``.

The options of the functions carry the names of the fields of
`sae.config.GraphConfig` (``kernel``, ``sigma_factor``, ``self_loops``,
``laplacian``), as keyword-only arguments; `graph_options` extracts them from a
config.

Example: the spectrum of the normalised Laplacian lies in [0, 2].

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.random((40, 3))
>>> D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
>>> np.fill_diagonal(D2, np.inf)
>>> indices = np.argsort(D2, axis=1)[:, :5]
>>> distances = np.sqrt(np.take_along_axis(D2, indices, axis=1))
>>> L = laplacian_from_neighbors(indices, distances, laplacian="normalized")
>>> L.shape, L.dtype
((40, 40), dtype('float32'))
>>> eigenvalues = np.linalg.eigvalsh(L.toarray().astype(np.float64))
>>> bool(eigenvalues.min() > -1e-5 and eigenvalues.max() < 2 + 1e-5)
True
>>> C = laplacian_from_neighbors(indices, distances, laplacian="combinatorial")
>>> bool(np.allclose(C.sum(axis=1), 0, atol=1e-5))
True
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from sae.progress import Interrupt, ProgressCallback, go_on

logger = logging.getLogger(__name__)

KERNELS = ("exp", "gaussian")
"""Edge weight kernels: ``exp(-d / sigma)`` and ``exp(-d^2 / (2 sigma^2))``."""

LAPLACIANS = ("normalized", "combinatorial")
"""Laplacian kinds: ``D^-1/2 (D - W) D^-1/2`` and ``D - W``."""

GRAPH_OPTIONS = ("kernel", "sigma_factor", "self_loops", "laplacian")
"""Fields of `sae.config.GraphConfig` that the functions of this module take."""


def graph_options(config: Any) -> dict[str, Any]:
    """The keyword arguments of this module taken from a `sae.config.GraphConfig`.

    >>> from sae.config import GraphConfig
    >>> graph_options(GraphConfig(kernel="gaussian"))["kernel"]
    'gaussian'
    """
    return {name: getattr(config, name) for name in GRAPH_OPTIONS}


def _check_neighbors(indices: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices)
    distances = np.asarray(distances)
    if indices.ndim != 2:
        raise ValueError(f"indices must be a 2-D array (n_samples, n_neighbors), got shape {indices.shape}")
    if distances.shape != indices.shape:
        raise ValueError(
            f"distances must have the shape of indices {indices.shape}, got shape {distances.shape}"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    if indices.size and indices.max() >= indices.shape[0]:
        raise ValueError(
            f"indices must be < n_samples = {indices.shape[0]}, got a maximum of {int(indices.max())}"
        )
    valid = indices >= 0
    if np.any(distances[valid] < 0) or np.any(np.isnan(distances[valid])):
        raise ValueError("distances must be non-negative numbers where indices are valid (>= 0)")
    return indices, distances


def kernel_sigma(distances: np.ndarray, *, sigma_factor: float = 1.0) -> float:
    """The kernel width: ``sigma = sigma_factor * mean_i d_i,K``.

    ``d_i,K`` is the distance from frame i to its K-th (farthest listed)
    neighbour: the largest finite entry of row i of ``distances`` (N, K).
    Rows without any finite distance are left out of the mean.

    >>> kernel_sigma(np.array([[1.0, 2.0], [0.5, 4.0]]), sigma_factor=0.5)
    1.5
    """
    if not sigma_factor > 0:
        raise ValueError(f"sigma_factor must be > 0, got {sigma_factor!r}")
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[1] == 0:
        raise ValueError(f"distances must be a 2-D array (n_samples, n_neighbors >= 1), got shape {distances.shape}")
    finite = np.where(np.isfinite(distances), distances, -np.inf)
    kth = finite.max(axis=1)
    kth = kth[np.isfinite(kth)]
    if kth.size == 0:
        raise ValueError("distances has no finite entry: cannot compute sigma")
    return float(sigma_factor * kth.mean())


def kernel_weights(
    distances: np.ndarray, sigma: float, *, kernel: Literal["exp", "gaussian"] = "exp"
) -> np.ndarray:
    """Edge weights from distances, element-wise, same shape as ``distances``.

    - ``kernel="exp"`` (the original code): ``w = exp(-d / sigma)``;
    - ``kernel="gaussian"`` (the report):   ``w = exp(-d^2 / (2 sigma^2))``.

    ``sigma = 0`` (every listed neighbour is a duplicate) is the limit
    sigma -> 0+: ``w = 1`` where ``d = 0``, else 0.  Infinite distances give 0.

    >>> kernel_weights(np.array([0.0, 1.0]), 1.0, kernel="exp").round(4).tolist()
    [1.0, 0.3679]
    >>> kernel_weights(np.array([0.0, 1.0]), 1.0, kernel="gaussian").round(4).tolist()
    [1.0, 0.6065]
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    d = np.asarray(distances, dtype=np.float64)
    if sigma == 0:
        return (d == 0).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if kernel == "exp":
            return np.exp(-d / sigma)
        return np.exp(-(d**2) / (2.0 * sigma**2))


def adjacency_matrix(
    indices: np.ndarray,
    distances: np.ndarray,
    *,
    kernel: Literal["exp", "gaussian"] = "exp",
    sigma_factor: float = 1.0,
    self_loops: bool = True,
    dtype: Any = np.float32,
) -> sp.csr_array:
    """The symmetric weight matrix W (N, N) of a kNN graph.

    With ``A[i, j] = w(d_ij)`` for every listed neighbour j of i (weights by
    `kernel_weights`, ``sigma`` by `kernel_sigma` over all rows) and 0 elsewhere,

        W = max(A, A^T)  (element-wise), plus  W_ii = 1  if ``self_loops``.

    So an edge exists when either end lists the other, with the larger of the
    two weights (they are equal for an exact search).

    Parameters
    ----------
    indices : np.ndarray
        (N, K) int, neighbours of each frame; negative entries and ``i`` itself
        are ignored.
    distances : np.ndarray
        (N, K) float, the matching distances.
    kernel : {"exp", "gaussian"}
        Weight kernel, see `kernel_weights`.
    sigma_factor : float
        ``sigma = sigma_factor * mean distance to the K-th neighbour``.
    self_loops : bool
        Add ``W_ii = 1`` (the original code kept self-loops).
    dtype : numpy dtype
        Dtype of the result (computations in float64).

    Returns
    -------
    scipy.sparse.csr_array
        (N, N), symmetric, non-negative, sorted indices.
    """
    indices, distances = _check_neighbors(indices, distances)
    n_samples = indices.shape[0]
    sigma = kernel_sigma(distances, sigma_factor=sigma_factor)
    weights = kernel_weights(distances, sigma, kernel=kernel)
    rows = np.repeat(np.arange(n_samples, dtype=np.int64), indices.shape[1])
    cols = indices.ravel().astype(np.int64)
    vals = weights.ravel()
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # A neighbour listed twice keeps its largest weight (summing would double it).
    order = np.lexsort((-vals, cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    A = sp.csr_array((vals[first], (rows[first], cols[first])), shape=(n_samples, n_samples))
    W = sp.csr_array(A.maximum(A.T))
    if self_loops:
        W = sp.csr_array(W + sp.eye_array(n_samples, format="csr"))
    W = W.astype(dtype)
    W.sort_indices()
    logger.debug("adjacency: N=%d, sigma=%.6g, nnz=%d", n_samples, sigma, W.nnz)
    return W


def degree_vector(adjacency: sp.sparray | sp.spmatrix) -> np.ndarray:
    """Degrees ``d_i = sum_j W_ij`` (N,) float64 (self-loops count once)."""
    return np.asarray(adjacency.sum(axis=1), dtype=np.float64).ravel()


def laplacian_matrix(
    adjacency: sp.sparray | sp.spmatrix,
    *,
    laplacian: Literal["normalized", "combinatorial"] = "normalized",
    dtype: Any = np.float32,
) -> sp.csr_array:
    """The graph Laplacian L (N, N) of a symmetric weight matrix W (N, N).

    With the degrees ``d = W 1`` and ``D = diag(d)``:

    - ``"combinatorial"``: ``L = D - W``.  Rows sum to 0; self-loops cancel
      (``L_ii = sum_{j != i} W_ij``).  For Z (N, m),
      ``tr(Z^T L Z) = 1/2 sum_ij W_ij ||z_i - z_j||^2``.
    - ``"normalized"``: ``L = D^-1/2 (D - W) D^-1/2``, which is
      ``I - D^-1/2 W D^-1/2`` on every node of positive degree.  Its
      eigenvalues lie in [0, 2] and
      ``tr(Z^T L Z) = 1/2 sum_ij W_ij ||z_i / sqrt(d_i) - z_j / sqrt(d_j)||^2``.

    Isolated nodes (``d_i = 0``) take ``(D^-1/2)_ii = 0``: their row and column
    of L are zero in both kinds, so the graph term leaves their codes free.
    (With self-loops no node is isolated.)

    Parameters
    ----------
    adjacency : sparse (N, N)
        Symmetric, non-negative weights, e.g. from `adjacency_matrix`.
    laplacian : {"normalized", "combinatorial"}
        Kind of Laplacian.
    dtype : numpy dtype
        Dtype of the result (computations in float64).

    Returns
    -------
    scipy.sparse.csr_array
        (N, N), symmetric, sorted indices.
    """
    if laplacian not in LAPLACIANS:
        raise ValueError(f"laplacian must be one of {LAPLACIANS}, got {laplacian!r}")
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be a square (N, N) matrix, got shape {adjacency.shape}")
    W = sp.csr_array(adjacency, dtype=np.float64)
    n_samples = W.shape[0]
    degrees = degree_vector(W)
    L = sp.csr_array(sp.diags_array(degrees, format="csr") - W)
    if laplacian == "normalized":
        inv_sqrt = np.zeros_like(degrees)
        positive = degrees > 0
        inv_sqrt[positive] = 1.0 / np.sqrt(degrees[positive])
        scale = sp.diags_array(inv_sqrt, format="csr")
        L = sp.csr_array(scale @ L @ scale)
    n_isolated = int(np.sum(degrees == 0))
    if n_isolated:
        logger.info("laplacian: %d of %d nodes are isolated (zero rows in L)", n_isolated, n_samples)
    L = L.astype(dtype)
    L.sum_duplicates()
    L.eliminate_zeros()
    L.sort_indices()
    return L


def laplacian_norm_bound(abs_row_sum_max: float, kind: str | None) -> float:
    """An upper bound of ``||L||_2`` without iteration: Gershgorin's, capped at 2 for a normalised Laplacian.

    ``abs_row_sum_max`` is ``max_i sum_j |L_ij|`` (Gershgorin: every eigenvalue
    of a symmetric ``L`` lies within it); ``kind`` the kind of Laplacian
    (`LAPLACIANS`, None if unknown).  The spectrum of the normalised Laplacian
    ``I - D^-1/2 W D^-1/2`` lies in [0, 2] (``D^-1/2 W D^-1/2`` is similar to
    the row-stochastic ``D^-1 W``), while its Gershgorin bound exceeds 2 when
    neighbouring degrees differ: the cap keeps the Z step's step size from
    being smaller than it need be.

    >>> laplacian_norm_bound(4.13, "normalized"), laplacian_norm_bound(4.13, "combinatorial")
    (2.0, 4.13)
    """
    return min(float(abs_row_sum_max), 2.0) if kind == "normalized" else float(abs_row_sum_max)


def laplacian_from_neighbors(
    indices: np.ndarray,
    distances: np.ndarray,
    *,
    kernel: Literal["exp", "gaussian"] = "exp",
    sigma_factor: float = 1.0,
    self_loops: bool = True,
    laplacian: Literal["normalized", "combinatorial"] = "normalized",
    dtype: Any = np.float32,
) -> sp.csr_array:
    """The Laplacian (N, N) of the kNN graph: `adjacency_matrix` then `laplacian_matrix`.

    Defaults are the thesis's: exp kernel, sigma = mean distance to the K-th
    neighbour, self-loops, normalised Laplacian, float32.  With
    ``cfg = GraphConfig(...)``: ``laplacian_from_neighbors(i, d, **graph_options(cfg))``.
    """
    W = adjacency_matrix(
        indices, distances, kernel=kernel, sigma_factor=sigma_factor, self_loops=self_loops, dtype=np.float64
    )
    return laplacian_matrix(W, laplacian=laplacian, dtype=dtype)


# --------------------------------------------------------------------------- the graph stage in a store


RECALL_BLOCK = 8192
"""The recall check's exact search (`sae.knn.sample_recall`) runs by blocks of at most this many frames."""


def exact_tiles(n_rows: int, config: Any) -> int:
    """How many exact-distance tile tasks (BLAS products) the graph stage of ``n_rows`` frames runs: the exact
    kNN's one per pair of blocks, else the recall check's one per block (none without it)."""
    if config.method == "exact":
        return math.ceil(n_rows / config.block_size) ** 2
    return math.ceil(n_rows / min(config.block_size, RECALL_BLOCK)) if config.recall_sample > 0 else 0


def run_graph(
    store_path: Any,
    preprocess_key: str,
    config: Any,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    interrupt: Interrupt = go_on,
) -> dict[str, Any]:
    """kNN graph and Laplacian of stored preprocessed frames, written to ``graph/<key>``.

    Reads X (N, n_bins) of ``preprocess/<preprocess_key>`` (`sae.preprocess`),
    runs `sae.knn.nearest_neighbors` with the options of ``config`` (a
    `sae.config.GraphConfig`), measures recall@K of an approximate search
    ("approximate" or "faiss") against exact search on ``config.recall_sample`` random frames, builds W
    and L (`adjacency_matrix`, `laplacian_matrix`) and writes, in the stage
    group ``graph/<key>`` (`sae.store.keys.graph_key`):

    - ``laplacian`` and ``adjacency``: CSR (N, N) float32 (`sae.store.write_sparse`);
    - ``indices`` int32 (N, K) and ``distances`` float32 (N, K): the neighbour lists;
    - attributes: ``config`` (the GraphConfig), ``preprocess`` (key), ``n_rows``,
      ``n_neighbors``, ``sigma``, ``nnz``, ``recall`` (null for the exact method
      or ``recall_sample = 0``), ``recall_queries``, ``knn_seconds``.

    Skipped when the group is complete (unless ``overwrite``).  Dask work runs
    on the active client, else the threaded scheduler.  ``progress(done, total)``
    is called as the kNN search completes its steps (each block's build, its
    queries and merges: `sae.knn`; `sae.progress`); ``interrupt`` (`sae.progress.Interrupt`) before the
    group is replaced and before it is marked complete.
    The "faiss" method holds its index of all N frames in this process and
    runs on all its cores (`sae.knn.faiss_neighbors`).

    Returns
    -------
    dict
        ``key``, ``n_rows``, ``nnz``, ``recall``, ``recall_queries``, ``skipped``.
    """
    import time

    from sae import store
    from sae.knn import nearest_neighbors, sample_recall
    from sae.store.keys import GRAPH, PREPROCESS, graph_key
    from sae.preprocess import preprocessed_frames

    key = graph_key(preprocess_key, config)
    root = store.open_store(store_path, mode="r+")
    if store.is_complete(root, GRAPH, key) and not overwrite:
        attrs = dict(store.stage_group(root, GRAPH, key, mode="r").attrs)
        logger.info("graph %s: complete, skipped", key)
        return {"key": key, "skipped": True, **{name: attrs.get(name) for name in ("n_rows", "nnz", "recall", "recall_queries")}}
    X = preprocessed_frames(root, preprocess_key)
    start = time.perf_counter()
    indices, distances = nearest_neighbors(
        X,
        config.n_neighbors,
        method=config.method,
        metric=config.metric,
        block_size=config.block_size,
        n_neighbors_build=max(config.n_neighbors_build, config.n_neighbors),
        search_epsilon=config.search_epsilon,
        random_state=config.random_state,
        n_jobs=None if config.method == "faiss" else 1,
        hnsw_m=config.hnsw_m,
        hnsw_ef_construction=config.hnsw_ef_construction,
        hnsw_ef_search=config.hnsw_ef_search,
        progress=progress,
    )
    knn_seconds = time.perf_counter() - start
    recall, recall_queries = None, 0
    if config.method != "exact" and config.recall_sample > 0:
        measured = sample_recall(
            X, indices, distances, n_queries=config.recall_sample, metric=config.metric,
            block_size=min(config.block_size, RECALL_BLOCK), random_state=config.random_state,
        )
        recall, recall_queries = measured["recall"], measured["n_queries"]
    W = adjacency_matrix(
        indices, distances, kernel=config.kernel, sigma_factor=config.sigma_factor,
        self_loops=config.self_loops, dtype=np.float64,
    )
    L = laplacian_matrix(W, laplacian=config.laplacian)
    interrupt(f"graph {key}, before it writes")
    group = store.stage_group(root, GRAPH, key, config=config, mode="w")
    store.write_sparse(group, "laplacian", L)
    store.write_sparse(group, "adjacency", W.astype(np.float32))
    for name, values in (("indices", indices.astype(np.int32)), ("distances", distances.astype(np.float32))):
        store.create_array(group, name, shape=values.shape, dtype=values.dtype,
                           chunks=(min(len(values), 1 << 16), values.shape[1]), data=values)
    info = {
        "preprocess": preprocess_key,
        "n_rows": int(X.shape[0]),
        "n_neighbors": int(config.n_neighbors),
        "sigma": kernel_sigma(distances, sigma_factor=config.sigma_factor),
        "nnz": int(L.nnz),
        "recall": recall,
        "recall_queries": int(recall_queries),
        "knn_seconds": round(knn_seconds, 3),
    }
    interrupt(f"graph {key}, written, before it is marked complete")
    group.attrs.update(info)
    store.mark_complete(group, inputs=[store.stage_group(root, PREPROCESS, preprocess_key, mode="r")])
    logger.info("graph %s: N=%d, nnz(L)=%d, recall=%s, kNN %.1f s", key, info["n_rows"], info["nnz"], recall, knn_seconds)
    return {"key": key, "skipped": False, **{name: info[name] for name in ("n_rows", "nnz", "recall", "recall_queries")}}


def open_graph(store_path: Any, key: str) -> Any:
    """The complete stage group ``graph/<key>``; read L with ``sae.store.read_sparse(group, "laplacian")``."""
    from sae import store
    from sae.store.keys import GRAPH

    if not store.is_complete(store_path, GRAPH, key):
        raise ValueError(f"the store has no complete graph for key {key!r}: run run_graph first")
    return store.stage_group(store_path, GRAPH, key, mode="r")
