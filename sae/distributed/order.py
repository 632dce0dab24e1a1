"""The order of the frames in the blocks of a graph training, and the moves of rows between it and the store's.

**Why.**  A block of the Z step with the graph term needs, at every FISTA
iteration, the rows of the other blocks its frames are linked to (its halo,
:mod:`sae.distributed.blocks`).  Blocks cut in the stored order (clip by
clip) link to frames all over the dataset: on the real kNN graph of
1,288,000 frames, 26 blocks of 50,000 had 72 % of their neighbours inside the
block and 1.93 million halo rows in all (3.7 GiB per copy of the codes).  A
kNN graph links frames near in feature space, so grouping frames by a
k-means cluster of their features puts most neighbours in the same block:
82 % inside, 1.01 million halo rows (`cluster_order`; README, "Benchmarks").

**How.**  `cluster_order` fits scikit-learn's ``MiniBatchKMeans`` with one
cluster per block on a sample of the frames, labels all frames chunk by
chunk, and sorts them by cluster (clusters in the order of their centres'
projection on the sample's first principal direction, so neighbouring
clusters share block boundaries) and, within a cluster, by their own
projection.  Block ``b`` holds the frames ``members[b]`` (sorted).

The store keeps the natural order: the frames are read, and the codes read
and written, by natural chunks of ``block_size`` rows (one chunk per task:
no lock), and rows move between chunks and blocks through Dask
(`move_rows`: each source splits its rows by target, each target assembles
its pieces), so no process ever holds more than a block's share of each
chunk.  The rows of a stored Laplacian move the same way, sparse, their
columns renumbered into the blocks' order on arrival (P L P^T).  The objective, and so the result, is the same in any order; only the
rounding of the block sums differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from sae.distributed.blocks import block_bounds, compact, densify

logger = logging.getLogger("sae.distributed")

__all__ = ["cluster_order", "Ordering", "split_rows", "assemble_rows", "assemble_sparse_rows", "move_rows",
           "halo_wants", "halo_plans"]

#: Frames the k-means of `cluster_order` is fitted on (taken evenly).
ORDER_SAMPLE = 100_000

#: Rows labelled at once by `cluster_order`.
ORDER_CHUNK = 100_000


def cluster_order(X: Any, n_clusters: int, *, sample: int = ORDER_SAMPLE, random_state: int = 0) -> np.ndarray:
    """A permutation of the rows of ``X`` (N, n) grouping frames by k-means cluster (module docstring).

    ``X`` is read ``ORDER_CHUNK`` rows at a time (a Zarr array or an ndarray).
    """
    from sklearn.cluster import MiniBatchKMeans

    n_rows = int(X.shape[0])
    step = max(1, n_rows // sample)
    fitted = np.concatenate([np.asarray(X[start : start + ORDER_CHUNK])[(-start) % step :: step]
                             for start in range(0, n_rows, ORDER_CHUNK)]).astype(np.float64)
    kmeans = MiniBatchKMeans(n_clusters=min(n_clusters, len(fitted)), random_state=random_state, n_init=3,
                             batch_size=4096).fit(fitted)
    mean = fitted.mean(axis=0)
    direction = np.linalg.svd(fitted - mean, full_matrices=False)[2][0]
    rank = np.empty(kmeans.n_clusters, dtype=np.int64)
    rank[np.argsort((kmeans.cluster_centers_ - mean) @ direction, kind="stable")] = np.arange(kmeans.n_clusters)
    labels = np.empty(n_rows, dtype=np.int64)
    projection = np.empty(n_rows, dtype=np.float64)
    for start in range(0, n_rows, ORDER_CHUNK):
        rows = np.asarray(X[start : start + ORDER_CHUNK], dtype=np.float64)
        labels[start : start + len(rows)] = rank[kmeans.predict(rows)]
        projection[start : start + len(rows)] = (rows - mean) @ direction
    return np.lexsort((np.arange(n_rows), projection, labels))


class Ordering:
    """Which frames each block holds (``members[b]``, sorted natural row indices) and the maps between the blocks
    and the natural chunks ``[j * chunk, (j + 1) * chunk)`` of the store.

    ``order`` None: the stored order, block ``b`` = chunk ``b`` (nothing moves).
    """

    def __init__(self, n_rows: int, block_size: int, order: np.ndarray | None = None) -> None:
        self.n_rows, self.block_size = n_rows, block_size
        chunks = block_bounds(n_rows, block_size)
        self.identity = order is None
        if order is None:
            self.members = [np.arange(start, stop) for start, stop in chunks]
        else:
            order = np.asarray(order, dtype=np.int64)
            if order.shape != (n_rows,) or not np.array_equal(np.sort(order), np.arange(n_rows)):
                raise ValueError(f"order must be a permutation of {n_rows} rows")
            self.members = [np.sort(order[start:stop]) for start, stop in chunks]
        self.block_of = np.empty(n_rows, dtype=np.int32)  # natural row -> its block
        self.position = np.empty(n_rows, dtype=np.int32)  # natural row -> its row in the block
        for b, rows in enumerate(self.members):
            self.block_of[rows] = b
            self.position[rows] = np.arange(len(rows), dtype=np.int32)

    def chunk_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """natural row -> its chunk, and -> its row in the chunk."""
        rows = np.arange(self.n_rows, dtype=np.int64)
        return (rows // self.block_size).astype(np.int32), (rows % self.block_size).astype(np.int32)

    @property
    def sizes(self) -> list[int]:
        return [len(rows) for rows in self.members]

    def relabel(self) -> np.ndarray:
        """natural row -> its row in the blocks' order (blocks one after the other); int32 below 2**31 rows."""
        dtype = np.int32 if len(self.block_of) < 2**31 else np.int64
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        return (offsets[self.block_of] + self.position).astype(dtype, copy=False)

    def in_block_share(self, matrix: sp.sparray) -> float:
        """The share of the off-diagonal non-zeros of ``matrix`` (N, N) whose two frames are in one block."""
        coo = sp.coo_array(matrix)
        off = coo.row != coo.col
        if not off.any():
            return 1.0
        return float(np.mean(self.block_of[coo.row[off]] == self.block_of[coo.col[off]]))


def laplacian_rows(source: Any, rows: np.ndarray, relabel: np.ndarray, dtype: str) -> sp.csr_array:
    """The rows ``rows`` (natural, sorted) of a Laplacian, its columns renumbered by ``relabel`` (natural row ->
    its row in the blocks' order), indices sorted.

    ``source``: a sparse matrix in memory (a stored one moves by chunks: `move_rows` with ``relabel``).
    """
    return _relabelled(sp.csr_array(source)[rows], relabel, dtype)


def _relabelled(rows: Any, relabel: np.ndarray, dtype: str) -> sp.csr_array:
    rows = sp.csr_array(rows, dtype=dtype)
    out = sp.csr_array((rows.data, relabel[rows.indices], rows.indptr), shape=rows.shape)
    out.sort_indices()
    return out


def split_rows(values: Any, rows: np.ndarray, target_of: np.ndarray, position_of: np.ndarray,
               sparse: bool = False) -> dict[int, tuple]:
    """``values`` (len(rows), m), whose natural rows are ``rows``, split by target: ``{t: (positions, rows)}``;
    the rows dense, or CSR with ``sparse``."""
    targets = target_of[rows]
    values = sp.csr_array(values) if sparse else densify(values)
    out = {}
    for target in np.unique(targets).tolist():
        index = np.flatnonzero(targets == target)
        out[target] = (position_of[rows[index]], values[index])
    return out


def pick(split: dict[int, tuple], target: int) -> tuple:
    """One target's piece of a `split_rows` result."""
    return split[target]


def assemble_rows(n_rows: int, n_cols: int, dtype: str, density: float | None, *pieces: tuple) -> Any:
    """A target's rows from its pieces ``(positions, rows)``; compact (`compact`) when ``density`` is given."""
    out = np.zeros((n_rows, n_cols), dtype=dtype)
    for positions, values in pieces:
        out[positions] = values
    return out if density is None else compact(out, density=density)


def assemble_sparse_rows(n_rows: int, n_cols: int, relabel: np.ndarray, dtype: str, *pieces: tuple) -> sp.csr_array:
    """A target's rows (CSR) from its sparse pieces ``(positions, rows)``, columns renumbered by ``relabel``."""
    positions = np.concatenate([positions for positions, _ in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    if not np.array_equal(np.sort(positions), np.arange(n_rows)):
        raise ValueError(f"the pieces hold rows {np.sort(positions)[:5]}..., not the {n_rows} rows of the target")
    if not pieces:
        return sp.csr_array((0, n_cols), dtype=dtype)
    stacked = sp.vstack([rows for _, rows in pieces], format="csr")
    return _relabelled(stacked[np.argsort(positions)], relabel, dtype)


def move_rows(client: Any, sources: Sequence[Any], source_rows: Sequence[np.ndarray], target_rows: Sequence[np.ndarray],
              target_of: np.ndarray, scattered: tuple[Any, Any], n_cols: int, dtype: str, *,
              density: float | None, key: str, home: Any = None, relabel: Any = None) -> list:
    """Futures of the targets' rows: target ``t`` holds the natural rows ``target_rows[t]``, gathered from the
    ``sources`` (futures of (len(source_rows[s]), n_cols) arrays, dense or CSR).

    ``target_of``: natural row -> its target; ``scattered``: futures of the
    same map and of natural row -> its position in the target, on the
    workers; ``home(t)``: the ``submit`` keywords of target ``t``'s tasks.
    With ``relabel`` (natural row -> its row in the blocks' order, or its
    future), the rows stay sparse and their columns are renumbered by it (the rows of L).
    """
    home = home or (lambda t: {})
    sparse = relabel is not None
    splits = [client.submit(split_rows, source, rows, *scattered, sparse, key=f"{key}-split-{s}")
              for s, (source, rows) in enumerate(zip(sources, source_rows))]
    holds = [set(np.unique(target_of[rows]).tolist()) for rows in source_rows]  # targets each source feeds
    targets = []
    for t, rows in enumerate(target_rows):
        # a piece is cut where its split is (only the piece moves to the target's worker, not the whole split)
        pieces = [client.submit(pick, splits[s], t, key=f"{key}-pick-{s}-{t}")
                  for s in range(len(sources)) if t in holds[s]]
        if sparse:
            target = client.submit(assemble_sparse_rows, len(rows), n_cols, relabel, dtype, *pieces,
                                   key=f"{key}-assemble-{t}", **home(t))
        else:
            target = client.submit(assemble_rows, len(rows), n_cols, dtype, density, *pieces,
                                   key=f"{key}-assemble-{t}", **home(t))
        targets.append(target)
    return targets


def halo_wants(rows: sp.csr_array, start: int, block_of: np.ndarray) -> dict[str, Any]:
    """What the natural rows ``[start, start + len(rows))`` of ``L`` will bring to their blocks once moved there.

    ``block_of``: natural row -> its block.  Returns ``nnz`` (non-zeros per block, an array over the blocks
    seen) and ``wanted`` (``{(b, c): natural rows of block c that block b's rows
    link to}``, c != b): what `sae.distributed.blocks.graph_block` finds after
    the move, known here before any row moves.
    """
    rows = sp.csr_array(rows)
    rows_block = np.asarray(block_of[start : start + rows.shape[0]], dtype=np.int64)
    entry_block = np.repeat(rows_block, np.diff(rows.indptr))
    cols = rows.indices.astype(np.int64)
    col_block = np.asarray(block_of)[cols].astype(np.int64)
    n_blocks = int(max(entry_block.max(initial=-1), col_block.max(initial=-1))) + 1
    across = entry_block != col_block
    pair = entry_block[across] * n_blocks + col_block[across]
    order = np.lexsort((cols[across], pair))
    pair, cols = pair[order], cols[across][order]
    keep = np.ones(pair.size, dtype=bool)
    keep[1:] = (pair[1:] != pair[:-1]) | (cols[1:] != cols[:-1])
    pair, cols = pair[keep], cols[keep]
    cuts = np.flatnonzero(np.diff(pair)) + 1
    wanted = {divmod(int(p[0]), n_blocks): c for p, c in zip(np.split(pair, cuts), np.split(cols, cuts)) if p.size}
    return {"nnz": np.bincount(entry_block, minlength=n_blocks), "wanted": wanted}


def halo_plans(n_blocks: int, *parts: dict[str, Any]) -> list[tuple[int, dict[int, int]]]:
    """Per block, from the `halo_wants` of all the rows of ``L``: its non-zeros and ``{c: rows of c it receives}``."""
    nnz = np.zeros(n_blocks, dtype=np.int64)
    wanted: dict[tuple[int, int], list[np.ndarray]] = {}
    for part in parts:
        nnz[: part["nnz"].size] += part["nnz"]
        for pair, cols in part["wanted"].items():
            wanted.setdefault(pair, []).append(cols)
    requests: list[dict[int, int]] = [{} for _ in range(n_blocks)]
    for (b, c), pieces in sorted(wanted.items()):
        requests[b][c] = int(np.unique(np.concatenate(pieces)).size)
    return [(int(nnz[b]), requests[b]) for b in range(n_blocks)]
