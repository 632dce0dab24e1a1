"""Exact kNN: blocked brute force on Dask, the top-K merge of candidate lists, search among reference frames.

One Dask task per (query block, reference block) pair computes the
distance tile in float64, in row slices of at most `TILE_ENTRIES`
entries (so never more than ``block_size**2``), and keeps its top K
(`tile_top_k`); one task per query block merges the B candidate lists (top K
by distance, ties by index, `merge_top_k`).  Cost: N^2 n_features / 2
multiply-adds in B^2 tasks; memory per task: two blocks and one tile slice.
The other methods merge their candidates with `merge_top_k` too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import dask
import numpy as np

from sae.knn.blocks import METRICS, as_dask, check_option, check_sizes, prepare_rows, row_blocks
from sae.progress import ProgressCallback, compute

__all__ = ["TILE_ENTRIES", "tile_top_k", "merge_top_k", "exact_neighbors", "exact_neighbors_of", "neighbors_among"]

logger = logging.getLogger(__name__)

TILE_ENTRIES = 1 << 22
"""Most distance entries (float64) held at once by an exact tile task (32 MiB)."""


def tile_top_k(
    queries: np.ndarray,
    query_ids: np.ndarray,
    reference: np.ndarray,
    reference_offset: int,
    n_neighbors: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The K nearest rows of ``reference`` for every query, self excluded by index.

    Euclidean distances come from ``||q||^2 + ||r||^2 - 2 q.r`` (float64,
    clipped at 0); cosine distances are ``1 - q.r / (||q|| ||r||)`` with zero
    rows at distance 1 of everything.  Row ``i`` of ``queries`` is frame
    ``query_ids[i]``; reference row ``j`` is frame ``reference_offset + j``.

    Returns
    -------
    indices : (n_queries, k') int64, global frame ids, ``k' = min(K, n_reference)``
    distances : (n_queries, k') float64
    """
    Q = prepare_rows(queries, metric)
    R = prepare_rows(reference, metric)
    n_ref = R.shape[0]
    k = min(n_neighbors, n_ref)
    out_i = np.empty((Q.shape[0], k), dtype=np.int64)
    out_d = np.empty((Q.shape[0], k), dtype=np.float64)
    r_sq = np.einsum("ij,ij->i", R, R)
    step = max(1, TILE_ENTRIES // max(n_ref, 1))
    for start in range(0, Q.shape[0], step):
        stop = min(start + step, Q.shape[0])
        q = Q[start:stop]
        if metric == "euclidean":
            D = np.einsum("ij,ij->i", q, q)[:, None] + r_sq[None, :] - 2.0 * (q @ R.T)
            np.maximum(D, 0.0, out=D)
        else:
            D = 1.0 - q @ R.T
            np.clip(D, 0.0, 2.0, out=D)
        local = query_ids[start:stop] - reference_offset
        own = np.flatnonzero((local >= 0) & (local < n_ref))
        D[own, local[own]] = np.inf
        if k < n_ref:
            part = np.argpartition(D, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n_ref), D.shape).copy()
        dist = np.take_along_axis(D, part, axis=1)
        out_i[start:stop] = part + reference_offset
        out_d[start:stop] = dist
    if metric == "euclidean":
        np.sqrt(out_d, out=out_d)
    out_i[~np.isfinite(out_d)] = -1
    return out_i, out_d


def merge_top_k(
    candidates: Sequence[tuple[np.ndarray, np.ndarray]], n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top K of concatenated candidate lists, by distance then index; (n, K) int64 and float32.

    Missing entries (index -1) sort last with distance ``inf``; a frame
    listed twice (it cannot be, blocks are disjoint) would be kept twice.
    """
    indices = np.concatenate([c[0] for c in candidates], axis=1)
    distances = np.concatenate([np.asarray(c[1], dtype=np.float64) for c in candidates], axis=1)
    distances = np.where(indices < 0, np.inf, distances)
    tie_key = np.where(indices < 0, np.iinfo(np.int64).max, indices)
    order = np.lexsort((tie_key, distances), axis=-1)[:, :n_neighbors]
    indices = np.take_along_axis(indices, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    if indices.shape[1] < n_neighbors:
        pad = n_neighbors - indices.shape[1]
        indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
    indices[~np.isfinite(distances)] = -1
    return indices, distances.astype(np.float32)


def _exact_pair(
    queries: np.ndarray, query_offset: int, reference: np.ndarray, reference_offset: int, n_neighbors: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(query_offset, query_offset + len(queries), dtype=np.int64)
    return tile_top_k(queries, ids, reference, reference_offset, n_neighbors, metric)


def exact_neighbors(
    X: Any,
    n_neighbors: int = 10,
    *,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 4096,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact K nearest neighbours of every row of X by blocked brute force, self excluded.

    Parameters
    ----------
    X : np.ndarray or dask.array.Array
        (N, n_features) frames.
    n_neighbors : int
        K, 1 <= K < N.
    metric : {"euclidean", "cosine"}
        Distance between rows.
    block_size : int
        Rows per block: B = ceil(N / block_size) and B^2 tile tasks.
    progress : callable, optional
        ``progress(done, B (B + 1))`` as the B^2 tiles and the B merges complete (`sae.progress`).

    Returns
    -------
    indices : np.ndarray
        (N, K) int64, sorted by increasing distance, ties by increasing index.
    distances : np.ndarray
        (N, K) float32.
    """
    check_option("metric", metric, METRICS)
    blocks, offsets, n_samples = row_blocks(X, block_size)
    check_sizes(n_samples, n_neighbors, block_size)
    pair = dask.delayed(_exact_pair, pure=True, nout=2)
    merge = dask.delayed(merge_top_k, pure=True, nout=2)
    merged, steps = [], []
    for q_block, q_off in zip(blocks, offsets):
        candidates = [pair(q_block, q_off, r_block, r_off, n_neighbors, metric) for r_block, r_off in zip(blocks, offsets)]
        merged.append(merge(candidates, n_neighbors))
        steps += candidates + [merged[-1]]
    logger.info("exact kNN: N=%d, K=%d, %d blocks, %d tile tasks", n_samples, n_neighbors, len(blocks), len(blocks) ** 2)
    results = compute(*merged, progress=progress, parts=steps)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def exact_neighbors_of(
    X: Any,
    query_ids: np.ndarray,
    n_neighbors: int = 10,
    *,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact K nearest neighbours of the rows ``query_ids`` of X among all rows, self excluded.

    One task per reference block, then a merge: for measuring recall on a sample.

    Returns
    -------
    indices : (len(query_ids), K) int64;  distances : (len(query_ids), K) float32
    """
    check_option("metric", metric, METRICS)
    blocks, offsets, n_samples = row_blocks(X, block_size)
    check_sizes(n_samples, n_neighbors, block_size)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    if query_ids.size and (query_ids.min() < 0 or query_ids.max() >= n_samples):
        raise ValueError(f"query_ids must lie in [0, {n_samples}), got values in [{query_ids.min()}, {query_ids.max()}]")
    queries = as_dask(X, block_size)[query_ids].rechunk((-1, -1)).to_delayed().ravel()[0]
    tile = dask.delayed(tile_top_k, pure=True, nout=2)
    candidates = [tile(queries, query_ids, r_block, r_off, n_neighbors, metric) for r_block, r_off in zip(blocks, offsets)]
    return dask.compute(dask.delayed(merge_top_k, pure=True, nout=2)(candidates, n_neighbors))[0]


def neighbors_among(
    queries: np.ndarray,
    reference: Any,
    n_neighbors: int = 10,
    *,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 50_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact K nearest rows of ``reference`` (N, n_features) for frames that are not among them.

    ``queries`` (n, n_features) are new frames: nothing is excluded.  The
    reference is read ``block_size`` rows at a time (a numpy array, a memory
    map or a Zarr array), each block searched in the serial loop of the exact
    method (same distances, same ties), the candidates merged.  Cost:
    n N n_features multiply-adds, no index.

    Returns
    -------
    indices : (n, K) int64, rows of ``reference``;  distances : (n, K) float32

    >>> R = np.array([[0.0], [1.0], [3.0]])
    >>> indices, distances = neighbors_among(np.array([[0.9]]), R, 2, block_size=2)
    >>> indices.tolist(), [round(float(d), 3) for d in distances[0]]
    ([[1, 0]], [0.1, 0.9])
    """
    check_option("metric", metric, METRICS)
    n_reference = int(reference.shape[0])
    check_sizes(n_reference + 1, n_neighbors, block_size)
    queries = np.asarray(queries)
    no_self = np.full(queries.shape[0], -1, dtype=np.int64)
    candidates = [
        tile_top_k(queries, no_self, np.asarray(reference[start : start + block_size]), start, n_neighbors, metric)
        for start in range(0, n_reference, block_size)
    ]
    return merge_top_k(candidates, n_neighbors)
