"""What every kNN method shares: method and metric names, argument checks, row blocks, prepared rows.

The frames X (N, n_features) are cut into B row blocks of at most
``block_size`` rows (`row_blocks`): delayed blocks of a dask array, so a
numpy array, a Zarr-backed or any dask array is read by the tasks.

>>> blocks, offsets, n = row_blocks(np.zeros((10, 2)), 4)
>>> len(blocks), offsets, n
(3, [0, 4, 8], 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["METHODS", "METRICS", "check_option", "check_sizes", "as_dask", "row_blocks", "prepare_rows"]

METHODS = ("approximate", "exact", "faiss")
"""kNN methods (`sae.knn.nearest_neighbors`)."""

METRICS = ("euclidean", "cosine")
"""Distances between frames."""


def check_option(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a ValueError naming ``name``, the allowed values and ``value`` unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_sizes(n_samples: int, n_neighbors: int, block_size: int) -> None:
    """``1 <= n_neighbors < n_samples`` and ``block_size >= 1``, or a ValueError naming the parameter."""
    if not 1 <= n_neighbors < n_samples:
        raise ValueError(
            f"n_neighbors must be in [1, n_samples - 1] = [1, {n_samples - 1}], got {n_neighbors}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def as_dask(X: Any, block_size: int) -> da.Array:
    """X as a dask array with row chunks of ``block_size`` and one column chunk."""
    if isinstance(X, da.Array):
        arr = X
    else:
        arr = da.from_array(np.asarray(X), chunks=(block_size, -1))
    if arr.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {arr.shape}")
    return arr.rechunk((block_size, -1))


def row_blocks(X: Any, block_size: int) -> tuple[list[Any], list[int], int]:
    """Delayed row blocks of X, their row offsets and N."""
    arr = as_dask(X, block_size)
    offsets = np.concatenate([[0], np.cumsum(arr.chunks[0])]).astype(int).tolist()
    return list(arr.to_delayed().ravel()), offsets[:-1], int(arr.shape[0])


def prepare_rows(block: np.ndarray, metric: str) -> np.ndarray:
    """float64 rows; unit rows for the cosine metric (zero rows stay zero)."""
    block = np.asarray(block, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block = np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)
    return block
