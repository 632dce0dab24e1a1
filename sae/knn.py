"""Blocked k-nearest-neighbour search between frames, exact or approximate, on Dask.

The frames X (N, n_features) are cut into B row blocks of at most
``block_size`` rows.  Every method produces, for every frame, its K nearest
other frames: ``indices`` (N, K) int64 and ``distances`` (N, K) float32,
sorted by increasing distance.  *Self is excluded by index*, never by
distance: duplicated frames (silence) are at distance 0 of each other and
stay each other's neighbours; the graph adds self-loops explicitly
(`sae.graph`).

Exact (``method="exact"``): blocked brute force
    One Dask task per (query block, reference block) pair computes the
    distance tile in float64, in row slices of at most `TILE_ENTRIES`
    entries (so never more than ``block_size**2``), and keeps its top K; one
    task per query block merges the B candidate lists (top K by distance, ties
    by index).  Cost: N^2 n_features / 2 multiply-adds in B^2 tasks; memory
    per task: two blocks and one tile slice.

Approximate (``method="approximate"``): blocked pynndescent
    1. one `pynndescent.NNDescent` index per block, built with
       ``n_neighbors_build`` >= K neighbours (B tasks);
    2. diagonal pairs read the block's own neighbour graph
       (``index.neighbor_graph``: no query needed);
    3. off-diagonal pairs query the other block's index with the query block,
       ``k = n_neighbors_build``, ``epsilon = search_epsilon`` (B (B - 1) tasks);
    4. a merge per query block as for the exact method (B tasks).
    Cost: B builds of ~block_size log(block_size) work each and B (B - 1)
    queries of block_size frames, i.e. query work ~ B N log(block_size):
    bigger blocks mean fewer, better-balanced tasks, and the query cost grows
    linearly with B.  The scheduler runs every query task where its index
    lives.  A task holds at most one index (its block plus a graph of
    block_size x n_neighbors_build) and one query block.
    Building with more neighbours than kept is what buys recall: with
    n_neighbors=30 kept to 10, recall@10 was 0.996 against 0.845 when built
    with 10 (100k frames).  Alternatives that pynndescent allows but which
    put a whole-data step on one worker: a single index over all frames
    (best recall per CPU second below ~1M frames but one process, and
    ``n_jobs`` threads, does everything), and refining the merged blockwise
    graph with ``NNDescent(X, init_graph=...)`` (again all frames in one
    process).  The blockwise scheme is the one whose tasks stay bounded.

faiss HNSW (``method="faiss"``, optional: ``pip install 'sae[faiss]'``)
    One `faiss.IndexHNSWFlat` over the distinct frames in the calling process:
    the B blocks are read one at a time (Dask tasks when X is a dask array)
    and their rows not seen before are added to the index (identical rows,
    e.g. silence, form a group represented by its first frame: many copies of
    one point would crowd the HNSW graph's links and cut paths through it).
    Every distinct frame, read back from the index's own copy, is searched for
    its K + 1 nearest, itself removed by position (else the (K + 1)-th
    dropped); a frame's neighbours are then the other frames of its group at
    distance 0 and the frames of the groups its representative found, the K
    nearest kept, sorted by distance, then index, as the other methods. faiss
    returns squared euclidean distances (float32, computed as sums of squared
    differences): their square roots are returned. For the cosine metric the
    rows are scaled to unit norm and the index ranks by inner product,
    distance ``1 - q.r`` (zero rows at distance 1 of everything, as the exact
    method). Parameters: ``hnsw_m`` links per frame (`HNSW_M`),
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

pynndescent compiles its numba kernels on first use in every process (one to
several minutes on a loaded 2-core machine; they are not cached on disk), so
each Dask worker pays that once; see `warm_up`.

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

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Literal

from sae.progress import ProgressCallback, compute

import dask
import dask.array as da
import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("approximate", "exact", "faiss")
METRICS = ("euclidean", "cosine")

_QUERY_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_QUERY_LOCKS_GUARD = threading.Lock()

TILE_ENTRIES = 1 << 22
"""Most distance entries (float64) held at once by an exact tile task (32 MiB)."""

HNSW_M = 16
"""faiss method: links per frame of the HNSW graph (``GraphConfig.hnsw_m``)."""

HNSW_EF_CONSTRUCTION = 64
"""faiss method: candidate list width of the HNSW build (``GraphConfig.hnsw_ef_construction``)."""

HNSW_EF_SEARCH = 40
"""faiss method: candidate list width of the HNSW search, raised to K + 1 if lower (``GraphConfig.hnsw_ef_search``)."""


# --------------------------------------------------------------------------- checks and blocks


def _check(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_sizes(n_samples: int, n_neighbors: int, block_size: int) -> None:
    if not 1 <= n_neighbors < n_samples:
        raise ValueError(
            f"n_neighbors must be in [1, n_samples - 1] = [1, {n_samples - 1}], got {n_neighbors}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _as_dask(X: Any, block_size: int) -> da.Array:
    """X as a dask array with row chunks of ``block_size`` and one column chunk."""
    if isinstance(X, da.Array):
        arr = X
    else:
        arr = da.from_array(np.asarray(X), chunks=(block_size, -1))
    if arr.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {arr.shape}")
    return arr.rechunk((block_size, -1))


def _blocks(X: Any, block_size: int) -> tuple[list[Any], list[int], int]:
    """Delayed row blocks of X, their row offsets and N."""
    arr = _as_dask(X, block_size)
    offsets = np.concatenate([[0], np.cumsum(arr.chunks[0])]).astype(int).tolist()
    return list(arr.to_delayed().ravel()), offsets[:-1], int(arr.shape[0])


def _prepare(block: np.ndarray, metric: str) -> np.ndarray:
    """float64 rows; unit rows for the cosine metric (zero rows stay zero)."""
    block = np.asarray(block, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block = np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)
    return block


# --------------------------------------------------------------------------- exact


def _tile_top_k(
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
    Q = _prepare(queries, metric)
    R = _prepare(reference, metric)
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


def _merge(candidates: Sequence[tuple[np.ndarray, np.ndarray]], n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
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
    return _tile_top_k(queries, ids, reference, reference_offset, n_neighbors, metric)


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
        ``progress(done, B)`` as the query blocks are complete (`sae.progress`).

    Returns
    -------
    indices : np.ndarray
        (N, K) int64, sorted by increasing distance, ties by increasing index.
    distances : np.ndarray
        (N, K) float32.
    """
    _check("metric", metric, METRICS)
    blocks, offsets, n_samples = _blocks(X, block_size)
    _check_sizes(n_samples, n_neighbors, block_size)
    pair = dask.delayed(_exact_pair, pure=True, nout=2)
    merge = dask.delayed(_merge, pure=True, nout=2)
    merged = []
    for q_block, q_off in zip(blocks, offsets):
        candidates = [pair(q_block, q_off, r_block, r_off, n_neighbors, metric) for r_block, r_off in zip(blocks, offsets)]
        merged.append(merge(candidates, n_neighbors))
    logger.info("exact kNN: N=%d, K=%d, %d blocks, %d tile tasks", n_samples, n_neighbors, len(blocks), len(blocks) ** 2)
    results = compute(*merged, progress=progress)
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
    _check("metric", metric, METRICS)
    blocks, offsets, n_samples = _blocks(X, block_size)
    _check_sizes(n_samples, n_neighbors, block_size)
    query_ids = np.asarray(query_ids, dtype=np.int64)
    if query_ids.size and (query_ids.min() < 0 or query_ids.max() >= n_samples):
        raise ValueError(f"query_ids must lie in [0, {n_samples}), got values in [{query_ids.min()}, {query_ids.max()}]")
    queries = _as_dask(X, block_size)[query_ids].rechunk((-1, -1)).to_delayed().ravel()[0]
    tile = dask.delayed(_tile_top_k, pure=True, nout=2)
    candidates = [tile(queries, query_ids, r_block, r_off, n_neighbors, metric) for r_block, r_off in zip(blocks, offsets)]
    return dask.compute(dask.delayed(_merge, pure=True, nout=2)(candidates, n_neighbors))[0]


# --------------------------------------------------------------------------- approximate


def _build_index(
    reference: np.ndarray, n_neighbors_build: int, metric: str, seed: int, n_jobs: int | None
) -> Any:
    """A pynndescent index over one block, prepared for queries."""
    from pynndescent import NNDescent

    reference = np.ascontiguousarray(reference, dtype=np.float32)
    index = NNDescent(
        reference,
        metric=metric,
        n_neighbors=min(n_neighbors_build, len(reference) - 1),
        random_state=seed,
        n_jobs=n_jobs,
        low_memory=True,
    )
    index.prepare()
    return index


def _index_own_neighbors(index: Any, offset: int, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's K nearest other rows from its index's graph, self removed by index."""
    indices, distances = index.neighbor_graph
    indices = np.asarray(indices, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float64)
    own = indices == np.arange(len(indices))[:, None]
    missing = (indices < 0) | own
    indices = np.where(missing, -1, indices + offset)
    distances = np.where(missing, np.inf, distances)
    return _merge([(indices, distances)], n_neighbors)


def _query_index(
    index: Any, queries: np.ndarray, offset: int, n_reference: int, k: int, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest rows of an index's block (``n_reference`` rows) per query, as global ids."""
    k = min(k, n_reference)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    # NNDescent.query reuses a workspace stored on the index: queries of one
    # index from several threads of a worker must not overlap.
    with _QUERY_LOCKS_GUARD:
        lock = _QUERY_LOCKS.setdefault(index, threading.Lock())
    with lock:
        indices, distances = index.query(queries, k=k, epsilon=epsilon)
        indices = np.array(indices, dtype=np.int64)
        distances = np.array(distances, dtype=np.float64)
    return np.where(indices < 0, -1, indices + offset), distances


def block_seeds(random_state: int, n_blocks: int) -> list[int]:
    """Independent 31-bit seeds, one per block, derived from ``(random_state, block)``.

    >>> block_seeds(0, 3) == block_seeds(0, 3)
    True
    """
    return [int(np.random.SeedSequence([random_state, b]).generate_state(1)[0] >> 1) for b in range(n_blocks)]


def approximate_neighbors(
    X: Any,
    n_neighbors: int = 10,
    *,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    block_size: int = 50_000,
    n_neighbors_build: int = 30,
    search_epsilon: float = 0.1,
    random_state: int = 0,
    n_jobs: int | None = 1,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate K nearest neighbours of every row of X with blocked pynndescent.

    Scheme and cost: see the module docstring (B builds, B (B - 1) queries,
    B merges, B = ceil(N / block_size)).

    Parameters
    ----------
    X : np.ndarray or dask.array.Array
        (N, n_features) frames.
    n_neighbors : int
        K kept per frame, 1 <= K < N.
    metric : {"euclidean", "cosine"}
        Distance between rows.
    block_size : int
        Rows per block (one index per block).
    n_neighbors_build : int
        Neighbours of the index graphs, >= K; also the ``k`` of the
        cross-block queries.  More is slower and more accurate.
    search_epsilon : float
        pynndescent's query search width (``epsilon``), >= 0.
    random_state : int
        Seed; block b's index gets ``block_seeds(random_state, B)[b]``.
    n_jobs : int or None
        Threads of each pynndescent build (None: all cores).  Dask already
        runs one task per worker thread: keep 1 there.
    progress : callable, optional
        ``progress(done, B)`` as the query blocks are complete (`sae.progress`).

    Returns
    -------
    indices : np.ndarray
        (N, K) int64, sorted by increasing distance; -1 where fewer than K were found.
    distances : np.ndarray
        (N, K) float32 (``inf`` where missing).
    """
    _check("metric", metric, METRICS)
    if n_neighbors_build < n_neighbors:
        raise ValueError(f"n_neighbors_build must be >= n_neighbors = {n_neighbors}, got {n_neighbors_build}")
    if not search_epsilon >= 0:
        raise ValueError(f"search_epsilon must be >= 0, got {search_epsilon!r}")
    blocks, offsets, n_samples = _blocks(X, block_size)
    _check_sizes(n_samples, n_neighbors, block_size)
    sizes = np.diff(offsets + [n_samples]).tolist()
    if min(sizes) < 2:
        raise ValueError(f"every block needs at least 2 rows: lower or raise block_size (got {block_size} for N={n_samples})")
    seeds = block_seeds(random_state, len(blocks))
    build = dask.delayed(_build_index, pure=True)
    own = dask.delayed(_index_own_neighbors, pure=True, nout=2)
    query = dask.delayed(_query_index, pure=True, nout=2)
    merge = dask.delayed(_merge, pure=True, nout=2)
    indexes = [build(block, n_neighbors_build, metric, seed, n_jobs) for block, seed in zip(blocks, seeds)]
    merged = []
    for q, (q_block, q_off) in enumerate(zip(blocks, offsets)):
        candidates = []
        for r, (index, r_off) in enumerate(zip(indexes, offsets)):
            if r == q:
                candidates.append(own(index, q_off, n_neighbors))
            else:
                candidates.append(query(index, q_block, r_off, sizes[r], n_neighbors_build, search_epsilon))
        merged.append(merge(candidates, n_neighbors))
    logger.info(
        "approximate kNN: N=%d, K=%d (built with %d), %d blocks: %d builds, %d queries",
        n_samples, n_neighbors, n_neighbors_build, len(blocks), len(blocks), len(blocks) * (len(blocks) - 1),
    )
    results = compute(*merged, progress=progress)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


# --------------------------------------------------------------------------- faiss HNSW


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
    _check("method", method, METHODS)
    if method != "faiss":
        return None
    try:
        import faiss  # noqa: F401
    except ImportError as error:
        return faiss_missing_message(error)
    return None


def _import_faiss() -> Any:
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
        block = _prepare(block, metric)
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
        that representative's distance; `_merge` keeps the top K, ties by index.
        """
        frames = np.arange(start, stop, dtype=np.int64)
        own = self.position[start:stop]
        if self.n_unique == len(self.position):  # no duplicates: positions are frame ids
            neighbors = unique_i[own]
            distances = unique_d[own].astype(np.float64)
            missing = neighbors < 0
            return _merge([(np.where(missing, -1, neighbors), np.where(missing, np.inf, distances))], n_neighbors)
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
        return _merge(candidates, n_neighbors)

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
    _check("metric", metric, METRICS)
    for name, value, low in (("hnsw_m", hnsw_m, 2), ("ef_construction", ef_construction, 1), ("ef_search", ef_search, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    faiss = _import_faiss()
    arr = _as_dask(X, block_size) if isinstance(X, da.Array) else None
    dense = None if arr is not None else np.asarray(X)
    if dense is not None and dense.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {dense.shape}")
    n_samples, n_features = (arr if arr is not None else dense).shape
    _check_sizes(n_samples, n_neighbors, block_size)
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
    _check("method", method, METHODS)
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


# --------------------------------------------------------------------------- quality


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


def warm_up(metric: Literal["euclidean", "cosine"] = "euclidean") -> None:
    """Compile pynndescent's kernels in this process (build and query a tiny index).

    Run it on every worker (``client.run(warm_up)``) before timing anything.
    """
    X = np.random.default_rng(0).random((64, 4)).astype(np.float32)
    index = _build_index(X, 5, metric, 0, 1)
    index.query(X[:2], k=3)
    _ = index.neighbor_graph


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
    _check("metric", metric, METRICS)
    n_reference = int(reference.shape[0])
    _check_sizes(n_reference + 1, n_neighbors, block_size)
    queries = np.asarray(queries)
    no_self = np.full(queries.shape[0], -1, dtype=np.int64)
    candidates = [
        _tile_top_k(queries, no_self, np.asarray(reference[start : start + block_size]), start, n_neighbors, metric)
        for start in range(0, n_reference, block_size)
    ]
    return _merge(candidates, n_neighbors)
