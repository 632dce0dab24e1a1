"""Approximate kNN with one faiss HNSW index (``method="faiss"``, optional: ``pip install 'sae[faiss]'``).

One `faiss.IndexHNSWFlat` over the distinct frames in the calling process:
the B blocks are read one at a time (Dask tasks when X is a dask array)
and their rows not seen before are added to the index (identical rows,
e.g. silence, form a group represented by its first frame: many copies of
one point would crowd the HNSW graph's links and cut paths through it,
`_DuplicateGroups`).  Every distinct frame, read back from the index's own
copy, is searched for its K + 1 nearest, itself removed by position (else
the (K + 1)-th dropped); a frame's neighbours are then the other frames of
its group at distance 0 and the frames of the groups its representative
found, the K nearest kept, sorted by distance, then index, as the other
methods. faiss returns squared euclidean distances (float32, computed as
sums of squared differences): their square roots are returned. For the
cosine metric the rows are scaled to unit norm and the index ranks by inner
product, distance ``1 - q.r`` (zero rows at distance 1 of everything, as
the exact method). Parameters: ``hnsw_m`` links per frame (`HNSW_M`),
``ef_construction`` (`HNSW_EF_CONSTRUCTION`) and ``ef_search``
(`HNSW_EF_SEARCH`), widths of the candidate lists of the build and of the
search: the defaults reach recall@10 >= 0.99 on CQT-like frames (README,
Benchmarks). The price: the index, i.e. every frame in float32 plus a
graph of about ``2 hnsw_m`` int32 links per frame, lives in one process,
``U (4 n_features + 8 hnsw_m)`` bytes for U distinct frames (1.29M frames
x 96 bins, M = 16: at most 0.66 GB), plus the groups (3 x 8 bytes per
frame), the neighbours of the distinct frames and the results; no block is
held twice (a block is dropped once added). faiss runs ``n_jobs`` OpenMP
threads (`faiss_threads`; None: every core this process may use, since the
search is then the only work of the cluster): set fewer when other work
shares the machine. The levels of the frames in the graph are drawn with
``random_state``; with more than one thread the graph also depends on the
threads' timing, so results may differ in a few neighbours from run to
run. Not installed: `missing_backend` says how to get it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import dask.array as da
import numpy as np

from sae.knn.blocks import METHODS, METRICS, as_dask, check_option, check_sizes, prepare_rows
from sae.knn.exact import merge_top_k
from sae.progress import ProgressCallback

__all__ = [
    "HNSW_M",
    "HNSW_EF_CONSTRUCTION",
    "HNSW_EF_SEARCH",
    "faiss_missing_message",
    "missing_backend",
    "import_faiss",
    "faiss_threads",
    "faiss_neighbors",
]

logger = logging.getLogger(__name__)

HNSW_M = 16
"""faiss method: links per frame of the HNSW graph (``GraphConfig.hnsw_m``)."""

HNSW_EF_CONSTRUCTION = 64
"""faiss method: candidate list width of the HNSW build (``GraphConfig.hnsw_ef_construction``)."""

HNSW_EF_SEARCH = 40
"""faiss method: candidate list width of the HNSW search, raised to K + 1 if lower (``GraphConfig.hnsw_ef_search``)."""


def faiss_missing_message(error: BaseException | None = None) -> str:
    """What to do when ``graph.method = "faiss"`` but faiss cannot be imported.

    >>> "pip install 'sae[faiss]'" in faiss_missing_message()
    True
    """
    reason = f" ({type(error).__name__}: {error})" if error is not None else ""
    return (
        f"graph.method 'faiss' needs the faiss-cpu package, which cannot be imported here{reason}: "
        "install it with pip install 'sae[faiss]' (or pip install faiss-cpu), "
        "or choose graph.method 'approximate' (pynndescent, the default) or 'exact'"
    )


def missing_backend(method: str) -> str | None:
    """The error message for a kNN ``method`` whose package cannot be imported, None if it can.

    Only "faiss" is optional; the other methods always return None.

    >>> missing_backend("approximate") is None
    True
    """
    check_option("method", method, METHODS)
    if method != "faiss":
        return None
    try:
        import faiss  # noqa: F401
    except ImportError as error:
        return faiss_missing_message(error)
    return None


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it (`faiss_missing_message`)."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(faiss_missing_message(error)) from error
    return faiss


def faiss_threads(n_jobs: int | None) -> int:
    """The OpenMP threads faiss runs with for ``n_jobs``: itself, or every core this process may use.

    >>> faiss_threads(3)
    3
    """
    if n_jobs is not None:
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1 or None, got {n_jobs}")
        return int(n_jobs)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def _prepare_float32(block: Any, metric: str) -> np.ndarray:
    """Rows as C-contiguous float32 (faiss's input), unit rows for the cosine metric."""
    block = np.asarray(block)
    if metric == "cosine":
        block = prepare_rows(block, metric)
    return np.ascontiguousarray(block, dtype=np.float32)


class _DuplicateGroups:
    """Frames grouped by identical rows (bit for bit), found block by block, for `faiss_neighbors`.

    Each group's *representative* is its first frame; only representatives
    enter the index, at positions 0, 1, ... in frame order.  Rows are matched
    by a 64-bit hash of their bits (a random linear form modulo 2^64); every
    match is then checked against the stored row (`check_block`).  Memory:
    three int64 / uint64 arrays of N.
    """

    def __init__(self, n_samples: int, n_features: int, random_state: int) -> None:
        rng = np.random.default_rng([random_state, 0x5AE])
        self._weights = rng.integers(1, np.iinfo(np.int64).max, size=n_features, dtype=np.uint64) | np.uint64(1)
        self.position = np.empty(n_samples, dtype=np.int64)  # index position of every frame's representative
        self._seen_hashes = np.empty(0, dtype=np.uint64)  # sorted hashes of the representatives so far
        self._seen_positions = np.empty(0, dtype=np.int64)
        self.n_unique = 0

    def _hash(self, block: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(block, dtype=np.float32).view(np.uint32).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (bits * self._weights).sum(axis=1, dtype=np.uint64)

    def add_block(self, block: np.ndarray, offset: int) -> np.ndarray:
        """Group the rows of ``block`` (frames ``offset + i``); the mask of the rows that are new representatives."""
        hashes = self._hash(block)
        distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        where = np.searchsorted(self._seen_hashes, distinct)
        seen = where < self._seen_hashes.size
        seen[seen] = self._seen_hashes[where[seen]] == distinct[seen]
        positions = np.empty(distinct.size, dtype=np.int64)
        positions[seen] = self._seen_positions[where[seen]]
        new_first = np.sort(first[~seen])  # new representatives in frame order
        positions_new = self.n_unique + np.arange(new_first.size)
        order_new = np.argsort(first[~seen], kind="stable")
        new_slots = np.flatnonzero(~seen)[order_new]
        positions[new_slots] = positions_new
        self.n_unique += new_first.size
        self.position[offset : offset + len(block)] = positions[inverse.ravel()]
        merged_h = np.concatenate([self._seen_hashes, distinct[new_slots]])
        merged_p = np.concatenate([self._seen_positions, positions_new])
        order = np.argsort(merged_h, kind="stable")
        self._seen_hashes, self._seen_positions = merged_h[order], merged_p[order]
        mask = np.zeros(len(block), dtype=bool)
        mask[new_first] = True
        return mask

    def check_block(self, block: np.ndarray, offset: int, index: Any) -> None:
        """Every row of ``block`` equals its representative's row in ``index`` (no hash collision)."""
        positions = self.position[offset : offset + len(block)]
        stored = index.reconstruct_batch(positions)
        if not np.array_equal(stored.view(np.uint32), np.ascontiguousarray(block, dtype=np.float32).view(np.uint32)):
            raise RuntimeError("faiss kNN: two different frames share a 64-bit row hash; change random_state")

    def expand(
        self, start: int, stop: int, unique_i: np.ndarray, unique_d: np.ndarray, self_d: np.ndarray, n_neighbors: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The K nearest other frames of frames ``start:stop`` from the neighbours of their representatives.

        Candidates of frame f: the other frames of its group (at ``self_d``
        of its representative: 0, or 1 between zero rows for the cosine metric),
        and the first K frames of each group its representative found, at
        that representative's distance; `merge_top_k` keeps the top K, ties by index.
        """
        frames = np.arange(start, stop, dtype=np.int64)
        own = self.position[start:stop]
        if self.n_unique == len(self.position):  # no duplicates: positions are frame ids
            neighbors = unique_i[own]
            distances = unique_d[own].astype(np.float64)
            missing = neighbors < 0
            return merge_top_k([(np.where(missing, -1, neighbors), np.where(missing, np.inf, distances))], n_neighbors)
        members, counts, first_member = self._members()
        candidates = []
        own_members = self._first_members(own, n_neighbors + 1, members, counts, first_member)
        own_members[own_members == frames[:, None]] = -1
        candidates.append((own_members, np.broadcast_to(self_d[own][:, None], own_members.shape)))
        found = unique_i[own]
        for column in range(found.shape[1]):
            positions = found[:, column]
            ids = self._first_members(positions, n_neighbors, members, counts, first_member)
            dist = np.broadcast_to(unique_d[own, column].astype(np.float64)[:, None], ids.shape)
            candidates.append((ids, dist))
        return merge_top_k(candidates, n_neighbors)

    def _members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if getattr(self, "_cache", None) is None:
            members = np.argsort(self.position, kind="stable")  # by group, frames ascending within
            counts = np.bincount(self.position, minlength=self.n_unique)
            first_member = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._cache = (members, counts, first_member)
        return self._cache

    @staticmethod
    def _first_members(positions, width, members, counts, first_member) -> np.ndarray:
        """(n, width) the first ``width`` frames of the groups at ``positions`` (-1 padded, -1 for position -1)."""
        out = np.full((len(positions), width), -1, dtype=np.int64)
        valid = positions >= 0
        safe = np.where(valid, positions, 0)
        for j in range(width):
            has = valid & (j < counts[safe])
            out[has, j] = members[first_member[safe[has]] + j]
        return out


def faiss_neighbors(
    X: Any,
    n_neighbors: int = 10,
    *,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 50_000,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
    random_state: int = 0,
    n_jobs: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate K nearest neighbours of every row of X with one faiss HNSW index, self excluded.

    Scheme, memory and threads: see the module docstring (one
    ``faiss.IndexHNSWFlat`` of the distinct frames in this process, blocks
    added then searched for K + 1, self removed by index, identical frames
    each other's neighbours at distance 0).  Euclidean distances
    are ``sqrt`` of faiss's squared distances; cosine distances
    ``1 - q.r`` of unit rows.

    Parameters
    ----------
    X : np.ndarray or dask.array.Array
        (N, n_features) frames, read ``block_size`` rows at a time.
    n_neighbors : int
        K kept per frame, 1 <= K < N.
    metric : {"euclidean", "cosine"}
        Distance between rows.
    block_size : int
        Rows read, added and searched at a time.
    hnsw_m : int
        Links per frame of the graph (faiss's M), >= 2.
    ef_construction : int
        Candidate list width of the build (``efConstruction``), >= 1.
    ef_search : int
        Candidate list width of the search (``efSearch``), >= 1, raised to K + 1 if lower.
    random_state : int
        Seed of the levels of the frames in the graph.
    n_jobs : int or None
        OpenMP threads of faiss (`faiss_threads`), restored afterwards.
    progress : callable, optional
        ``progress(done, 2 B)``: the B blocks added, then the B blocks searched (`sae.progress`).

    Returns
    -------
    indices : np.ndarray
        (N, K) int64, sorted by increasing distance, ties by increasing index;
        -1 where fewer than K were found.
    distances : np.ndarray
        (N, K) float32 (``inf`` where missing).
    """
    check_option("metric", metric, METRICS)
    for name, value, low in (("hnsw_m", hnsw_m, 2), ("ef_construction", ef_construction, 1), ("ef_search", ef_search, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    faiss = import_faiss()
    arr = as_dask(X, block_size) if isinstance(X, da.Array) else None
    dense = None if arr is not None else np.asarray(X)
    if dense is not None and dense.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {dense.shape}")
    n_samples, n_features = (arr if arr is not None else dense).shape
    check_sizes(n_samples, n_neighbors, block_size)
    starts = list(range(0, n_samples, block_size))
    total = 2 * len(starts)
    threads = faiss_threads(n_jobs)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(int(n_features), int(hnsw_m), kind)
        index.hnsw.efConstruction = int(ef_construction)
        index.hnsw.rng = faiss.RandomGenerator(int(random_state))
        if progress is not None:
            progress(0, total)
        groups = _DuplicateGroups(n_samples, n_features, random_state)
        for done, start in enumerate(starts, start=1):
            stop = min(start + block_size, n_samples)
            block = _prepare_float32(arr[start:stop].compute() if arr is not None else dense[start:stop], metric)
            new = groups.add_block(block, start)
            index.add(np.ascontiguousarray(block[new]))
            groups.check_block(block, start, index)
            del block
            if progress is not None:
                progress(done, total)
        n_unique = index.ntotal
        k = min(n_neighbors + 1, n_unique)
        index.hnsw.efSearch = max(int(ef_search), k)
        # neighbours of every distinct frame among the distinct frames, self (by position) removed
        unique_i = np.empty((n_unique, max(k - 1, 0)), dtype=np.int64)
        unique_d = np.empty((n_unique, max(k - 1, 0)), dtype=np.float32)
        # distance between two copies of a frame: 0, but 1 between zero rows for the cosine metric
        self_d = np.zeros(n_unique, dtype=np.float64)
        for first in range(0, n_unique, block_size):
            last = min(first + block_size, n_unique)
            queries = index.reconstruct_n(first, last - first)
            if metric == "cosine":
                self_d[first:last] = np.clip(1.0 - np.einsum("ij,ij->i", queries, queries, dtype=np.float64), 0.0, 2.0)
            found_d, found_i = index.search(queries, k)
            found_i = found_i.astype(np.int64)
            found_d = found_d.astype(np.float64)
            if metric == "cosine":
                found_d = np.clip(1.0 - found_d, 0.0, 2.0)
            else:
                found_d = np.sqrt(np.maximum(found_d, 0.0))
            own = found_i == np.arange(first, last)[:, None]
            own[~own.any(axis=1), -1] = True  # self not found: drop the farthest
            keep = ~own
            unique_i[first:last] = found_i[keep].reshape(last - first, k - 1)
            unique_d[first:last] = found_d[keep].reshape(last - first, k - 1)
        out_i = np.empty((n_samples, n_neighbors), dtype=np.int64)
        out_d = np.empty((n_samples, n_neighbors), dtype=np.float32)
        for done, start in enumerate(starts, start=len(starts) + 1):
            stop = min(start + block_size, n_samples)
            out_i[start:stop], out_d[start:stop] = groups.expand(start, stop, unique_i, unique_d, self_d, n_neighbors)
            if progress is not None:
                progress(done, total)
    finally:
        faiss.omp_set_num_threads(previous)
    logger.info(
        "faiss HNSW kNN: N=%d (%d distinct), K=%d, M=%d, efConstruction=%d, efSearch=%d, %d threads, index ~%.0f MB",
        n_samples, n_unique, n_neighbors, hnsw_m, ef_construction, max(ef_search, k), threads,
        n_unique * (4 * n_features + 8 * hnsw_m) / 2**20,
    )
    return out_i, out_d
