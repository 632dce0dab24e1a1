"""Row blocks of the frames, graph blocks of the Laplacian and their halo plan, code blocks.

The frames ``X`` (N, n) are cut into row blocks ``X_b`` (N_b, n) of
``block_size`` frames (`block_bounds`); block ``b`` owns the rows ``Z_b``
(N_b, m) of the codes.  Only the graph term couples blocks:
``(L Z)_b = sum_c L[b, c] Z_c`` needs, from every other block ``c``, the rows of
``Z_c`` whose columns are non-zero in ``L[b rows, :]``: the *halo* of ``b`` in
``c``.  `graph_block` splits block ``b``'s rows of ``L`` into an own part
(N_b, N_b) and a halo part (N_b, H) and records which rows it needs from
whom (``requests``); `send_plan` turns the requests into what each block
sends.

Code blocks are kept *compact* (`compact`): CSR when at most
``sparse_density`` of their entries are non-zero, dense otherwise.

>>> block_bounds(10, 4)
[(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from numba import njit

from sae.distributed.memory import trim_pool
from sae.solvers import spectral_norm
from sae.terms import inner

#: Code blocks are kept as CSR (values and column indices: 8 bytes per non-zero in float32,
#: 12 in float64, against 4 or 8 per entry dense) when at most this fraction is non-zero.  A CSR
#: iterate is densified and compacted at every iteration of the Z step, which costs time, and the
#: peak memory of a training is set by its first Z step anyway, which is dense: CSR only where it
#: divides the memory by 5 or more.  The same rule keeps the codes between steps.
SPARSE_STATE_DENSITY = 0.1


def block_bounds(n_rows: int, block_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of consecutive blocks of ``block_size`` rows (the last may be shorter).

    >>> block_bounds(7, 3)
    [(0, 3), (3, 6), (6, 7)]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return [(start, min(start + block_size, n_rows)) for start in range(0, n_rows, block_size)]


@dataclass(frozen=True)
class LaplacianRef:
    """A Laplacian stored with :func:`sae.store.write_sparse`: ``group[name]`` (CSR, rows readable by range).

    ``kind`` is the kind of Laplacian (``"normalized"`` or ``"combinatorial"``,
    see :func:`sae.graph.laplacian_matrix`) when known: the norm bound of a
    normalised Laplacian is 2 (:func:`sae.graph.laplacian_norm_bound`).
    """

    group: zarr.Group
    name: str
    kind: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n_rows, n_cols = self.group[self.name].attrs["shape"]
        return int(n_rows), int(n_cols)


def read_block(source: Any, start: int | None, stop: int | None, dtype: str) -> np.ndarray:
    """Rows ``[start, stop)`` of a Zarr array (or an in-memory block when ``start`` is None), C-contiguous."""
    rows = source if start is None else source[start:stop]
    return np.ascontiguousarray(np.asarray(rows), dtype=dtype)


def read_laplacian_rows(source: Any, start: int | None, stop: int | None, dtype: str) -> sp.csr_array:
    """Rows ``[start, stop)`` of a stored Laplacian (or an in-memory block of rows when ``start`` is None)."""
    if isinstance(source, LaplacianRef):
        from sae.store import read_sparse

        rows = read_sparse(source.group, source.name, rows=slice(start, stop))
    else:
        rows = sp.csr_array(source)
    rows = sp.csr_array(rows, dtype=dtype)
    rows.sort_indices()
    return rows


def row_source(source: Any, start: int, stop: int) -> tuple[Any, int | None, int | None]:
    """What a task needs to read rows ``[start, stop)``: the stored array, or the in-memory rows themselves."""
    if isinstance(source, (zarr.Array, LaplacianRef)):
        return source, start, stop
    return source[start:stop], None, None


# --------------------------------------------------------------------------- graph blocks


@dataclass(frozen=True)
class GraphBlock:
    """Rows ``[start, stop)`` of ``L`` and their halo plan.

    The rows (N_b, N), with their columns renumbered into ``[own rows, halo of
    the first neighbour, halo of the second, ...]``, split into ``own``
    (N_b, N_b) and ``halo`` (N_b, H) (int32 indices when they fit: the blocks
    stay in worker memory for the whole training); ``requests[c]`` the sorted
    local row indices of block ``c`` that this block needs;
    ``abs_row_sum_max`` = ``max_i sum_j |L_ij|`` over the block's rows.
    """

    own: sp.csr_array
    halo: sp.csr_array
    neighbours: tuple[int, ...]
    requests: dict[int, np.ndarray]
    abs_row_sum_max: float


def graph_block(rows: sp.csr_array, bounds: Sequence[tuple[int, int]], index: int) -> GraphBlock:
    """Block ``index``'s rows of ``L`` (N_b, N), split into own and halo parts, with the halo plan."""
    starts = np.array([start for start, _ in bounds] + [bounds[-1][1]])
    start, stop = bounds[index]
    cols = rows.indices.astype(np.int64)
    owner = np.searchsorted(starts, cols, side="right") - 1
    new_cols = np.empty_like(cols)
    own = owner == index
    new_cols[own] = cols[own] - start
    offset = stop - start
    requests: dict[int, np.ndarray] = {}
    neighbours = []
    for c in np.unique(owner[~own]).tolist():
        mask = owner == c
        wanted, position = np.unique(cols[mask] - starts[c], return_inverse=True)
        requests[c] = wanted
        neighbours.append(c)
        new_cols[mask] = offset + position
        offset += wanted.size
    extended = sp.csr_array((rows.data, new_cols.astype(np.int64), rows.indptr), shape=(stop - start, offset))
    own_part, halo_part = (_narrow_indices(extended[:, : stop - start]), _narrow_indices(extended[:, stop - start :]))
    abs_sums = np.abs(rows).sum(axis=1) if rows.nnz else np.zeros(1)
    return GraphBlock(own_part, halo_part, tuple(neighbours), requests, float(np.max(abs_sums, initial=0.0)))


def _narrow_indices(matrix: sp.sparray) -> sp.csr_array:
    """``matrix`` as CSR with int32 indices and index pointers when they fit (scipy keeps int64 otherwise)."""
    matrix = sp.csr_array(matrix)
    if max(matrix.shape[1], matrix.nnz) < np.iinfo(np.int32).max:
        matrix = sp.csr_array((matrix.data, matrix.indices.astype(np.int32), matrix.indptr.astype(np.int32)),
                              shape=matrix.shape, copy=False)
    return matrix


def graph_summary(block: GraphBlock) -> dict[str, Any]:
    """What the client needs of a graph block: ``neighbours`` (the blocks whose rows it needs), ``bound`` (its
    largest absolute row sum), ``nnz``, ``halo_rows`` and ``requests`` (``{neighbour: rows wanted}``)."""
    return {"neighbours": block.neighbours, "bound": block.abs_row_sum_max, "nnz": block.own.nnz + block.halo.nnz,
            "halo_rows": block.halo.shape[1], "requests": {c: int(r.size) for c, r in block.requests.items()}}


def graph_request(block: GraphBlock, source: int) -> np.ndarray:
    """The local row indices of block ``source`` that ``block`` needs."""
    return block.requests[source]


def send_plan(receivers: Sequence[int], wanted: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    """``{receiver: rows it wants}`` of one block."""
    return dict(zip(receivers, wanted))


def laplacian_power_norm(*blocks: sp.csr_array) -> float:
    """``||L||_2`` by :func:`sae.solvers.spectral_norm` on the stacked row blocks, in one task.

    ``L`` (N, N) has ~``(K + 1) N`` non-zeros for a kNN graph: 12 bytes each on
    one worker, far less than the codes; one task avoids a client round trip
    per power iteration.
    """
    return spectral_norm(sp.vstack(blocks, format="csr"))


# --------------------------------------------------------------------------- code blocks


def compact(x: np.ndarray, nnz: float | None = None, density: float = SPARSE_STATE_DENSITY) -> Any:
    """``x`` as CSR when at most ``density`` of its entries are non-zero, else as it is.

    ``nnz``: the number of non-zeros of ``x`` when already known (not counted again).
    """
    if sp.issparse(x) or x.size == 0:
        return x
    nnz = int(np.count_nonzero(x) if nnz is None else nnz)
    if nnz > density * x.size:
        return x
    index = np.int32 if max(nnz, x.shape[1]) < np.iinfo(np.int32).max else np.int64
    data, indices, indptr = np.empty(nnz, x.dtype), np.empty(nnz, index), np.empty(x.shape[0] + 1, index)
    if _dense_to_csr(np.ascontiguousarray(x), data, indices, indptr) != nnz:
        raise ValueError(f"nnz={nnz} is not the number of non-zeros of x")
    return sp.csr_array((data, indices, indptr), shape=x.shape, copy=False)


@njit(cache=True, nogil=True)
def _dense_to_csr(x, data, indices, indptr):  # pragma: no cover - compiled
    """Fill the CSR arrays of ``x`` (sized by its non-zero count, checked: the count found is returned).

    scipy's ``csr_array(dense)`` goes through ``nonzero`` and COO, several times slower.
    """
    count = 0
    for i in range(x.shape[0]):
        indptr[i] = count
        for j in range(x.shape[1]):
            if x[i, j] != 0:
                if count < data.size:
                    data[count] = x[i, j]
                    indices[count] = j
                count += 1
    indptr[x.shape[0]] = count
    return count


def densify(rows: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` as a dense array: a CSR block is expanded (into ``out`` when given), a dense one returned as is."""
    if not sp.issparse(rows):
        return rows
    if out is None:
        return rows.toarray()
    out[:] = 0
    return rows.toarray(out=out)


def zeros(n_rows: int, n_cols: int, dtype: str) -> sp.csr_array:
    """An all-zero code block (an empty CSR)."""
    return sp.csr_array((n_rows, n_cols), dtype=dtype)


# --------------------------------------------------------------------------- per-block sums and I/O


def block_statistics(X_block: np.ndarray, Z_block: Any) -> dict[str, Any]:
    """``Z_b^T Z_b`` (m, m), ``Z_b^T X_b`` (m, n), ``||Z_b||_F^2``, ``||Z_b||_1`` and its non-zeros."""
    trim_pool()  # the Z step is over
    Z_block = densify(Z_block)
    return {
        "ZtZ": Z_block.T @ Z_block,
        "ZtX": Z_block.T @ X_block,
        "Z_sq": inner(Z_block, Z_block),
        "l1": float(np.abs(Z_block).sum(dtype=np.float64)),
        "nnz": int(np.count_nonzero(Z_block)),
    }


def block_data_statistics(X_block: np.ndarray) -> dict[str, Any]:
    """``X_b^T X_b`` (n, n) and ``||X_b||_F^2``."""
    return {"XtX": X_block.T @ X_block, "X_sq": inner(X_block, X_block)}


def block_residuals(
    X_block: np.ndarray, Z_block: Any, components: np.ndarray, encoder: np.ndarray | None
) -> dict[str, float]:
    """``||X_b - Z_b C||_F^2`` and ``||Z_b - X_b E^T||_F^2`` (NaN without encoder)."""
    Z_block = densify(Z_block)
    residual = X_block - Z_block @ components
    out = {"reconstruction": inner(residual, residual), "encoder": float("nan")}
    if encoder is not None:
        residual = Z_block - X_block @ encoder.T
        out["encoder"] = inner(residual, residual)
    return out


def write_block(array: zarr.Array, start: int, stop: int, values: Any) -> int:
    """Write a code block, dense, to rows ``[start, stop)`` of ``array`` (one chunk: no lock needed)."""
    array[start:stop] = densify(values)
    return stop - start


def read_code_block(source: Any, start: int, stop: int, dtype: str,
                    density: float = SPARSE_STATE_DENSITY) -> Any:
    """Rows ``[start, stop)`` of stored codes, compact (CSR when sparse enough, as the iterates)."""
    trim_pool()
    return compact(read_block(source, start, stop, dtype), density=density)
