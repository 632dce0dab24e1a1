"""Blocked k-nearest-neighbour search between frames, exact or approximate, on Dask.

The frames X (N, n_features) are cut into B row blocks of at most
``block_size`` rows.  Every method produces, for every frame, its K nearest
other frames: ``indices`` (N, K) int64 and ``distances`` (N, K) float32,
sorted by increasing distance.  *Self is excluded by index*, never by
distance: duplicated frames (silence) are at distance 0 of each other and
stay each other's neighbours; the graph adds self-loops explicitly
(`sae.graph`).

Exact (``method="exact"``, `sae.knn.exact`): blocked brute force
    One Dask task per (query block, reference block) pair keeps its top K of
    the distance tile; one task per query block merges the B candidate lists.

Approximate (``method="approximate"``, `sae.knn.approximate`): blocked pynndescent
    One index per block, each block's own graph, queries of every other
    block's index, and a merge per query block: every task holds at most
    one index and one query block.

faiss HNSW (``method="faiss"``, `sae.knn.hnsw`, optional: ``pip install 'sae[faiss]'``)
    One `faiss.IndexHNSWFlat` over the distinct frames in the calling
    process, identical frames grouped; the index holds every frame.  Not
    installed: `missing_backend` says how to get it.

The quality of an approximate search is its recall@K against exact search on
a sample of frames (`sae.knn.recall`).  What the methods share (names, checks,
row blocks) is `sae.knn.blocks`.

The functions build `dask.delayed` graphs and compute them with
`dask.compute`, i.e. on the active distributed client if there is one, else on
the local threaded scheduler.  X may be a numpy array or a dask array (e.g.
``dask.array.from_zarr``), in which case blocks are read by the tasks.

>>> import numpy as np
>>> X = np.random.default_rng(0).random((50, 4))
>>> indices, distances = nearest_neighbors(X, 3, method="exact", block_size=16)
>>> indices.shape, distances.dtype
((50, 3), dtype('float32'))
>>> bool(np.all(indices != np.arange(50)[:, None]))
True
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from sae.knn.approximate import approximate_neighbors, block_seeds, warm_up
from sae.knn.blocks import METHODS, METRICS, check_option
from sae.knn.exact import TILE_ENTRIES, exact_neighbors, exact_neighbors_of, neighbors_among
from sae.knn.hnsw import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    faiss_missing_message,
    faiss_neighbors,
    faiss_threads,
    missing_backend,
)
from sae.knn.recall import recall_at_k, sample_recall
from sae.progress import ProgressCallback

__all__ = [
    "METHODS",
    "METRICS",
    "TILE_ENTRIES",
    "HNSW_M",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "nearest_neighbors",
    "exact_neighbors",
    "exact_neighbors_of",
    "neighbors_among",
    "approximate_neighbors",
    "block_seeds",
    "warm_up",
    "faiss_neighbors",
    "faiss_threads",
    "faiss_missing_message",
    "missing_backend",
    "recall_at_k",
    "sample_recall",
]


def nearest_neighbors(
    X: Any,
    n_neighbors: int = 10,
    *,
    method: Literal["approximate", "exact", "faiss"] = "approximate",
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 50_000,
    n_neighbors_build: int = 30,
    search_epsilon: float = 0.1,
    random_state: int = 0,
    n_jobs: int | None = 1,
    hnsw_m: int = HNSW_M,
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION,
    hnsw_ef_search: int = HNSW_EF_SEARCH,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """K nearest neighbours of every row of X, self excluded: `approximate_neighbors`, `exact_neighbors` or `faiss_neighbors`.

    The exact method ignores ``n_neighbors_build``, ``search_epsilon``,
    ``random_state``, ``n_jobs`` and the ``hnsw_*`` options; the approximate
    method the ``hnsw_*`` options; the faiss method ``n_neighbors_build``
    and ``search_epsilon`` (its ``n_jobs`` counts the OpenMP threads of the
    one process that holds the index; None: all its cores).  Returns (N, K)
    int64 indices and (N, K) float32 distances, sorted by distance.
    ``progress(done, total)`` is called as the query blocks are complete
    (faiss: the blocks added, then searched).
    """
    check_option("method", method, METHODS)
    if method == "exact":
        return exact_neighbors(X, n_neighbors, metric=metric, block_size=block_size, progress=progress)
    if method == "faiss":
        return faiss_neighbors(
            X, n_neighbors, metric=metric, block_size=block_size, hnsw_m=hnsw_m,
            ef_construction=hnsw_ef_construction, ef_search=hnsw_ef_search, random_state=random_state,
            n_jobs=n_jobs, progress=progress,
        )
    return approximate_neighbors(
        X,
        n_neighbors,
        metric=metric,
        block_size=block_size,
        n_neighbors_build=n_neighbors_build,
        search_epsilon=search_epsilon,
        random_state=random_state,
        n_jobs=n_jobs,
        progress=progress,
    )
