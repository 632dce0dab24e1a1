"""The quality of an approximate kNN search: recall@K against exact search, on a sample of frames."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from sae.knn.exact import exact_neighbors_of

__all__ = ["recall_at_k", "sample_recall"]

logger = logging.getLogger(__name__)


def recall_at_k(
    found_indices: np.ndarray,
    true_indices: np.ndarray,
    *,
    found_distances: np.ndarray | None = None,
    true_distances: np.ndarray | None = None,
    rtol: float = 1e-4,
) -> float:
    """Mean fraction of the true K nearest neighbours that a search found.

    ``recall = 1/(n K) sum_i |found_i ∩ true_i|`` over n queries, both (n, K).
    With distances given, ties count as found: a found neighbour whose
    distance is at most the true K-th distance (times ``1 + rtol``) is as good
    as a true one (duplicated frames make the "true" ids arbitrary among
    equals).  Missing entries (index < 0) never count.

    >>> recall_at_k(np.array([[1, 2], [0, 3]]), np.array([[1, 2], [0, 2]]))
    0.75
    """
    found_indices = np.asarray(found_indices)
    true_indices = np.asarray(true_indices)
    if found_indices.shape != true_indices.shape:
        raise ValueError(
            f"found_indices must have the shape of true_indices {true_indices.shape}, got {found_indices.shape}"
        )
    n, k = true_indices.shape
    if n == 0:
        raise ValueError("recall_at_k needs at least one query, got 0")
    hits = 0
    for i in range(n):
        found = found_indices[i]
        valid = found >= 0
        if found_distances is not None and true_distances is not None:
            bound = float(np.max(true_distances[i])) * (1 + rtol) + 1e-12
            good = valid & (np.asarray(found_distances[i], dtype=np.float64) <= bound)
            good |= valid & np.isin(found, true_indices[i])
            hits += min(int(good.sum()), k)
        else:
            hits += int(np.isin(found[valid], true_indices[i]).sum())
    return hits / (n * k)


def sample_recall(
    X: Any,
    indices: np.ndarray,
    distances: np.ndarray | None = None,
    *,
    n_queries: int = 2000,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 4096,
    random_state: int = 0,
) -> dict[str, Any]:
    """recall@K of neighbour lists (N, K) against exact search on a random sample of frames.

    The sample is ``min(n_queries, N)`` distinct frames drawn with
    ``numpy.random.default_rng(random_state)``; their exact neighbours come
    from `exact_neighbors_of`.  Recall is tie-aware when ``distances`` is given
    (see `recall_at_k`).

    Returns
    -------
    dict
        ``recall`` (float), ``n_queries`` (int), ``random_state`` (int).
    """
    indices = np.asarray(indices)
    n_samples, k = indices.shape
    n_queries = min(int(n_queries), n_samples)
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    rng = np.random.default_rng(random_state)
    query_ids = np.sort(rng.choice(n_samples, size=n_queries, replace=False))
    true_i, true_d = exact_neighbors_of(X, query_ids, k, metric=metric, block_size=block_size)
    recall = recall_at_k(
        indices[query_ids],
        true_i,
        found_distances=None if distances is None else np.asarray(distances)[query_ids],
        true_distances=None if distances is None else true_d,
    )
    logger.info("recall@%d on %d sampled frames: %.4f", k, n_queries, recall)
    return {"recall": float(recall), "n_queries": int(n_queries), "random_state": int(random_state)}
