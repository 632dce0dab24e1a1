"""Distributed training of the structured auto-encoder on a Dask cluster.

Orientation (see :mod:`sae`): ``X`` (N, n) frames, ``Z`` (N, m) codes,
``C`` (m, n) components, ``E`` (m, n) encoder, ``L`` (N, N) Laplacian.  The
frames are cut into row blocks ``X_b`` (N_b, n) of ``block_size`` frames;
block ``b`` owns the rows ``Z_b`` (N_b, m) of the codes (the thesis's
*columns* of ``Z``: our Z step is "column-parallel" in its orientation).
The objective is :func:`sae.model.fit_sae`'s, and so is the algorithm: an
outer loop of a Z step, a D step and an E step, with the same FISTA, the same
step sizes and the same stopping rules.

Z step (block-parallel)
-----------------------
Smooth part ``1/2 <Z, A(Z)> - <Z, B> + c`` with, per block,
``A(Z)_b = lambda_d Z_b C C^T + lambda_e Z_b + lambda_g (L Z)_b`` and
``B_b = lambda_d X_b C^T + lambda_e X_b E^T``.  Only the graph term couples
blocks: ``(L Z)_b = sum_c L[b, c] Z_c`` needs, from every other block ``c``,
the rows of ``Z_c`` whose columns are non-zero in ``L[b rows, :]`` (the
*halo* of ``b`` in ``c``).

* ``lambda_g > 0``: **one global FISTA whose iterations are per-block
  tasks.**  Iteration ``k`` is one task per block that receives the halo rows
  of ``x_k`` and ``x_{k-1}`` from its neighbours, computes the block's parts
  of ``F(x_k)`` and the next iterate ``x_{k+1, b} = soft(y_b - step grad_b,
  step lambda_z)`` with ``y = x_k + alpha_k (x_k - x_{k-1})`` and
  ``grad_b = lambda_d (y_b C - X_b) C^T + lambda_e (y_b - X_b E^T) + lambda_g (L y)_b``
  (the gradient of the smooth part at ``y``, as :func:`sae.solvers.fista`).
  Linear maps of ``y`` are extrapolated from those of ``x_k`` and
  ``x_{k-1}``: ``y_b C`` from ``P_k = x_k C`` and ``P_{k-1}`` (N_b, n), kept in
  the block's state or, offloaded, in its file (see Memory): the
  reconstruction costs two (N_b, m) x (m, n) products per iteration, ``y C``
  and ``x_{k+1} C``, and ``F(x_k)``'s part is ``||P_k - X_b||^2``; and
  ``(L y)_b`` from ``(L x_k)_b`` and ``(L x_{k-1})_b``,
  two products with the block's rows of ``L``; small tasks then cut
  the halo rows of ``x_{k+1, b}`` wanted by each neighbour.  The adaptive
  restart of :func:`sae.solvers.fista` (momentum reset when
  ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0``) needs a global sum: each block
  returns its two partial inner products and a tiny task sums them in block
  order and yields ``(t_{k+1}, alpha_{k+1})`` for the next iteration, on the
  cluster, so the client need not be in the loop.  Every operation
  is row-wise except ``L Z``, which the halo makes exact, and the restart
  test, which is summed globally, so the iterates **are** those of
  :func:`sae.solvers.fista` on the global problem (the same ``alpha_k``, the
  same global ``beta``; equal up to float rounding of the sums), and
  converge as it does.  The client sums the
  per-block objective parts in block order, applies the global stopping rule
  of :func:`sae.solvers.fista` (``|F_k - F_{k-1}| <= rtol |F_k|``, ``atol``,
  ``max_iter``, and ``x_0`` back if the last iterate is worse) and decides.
  Iterations are submitted ``lookahead`` ahead of that test (the momentum
  ``alpha_k`` depends on ``k`` only), so the round trip is hidden; iterates
  submitted past the stop are simply dropped.

  Communication per iteration: each block ``c`` cuts one *pack*
  ``{b: rows of x_{k+1, c} that b needs}`` (CSR when sparse enough, which
  the prox makes them); a pack moves at most once to each *worker* that holds
  a neighbour of ``c`` (Dask keeps a transferred pack for every task on that
  worker), so the traffic is at most (workers - 1) x the halo rows, and 3
  tasks per block (iterate, pack, scalars) plus one momentum task per
  iteration, whatever the number of neighbours.  Each block returns a few
  floats; nothing of size N reaches the client.
  ``beta = 1.01 (lambda_d ||C C^T||_2 + lambda_e + lambda_g ||L||_2)``
  (:data:`sae.solvers.LIPSCHITZ_SAFETY`); ``||C C^T||_2`` is an (m, m)
  power iteration on the client; ``||L||_2`` is computed once per training,
  either by the power iteration of :func:`sae.solvers.spectral_norm`, as the
  in-memory fit, in ONE task that stacks the row blocks of ``L``
  (``laplacian_norm="power"``, the default: ``L`` has ~``(K+1) N``
  non-zeros, ~0.3 GB at full scale on one worker, and one task avoids up to
  2000 client round trips), or by the Gershgorin bound ``max_i sum_j |L_ij|``
  (``"bound"``: per-block scalars, no iteration, valid for any symmetric
  ``L``; an upper bound, so a smaller step; for a normalised Laplacian, whose
  norm is at most 2, passing ``laplacian_norm=2.0`` is the cheaper bound).

* ``lambda_g = 0``: blocks are independent, and each block's whole Z step runs
  in **one task** (:func:`sae.model.solve_codes` on the block, one thread: no
  round trips).  With the default ``z_solver`` ("auto" = "cd") every frame is
  solved by coordinate descent and stops on its own duality gap, so the codes
  are bitwise those of the in-memory fit whatever the blocks.  With
  ``z_solver="fista"`` the stopping rule is per block; it is at least as strict
  as the global one: if ``|dF_b| <= rtol |F_b|`` for every block then
  ``|dF| <= sum |dF_b| <= rtol F`` (every ``F_b >= 0``), so the global rule is
  met when every block stops; blocks may run a few more iterations than the
  in-memory fit, never fewer.  The reported inner iteration count is the
  maximum over blocks.

Memory.  The FISTA state lives in worker memory as futures: per block
``X_b`` and ``P_k``, ``P_{k-1}`` (N_b, n), the iterates ``x_k``, ``x_{k-1}``
(N_b, m) kept as CSR when at most 10% of their entries are non-zero
(:data:`SPARSE_STATE_DENSITY`; 8 bytes per non-zero in float32) and dense
otherwise, and ``X_b E^T`` (N_b, m) when ``lambda_e > 0``; nothing else of
size (N_b, m) outlives a task but `POOL_SPARE` free arrays per worker:
the dense arrays of the iterates and of ``x_k C`` are recycled on each
worker (`_pooled_empty`: the arrays of the generation Dask has just
released; a fresh one costs ~25% of a block iteration in page faults).
The client keeps no reference to a state once the next iteration is
submitted, so a block's state is freed as soon as its successor exists: two
generations of iterates per block, plus those of the ``lookahead - 1``
iterations submitted ahead;
the codes the step started from are not held when they are in the store
(the zeros of the first step, or a checkpoint): they are read again only if
the start turns out better than the last iterate.  At full scale
(N = 1,288,000, n = 96, m = 512, float32, ``lambda_e = 0``) one generation
is 2.6 GB over the cluster dense, ~0.5 GB as CSR at 10% non-zeros (the
thesis's codes had 5-20%), and the first Z step of a training is dense: from
``Z = 0`` the first step is ``soft(step lambda_d X C^T, step lambda_z)``,
positive everywhere for non-negative data and the thesis's non-negative
initial atoms, and the iterates sparsify over the iterations.  Two dense
generations then hold ~5.3 GB, the floor of this FISTA in memory.  With
``offload_previous`` (:class:`sae.config.TrainConfig`) a dense block keeps
only ``x_k`` in memory: ``x_{k-1}``, ``P_{k-1}`` and ``P_k`` are in a file
of its worker (`_Offloaded`: unlinked files in the worker's local
directory, recycled, with direct I/O where the filesystem allows, so the
page cache does not hold them either).  Each block iteration writes
``x_k`` and ``P_k`` while its kernel computes ``x_{k+1}``, then
``P_{k+1}``; the worker's I/O thread reads a block's file back while the
block before it computes (`_OffloadFiles.prefetch_after`).  The iterates
are the same to the bit, for ~2 x 112 MB of disk traffic per block
iteration at full scale (N_b = 40,250).  Workers with
a ``memory_limit`` spill block states to disk beyond it (Dask's
``distributed.worker.memory`` thresholds): their sizes are registered with
``dask.sizeof`` below (Dask counted scipy sparse arrays and dataclasses as
56 bytes); an offloaded state is pickled with its file's arrays read back
(`_Resident`), so spilling one costs more than it saves: give workers with
``offload_previous`` room for one generation.  Each running task adds the new iterate (N_b, m) and, when the
iterates are CSR, their two dense forms, or when offloaded the ``x_{k-1}``
read back and the next block's read ahead (pooled arrays, free again after
the task).  The scheduler's work stealing is
paused during a training (`_without_work_stealing`): it moved block tasks
and their states between workers.  The code blocks between steps are
kept as the iterates are.
The client holds only (m, m), (m, n), (n, n) matrices and scalars.

D and E steps (row-parallel)
----------------------------
Each block returns ``Z_b^T Z_b`` (m, m), ``Z_b^T X_b`` (m, n) and (once)
``X_b^T X_b`` (n, n); the client sums them **in block order** in float64 and
calls :func:`sae.model.solve_dictionary` and :func:`sae.model.solve_encoder`
on the sums.  The objective terms after the D and E steps are per-block sums
too (the graph term comes from the Z step, whose last task computed
``<Z_b, (L Z)_b>``).  Since every reduction is done on the client in block
order, the result does not depend on the number of workers nor on the order
in which tasks finish.

Storage and checkpoints
-----------------------
Codes are stored **dense**, chunked ``(block_size, m)`` and compressed
(:func:`sae.store.array_compressors`): each block writes exactly one chunk,
so block writes are chunk-aligned and need no lock; zeros compress well;
readers get a plain (N, m) array (no sparse format to agree on).

Checkpoint layout in the group ``model/<key>``: two slots
``checkpoint_0/`` and ``checkpoint_1/`` each holding ``codes`` (N, m),
``components`` (m, n) and ``encoder`` (m, n, absent when ``lambda_e = 0``).
Outer iteration ``k`` writes slot ``k % 2`` (the codes block by block, on
the workers), then the attributes ``history`` (list of records as
:class:`sae.model.FitResult`) and last ``last_complete_outer = k`` and
``checkpoint_slot``: a crash at any point leaves the previous checkpoint
intact.  A rerun with the same configuration resumes from it (the key does
not include ``max_outer``, so a run with a larger ``max_outer`` continues).
After a checkpoint the codes are read back from the store, which cuts the
task lineage: a worker lost later costs at most the current outer iteration,
which Dask recomputes from the store (every task is a pure function of its
inputs, so the recomputed result is the same).  With ``checkpoint_final_only``
(``TrainConfig.checkpoint = False``) only the last outer iteration is written,
to the one slot it uses.

>>> import numpy as np
>>> block_bounds(10, 4)
[(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import zarr
from dask.sizeof import sizeof
from numba import njit

from sae.config import ModelConfig, TrainConfig
from sae.model import (
    init_dictionary,
    init_encoder,
    log_outer,
    rebalance,
    relative_change,
    solve_codes,
    solve_dictionary,
    solve_encoder,
    weigh_terms,
)
from sae.solvers import LIPSCHITZ_SAFETY, next_momentum, spectral_norm
from sae.solvers import stop_reason as fista_stop_reason
from sae.store import json_safe
from sae.terms import inner

__all__ = [
    "STAGE",
    "model_key",
    "train_model",
    "open_model",
    "LaplacianRef",
    "DistributedFit",
    "block_bounds",
    "fit_distributed",
    "read_checkpoint",
    "checkpoint_arrays",
]

logger = logging.getLogger("sae.distributed")

#: Halo rows are sent as CSR when at most this fraction of their entries is non-zero.
SPARSE_HALO_DENSITY = 0.25

#: Code blocks are kept as CSR (values and column indices: 8 bytes per non-zero in float32,
#: 12 in float64, against 4 or 8 per entry dense) when at most this fraction is non-zero.  A CSR
#: iterate costs time (densified and compacted at every iteration: a 40,250 x 512 block iteration
#: takes 259-268 ms at 20-30% non-zeros against 170 ms dense) and the peak memory of a training is
#: set by its first Z step anyway, which is dense (module docstring): CSR only where it divides
#: the memory by 5 or more.  The same rule keeps the codes between steps (and those of the
#: graph-free Z step, one task per block).
SPARSE_STATE_DENSITY = 0.1

#: A Z step with the graph term logs its progress (iteration, objective, non-zeros) at most this often, in seconds.
PROGRESS_SECONDS = 30.0


# --------------------------------------------------------------------------- blocks and sources


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
    """A Laplacian stored with :func:`sae.store.write_sparse`: ``group[name]`` (CSR, rows readable by range)."""

    group: zarr.Group
    name: str

    @property
    def shape(self) -> tuple[int, int]:
        n_rows, n_cols = self.group[self.name].attrs["shape"]
        return int(n_rows), int(n_cols)


def _read_rows(source: Any, start: int, stop: int, dtype: str) -> np.ndarray:
    """Rows ``[start, stop)`` of a Zarr array (or of an in-memory block when ``start`` is None)."""
    rows = source if start is None else source[start:stop]
    return np.ascontiguousarray(np.asarray(rows), dtype=dtype)


def _read_laplacian_rows(source: Any, start: int | None, stop: int | None, dtype: str) -> sp.csr_array:
    """Rows ``[start, stop)`` of a stored Laplacian (or an in-memory block of rows when ``start`` is None)."""
    if isinstance(source, LaplacianRef):
        from sae.store import read_sparse

        rows = read_sparse(source.group, source.name, rows=slice(start, stop))
    else:
        rows = sp.csr_array(source)
    rows = sp.csr_array(rows, dtype=dtype)
    rows.sort_indices()
    return rows


def _row_source(source: Any, start: int, stop: int) -> tuple[Any, int | None, int | None]:
    """What a task needs to read rows ``[start, stop)``: the stored array, or the in-memory rows themselves."""
    if isinstance(source, (zarr.Array, LaplacianRef)):
        return source, start, stop
    return source[start:stop], None, None


# --------------------------------------------------------------------------- graph blocks


@dataclass(frozen=True)
class _GraphBlock:
    """Rows ``[start, stop)`` of ``L`` and their halo plan.

    The rows (N_b, N), with their columns renumbered into ``[own rows, halo of
    the first neighbour, halo of the second, ...]``, split into ``own``
    (N_b, N_b) and ``halo`` (N_b, H) (int32 indices when they fit: the blocks
    stay in worker memory for the whole training); ``requests[c]`` the sorted
    local row indices of block ``c`` that this block needs.
    """

    own: sp.csr_array
    halo: sp.csr_array
    neighbours: tuple[int, ...]
    requests: dict[int, np.ndarray]
    abs_row_sum_max: float


def _graph_block(rows: sp.csr_array, bounds: Sequence[tuple[int, int]], index: int) -> _GraphBlock:
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
    return _GraphBlock(own_part, halo_part, tuple(neighbours), requests, float(np.max(abs_sums, initial=0.0)))


def _narrow_indices(matrix: sp.sparray) -> sp.csr_array:
    """``matrix`` as CSR with int32 indices and index pointers when they fit (scipy keeps int64 otherwise)."""
    matrix = sp.csr_array(matrix)
    if max(matrix.shape[1], matrix.nnz) < np.iinfo(np.int32).max:
        matrix = sp.csr_array((matrix.data, matrix.indices.astype(np.int32), matrix.indptr.astype(np.int32)),
                              shape=matrix.shape, copy=False)
    return matrix


def _graph_neighbours(block: _GraphBlock) -> tuple[tuple[int, ...], float]:
    return block.neighbours, block.abs_row_sum_max


def _graph_request(block: _GraphBlock, source: int) -> np.ndarray:
    return block.requests[source]


def _laplacian_norm(*blocks: sp.csr_array) -> float:
    """``||L||_2`` by :func:`sae.solvers.spectral_norm` on the stacked row blocks, in one task.

    ``L`` (N, N) has ~``(K + 1) N`` non-zeros for a kNN graph: 12 bytes each on
    one worker (~0.3 GB at full scale), far less than the codes; one task
    avoids a client round trip per power iteration.
    """
    laplacian = sp.vstack(blocks, format="csr")
    return spectral_norm(laplacian)


# --------------------------------------------------------------------------- Z step kernels


@dataclass(frozen=True)
class _CodeProblem:
    """The data of block ``b``'s part of the Z step (constant during the step)."""

    index: int  # b
    data: np.ndarray  # X_b (N_b, n)
    components: np.ndarray | None  # C (m, n) when lambda_d > 0
    target: np.ndarray | None  # X_b E^T (N_b, m) when lambda_e > 0
    lambda_d: float
    lambda_z: float
    lambda_g: float
    lambda_e: float
    step: float
    graph: _GraphBlock | None
    offload: bool = False  # keep dense x_{k-1} and x_{k-1} C in an offload file (`_Offloaded`)


@dataclass(frozen=True)
class _CodeState:
    """FISTA state of one block after iteration ``k - 1``.

    ``x`` = x_k and ``x_prev`` = x_{k-1} (compact: CSR when sparse enough, see
    `_compact`); ``P`` = x_k C and ``P_prev`` = x_{k-1} C (N_b, n), from which
    ``y C`` is extrapolated; None when not computed yet (the start) or when
    ``lambda_d = 0``.  With ``offload_previous``, a dense x_{k-1} is an
    `_Offloaded` (or `_Resident`) holding x_{k-1} and, unless ``lambda_d = 0``,
    x_{k-1} C and x_k C; ``P`` and ``P_prev`` are then None.  ``scalars``: the block's parts of F(x_{k-1}) and of the
    restart test.
    """

    x: Any
    x_prev: Any = None
    P: np.ndarray | None = None
    P_prev: np.ndarray | None = None
    scalars: dict[str, float] = field(default_factory=dict)


def _compact(x: np.ndarray, nnz: float | None = None) -> Any:
    """``x`` as CSR when at most `SPARSE_STATE_DENSITY` of its entries are non-zero, else as it is.

    ``nnz``: the number of non-zeros of ``x`` when already known (not counted again).
    """
    if sp.issparse(x) or x.size == 0:
        return x
    nnz = int(np.count_nonzero(x) if nnz is None else nnz)
    if nnz > SPARSE_STATE_DENSITY * x.size:
        return x
    index = np.int32 if max(nnz, x.shape[1]) < np.iinfo(np.int32).max else np.int64
    data, indices, indptr = np.empty(nnz, x.dtype), np.empty(nnz, index), np.empty(x.shape[0] + 1, index)
    if _dense_to_csr(np.ascontiguousarray(x), data, indices, indptr) != nnz:
        raise ValueError(f"nnz={nnz} is not the number of non-zeros of x")
    return sp.csr_array((data, indices, indptr), shape=x.shape, copy=False)


@njit(cache=True, nogil=True)
def _dense_to_csr(x, data, indices, indptr):  # pragma: no cover - compiled
    """Fill the CSR arrays of ``x`` (sized by its non-zero count, checked: the count found is returned).

    scipy's ``csr_array(dense)`` goes through ``nonzero`` and COO: ~0.2 s for 40,000 x 512 at 10% non-zeros.
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


def _densify(rows: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` as a dense array: a CSR block is expanded (into ``out`` when given), a dense one returned as is."""
    if not sp.issparse(rows):
        return rows
    if out is None:
        return rows.toarray()
    out[:] = 0
    return rows.toarray(out=out)


#: Free arrays the pool keeps per shape while a training runs (the others are let go).
POOL_SPARE = 2


def _refcounts_tell_free() -> bool:
    """Whether this interpreter's reference counts say when a pooled array is free (CPython's do)."""
    flats = [np.frombuffer(bytearray(8), dtype=np.uint8)]  # as `_page_aligned_flat`: memory it does not own
    alone = sys.getrefcount(flats[0]) == 2
    handed = flats[0].reshape(2, 4)
    view = handed[1:]
    del handed
    held = sys.getrefcount(flats[0]) > 2  # the view of what was handed out holds the flat array
    del view
    return alone and held and sys.getrefcount(flats[0]) == 2


_REFCOUNTS_TELL_FREE = _refcounts_tell_free()  # else the pool hands out arrays it never recycles


class _ArrayPool:
    """Uninitialised arrays like ``np.empty``, recycled: one that nothing references any more, if any.

    For the new iterate and ``x_{k+1} C`` of every block iteration: Dask's
    workers run with ``MALLOC_TRIM_THRESHOLD_`` set, so a freed (N_b, m)
    array goes back to the system and a new one is a fresh ``mmap`` whose
    pages the kernel zeroes and faults in again, ~25% of a dense block
    iteration at full scale (measured: 228 -> 171 ms per 40,250 x 512 block).
    The pool keeps the flat array under every array it hands out (page-aligned
    in a mapping of its own, `_page_aligned_flat`, for direct I/O); one whose
    reference count is back to the pool's own (its state was released by
    Dask; the arrays handed out, their views and pickled buffers all hold
    references to it) is free and is handed out again.  Free arrays beyond
    `POOL_SPARE` per shape are let go at each request and by `trim`, all of
    them when no training runs.  Where reference counts cannot tell (not
    CPython), arrays are never recycled.
    """

    def __init__(self) -> None:
        self.arrays: dict[tuple, list[np.ndarray]] = {}  # (shape, dtype) -> the arrays handed out
        self.lock = threading.Lock()
        self.trainings = 0  # trainings running on this worker process (`_start_pool_trimming` .. `_release_pool`)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = math.prod(shape)
        if not _REFCOUNTS_TELL_FREE:
            return _page_aligned_flat(count, dtype).reshape(shape)
        key = (tuple(shape), np.dtype(dtype).str)
        with self.lock:
            arrays = self.arrays.setdefault(key, [])
            free = self._trim(arrays, POOL_SPARE + 1)
            flat = arrays[free[0]] if free else _page_aligned_flat(count, dtype)
            if not free:
                arrays.append(flat)
        # the pool keeps the flat arrays: what it hands out and all views of it have them as base
        return flat.reshape(shape)

    @staticmethod
    def _trim(arrays: list[np.ndarray], keep: int) -> list[int]:
        """Drop the free arrays of ``arrays`` beyond the first ``keep``; returns the indices of those kept."""
        # references to a free array: the pool's list and getrefcount's argument
        free = [i for i in range(len(arrays)) if sys.getrefcount(arrays[i]) == 2]
        drop = set(free[keep:])
        if drop:
            arrays[:] = [a for i, a in enumerate(arrays) if i not in drop]
        return free[:keep]

    def spare(self) -> int:
        """Free arrays (and offload files) kept per shape: `POOL_SPARE` while a training runs, else none."""
        return POOL_SPARE if self.trainings else 0

    def trim(self, keep: int | None = None) -> int:
        """Let go of the free arrays beyond ``keep`` per shape (default: `spare`).

        Returns the bytes let go.  Without trimming, the last generations of
        iterates (1.3 GB per worker at full scale) would stay allocated after a
        Z step while the codes are read back, and the states Dask spills to
        disk would free nothing: hence trims by the tasks that follow a Z step,
        and every `POOL_TRIM_SECONDS` on each worker (`_start_pool_trimming`),
        even when no task runs (a worker paused by its memory limit).
        """
        freed = 0
        with self.lock:
            keep = self.spare() if keep is None else keep
            for key in list(self.arrays):
                arrays = self.arrays[key]
                before = sum(a.nbytes for a in arrays)
                self._trim(arrays, keep)
                freed += before - sum(a.nbytes for a in arrays)
                if not arrays:
                    del self.arrays[key]
        return freed


_pool = _ArrayPool()


def _pooled_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array of this worker's pool (`_ArrayPool`)."""
    return _pool.empty(shape, dtype)


def _trim_pool() -> int:
    """Trim this worker's pool (`_ArrayPool.trim`) and its free offload files; returns the bytes let go."""
    return _pool.trim() + _files.trim()


#: Period of the pool trimming on each worker, in seconds.
POOL_TRIM_SECONDS = 0.5
_TRIM_CALLBACK = "sae-pool-trim"


def _start_pool_trimming(dask_worker: Any) -> None:
    """Trim the pool every `POOL_TRIM_SECONDS` on this worker's event loop (run by ``client.run``; idempotent).

    Left running for the worker's lifetime (trainings may overlap): a few
    microseconds when the pool is empty.
    """
    with _pool.lock:
        _pool.trainings += 1
    if _TRIM_CALLBACK not in dask_worker.periodic_callbacks:
        from tornado.ioloop import PeriodicCallback

        callback = PeriodicCallback(_trim_pool, POOL_TRIM_SECONDS * 1000)
        dask_worker.periodic_callbacks[_TRIM_CALLBACK] = callback
        callback.start()


def _release_pool() -> int:
    """Let go of the free pooled arrays (run on each worker after a training); returns the bytes let go.

    Pooled arrays still in use (another training's, or results Dask has not
    released yet) stay pooled until the periodic trimming finds them free.
    """
    with _pool.lock:
        _pool.trainings = max(_pool.trainings - 1, 0)
    return _pool.trim(keep=0) + _files.trim(0)


# --------------------------------------------------------------------------- previous iterates on disk
# With ``offload_previous``, a dense block's x_{k-1}, x_{k-1} C and x_k C live in a file of its worker instead of
# its memory (module docstring, Memory).  Direct I/O (O_DIRECT) keeps them out of the page cache too, where the
# filesystem allows.

#: Offsets, lengths and buffers of direct I/O are multiples of this many bytes.
DIRECT_ALIGN = 4096

#: Bytes per read or write call of an offloaded array (through a page-aligned buffer of this size, per thread).
OFFLOAD_CHUNK = 8 << 20


def _aligned(nbytes: int) -> int:
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


@dataclass(eq=False)
class _FileSlot:
    """An open, unlinked file of a worker (gone with its descriptor, also when the process dies)."""

    fd: int
    capacity: int  # bytes, a multiple of DIRECT_ALIGN
    direct: bool  # opened with O_DIRECT


class _OffloadFiles:
    """The worker process's offload files, recycled as `_ArrayPool` recycles arrays.

    A file is in use while the `_Offloaded` written to it exists; it is then
    free and written again by a later iteration (overwriting an allocated file
    costs ~10x less than creating one).  Free files beyond `POOL_SPARE` per
    size are closed by `trim`.  Files are created unlinked in the Dask
    worker's local directory (Dask's ``temporary-directory``), else in
    ``tempfile.gettempdir()``.
    """

    def __init__(self, pool: _ArrayPool) -> None:
        self.pool = pool  # whose ``trainings`` say whether free files are kept
        self.lock = threading.RLock()  # a finalizer may release a file in any thread, also one holding it
        self.free: dict[int, list[_FileSlot]] = {}  # capacity -> free files
        self.in_use = 0
        self.buffers = threading.local()  # the page-aligned buffer of each thread
        self.live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # sequence -> _Offloaded
        self.sequence = 0
        self.executor: Any = None  # the I/O thread: writes and reads ahead

    def submit(self, function: Callable, *args: Any) -> Any:
        """Run ``function(*args)`` in the I/O thread (one per process: writes and reads ahead in order)."""
        with self.lock:
            if self.executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self.executor = ThreadPoolExecutor(1, thread_name_prefix="sae-offload")
            return self.executor.submit(function, *args)

    def register(self, offloaded: _Offloaded) -> int:
        """Number a new `_Offloaded` in order of creation; returns its number."""
        with self.lock:
            self.sequence += 1
            self.live[self.sequence] = offloaded
            return self.sequence

    def prefetch_after(self, sequence: int) -> None:
        """Have the I/O thread read the live `_Offloaded` created next after number ``sequence``, unless it was
        read already (ahead or loaded)."""
        with self.lock:
            later = [s for s in list(self.live.data) if s > sequence]  # a snapshot (finalizers may remove)
            target = self.live.get(min(later)) if later else None
            if target is not None and target.prefetched is None and not target.loaded:
                target.prefetched = self.submit(target.read)

    @staticmethod
    def directory() -> str:
        """Where new files go: the local directory of the Dask worker running the calling task, else
        ``tempfile.gettempdir()``.  Call it in the task's thread (the worker is not known in other threads)."""
        try:
            from distributed import get_worker

            return get_worker().local_directory
        except ValueError:  # not in a worker task
            import tempfile

            return tempfile.gettempdir()

    @staticmethod
    def _open(directory: str) -> tuple[int, bool]:
        import os
        import tempfile

        plain = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        for flags in ((plain | os.O_DIRECT,) if hasattr(os, "O_DIRECT") else ()) + (plain,):
            if hasattr(os, "O_TMPFILE"):
                try:
                    return os.open(directory, flags | os.O_TMPFILE, 0o600), bool(flags & getattr(os, "O_DIRECT", 0))
                except OSError:
                    pass
            try:
                handle, path = tempfile.mkstemp(prefix="sae-offload-", dir=directory)
            except OSError:
                continue
            os.close(handle)
            try:
                fd = os.open(path, flags)
            except OSError:
                continue
            finally:
                os.unlink(path)
            return fd, bool(flags & getattr(os, "O_DIRECT", 0))
        raise OSError(f"cannot create an offload file in {directory!r}")

    def acquire(self, nbytes: int, directory: str | None = None) -> _FileSlot:
        """A free file of at least ``nbytes``, else a new one in ``directory`` (default: `directory()`)."""
        capacity = _aligned(nbytes)
        with self.lock:
            free = self.free.get(capacity)
            slot = free.pop() if free else None
            self.in_use += 1
        if slot is None:
            try:
                fd, direct = self._open(directory or self.directory())
            except BaseException:
                with self.lock:
                    self.in_use -= 1
                raise
            slot = _FileSlot(fd, capacity, direct)
        return slot

    def release(self, slot: _FileSlot) -> None:
        """Give a file back (the `_Offloaded` on it is gone); it is closed if the pool is trimmed."""
        with self.lock:
            self.in_use -= 1
            self.free.setdefault(slot.capacity, []).append(slot)
        if not self.pool.trainings:
            self.trim()

    def trim(self, keep: int | None = None) -> int:
        """Close the free files beyond ``keep`` per size (default: the pool's `_ArrayPool.spare`); returns the
        bytes of disk given back."""
        import os

        closed = []
        with self.lock:
            keep = self.pool.spare() if keep is None else keep
            for capacity in list(self.free):
                free = self.free[capacity]
                while len(free) > keep:  # pop: a finalizer releasing a file in between appends, never lost
                    closed.append(free.pop())
                if not free:
                    del self.free[capacity]
        for slot in closed:
            os.close(slot.fd)
        return sum(slot.capacity for slot in closed)

    def _buffer(self) -> memoryview:
        import mmap

        buffer = getattr(self.buffers, "buffer", None)
        if buffer is None:
            buffer = self.buffers.buffer = memoryview(  # page-aligned, one per thread for its lifetime
                mmap.mmap(-1, OFFLOAD_CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        return buffer

    def write(self, slot: _FileSlot, arrays: Sequence[np.ndarray], offset: int = 0) -> None:
        """Write ``arrays`` one after the other from ``offset``, each from an aligned offset."""
        self._transfer(slot, arrays, write=True, offset=offset)

    def read(self, slot: _FileSlot, out: Sequence[np.ndarray]) -> None:
        """Read back into ``out`` (C-contiguous arrays of the shapes and dtypes written)."""
        self._transfer(slot, out, write=False)

    @staticmethod
    def _move(slot: _FileSlot, piece: memoryview, position: int, write: bool) -> int:
        """One ``pwrite`` or ``preadv``; if the filesystem took O_DIRECT at open but refuses it now (EINVAL),
        the file goes on with buffered I/O."""
        import errno
        import fcntl
        import os

        try:
            return os.pwrite(slot.fd, piece, position) if write else os.preadv(slot.fd, [piece], position)
        except OSError as error:
            if error.errno != errno.EINVAL or not slot.direct:
                raise
        fcntl.fcntl(slot.fd, fcntl.F_SETFL, fcntl.fcntl(slot.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        slot.direct = False
        logger.warning("direct I/O refused by the filesystem of an offload file: buffered I/O instead")
        return os.pwrite(slot.fd, piece, position) if write else os.preadv(slot.fd, [piece], position)

    def _transfer(self, slot: _FileSlot, arrays: Sequence[np.ndarray], write: bool, offset: int = 0) -> None:
        """Move ``arrays`` to or from the file: straight from their memory when they are pooled (page-aligned,
        `_direct_extent`), else through this thread's page-aligned buffer."""
        import os

        for array in arrays:
            if not write and not array.flags.c_contiguous:
                raise ValueError("offloaded arrays are read into C-contiguous arrays")
            extent = _direct_extent(array)
            if extent is None:  # through the buffer: copied in before a write, out after a read
                buffer = self._buffer()
                staging = np.frombuffer(buffer, dtype=np.uint8)
                raw = (np.ascontiguousarray(array) if write else array).reshape(-1).view(np.uint8)
            step = OFFLOAD_CHUNK if extent is not None else buffer.nbytes
            for start in range(0, array.nbytes, step):
                size = min(step, array.nbytes - start)
                piece = (extent[start:] if extent is not None else buffer)[:_aligned(size)]
                if write and extent is None:
                    staging[:size] = raw[start:start + size]
                moved = self._move(slot, piece, offset + start, write)
                if moved < (piece.nbytes if write else size):
                    raise OSError(f"short {'write to' if write else 'read from'} an offload file "
                                  f"({moved} of {piece.nbytes} bytes at {offset + start})")
                if not write and extent is None:
                    raw[start:start + size] = staging[:size]
            offset += _aligned(array.nbytes)


#: Mappings of at least this many bytes ask for transparent huge pages (as numpy does for its large arrays).
_HUGE_PAGES_FROM = 4 << 20


def _page_aligned_flat(count: int, dtype: Any) -> np.ndarray:
    """Like ``np.empty(count)``, in an anonymous mapping of its own: page-aligned and a whole number of
    `DIRECT_ALIGN` bytes long, so that direct I/O goes straight from and into it (`_direct_extent`).

    The array does not own its memory (the mapping does): every view of a view of it has *it* as base.
    """
    import mmap

    dtype = np.dtype(dtype)
    size = max(_aligned(count * dtype.itemsize), DIRECT_ALIGN)
    # private (the default, shared, would be shmem: no transparent huge pages), huge pages as numpy asks them
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= _HUGE_PAGES_FROM and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, dtype=dtype, count=count)


def _direct_extent(array: np.ndarray) -> memoryview | None:
    """The bytes of ``array`` rounded up to `DIRECT_ALIGN`, if it is a whole `_page_aligned_flat` array (or a
    reshaped one); else None.  A part of one is not: reading the rounded-up bytes would write past it."""
    import mmap

    flat = array.base if isinstance(array.base, np.ndarray) else array
    owner = flat.base
    if not (isinstance(owner, memoryview) and isinstance(owner.obj, mmap.mmap)):
        return None
    if not array.flags.c_contiguous or array.ctypes.data != flat.ctypes.data or array.nbytes != flat.nbytes:
        return None
    view = memoryview(owner.obj)
    if np.frombuffer(view, dtype=np.uint8).ctypes.data != flat.ctypes.data:  # not from the mapping's first byte
        return None
    length = _aligned(array.nbytes)
    return view[:length] if length <= view.nbytes else None


_files = _OffloadFiles(_pool)


class _Offloaded:
    """Arrays kept in an offload file of this worker (`_OffloadFiles`) instead of its memory.

    ``load`` reads them back into pooled arrays (`_pooled_empty`), and has the
    I/O thread read ahead the *next* `_Offloaded` of this process in order of
    creation (`_OffloadFiles.prefetch_after`): a worker runs its blocks in the
    same order at every iteration, so that is the one its next block iteration
    loads, and its read then overlaps this iteration's kernel.  The file is free
    again once this object is gone.  Pickled (Dask moving a block state to
    another worker, or spilling it), it becomes the arrays themselves: a
    `_Resident`.
    """

    def __init__(self, arrays: Sequence[np.ndarray], files: _OffloadFiles | None = None, *, reserve: int = 0,
                 complete: bool = True, directory: str | None = None) -> None:
        """Write ``arrays``; ``reserve``: bytes for arrays to `append`; ``complete=False``: `complete` later;
        ``directory``: where a new file goes (`_OffloadFiles.directory`)."""
        self.files = _files if files is None else files
        self.specs: tuple = ()
        self.size = 0  # bytes written, each array from an aligned offset
        slot = self.files.acquire(sum(_aligned(a.nbytes) for a in arrays) + _aligned(reserve), directory)
        self._finalizer = weakref.finalize(self, self.files.release, slot)
        self.slot = slot
        self.prefetched: Any = None  # future of the arrays, read ahead by the I/O thread
        self.loaded = False
        self.sequence = 0  # order of creation, once complete
        for array in arrays:
            self.append(array)
        if complete:
            self.complete()

    def append(self, array: np.ndarray) -> None:
        """Write one more array (in the space reserved); only before `complete`."""
        if self.sequence:
            raise ValueError("cannot append to a complete offloaded set of arrays")
        if self.size + _aligned(array.nbytes) > self.slot.capacity:
            raise ValueError(f"no room left for {array.nbytes} bytes (reserve them when creating)")
        self.files.write(self.slot, (array,), offset=self.size)
        self.specs += ((tuple(array.shape), array.dtype.str),)
        self.size += _aligned(array.nbytes)

    def complete(self) -> None:
        """All arrays are written: number it in order of creation, so that loads read it ahead."""
        self.sequence = self.files.register(self)

    def read(self) -> tuple[np.ndarray, ...]:
        out = tuple(_pooled_empty(shape, dtype) for shape, dtype in self.specs)
        self.files.read(self.slot, out)
        return out

    def load(self, prefetch_next: bool = True) -> tuple[np.ndarray, ...]:
        """The arrays (read ahead, or read now); ``prefetch_next``: then read ahead the next one."""
        with self.files.lock:
            pending, self.prefetched, self.loaded = self.prefetched, None, True
        arrays = pending.result() if pending is not None else self.read()
        if prefetch_next and self.sequence:
            self.files.prefetch_after(self.sequence)
        return arrays

    def __reduce__(self) -> tuple:
        return _Resident, (self.load(prefetch_next=False),)


@dataclass(frozen=True, eq=False)
class _Resident:
    """Offloaded arrays brought back into memory (an unpickled `_Offloaded`): the same ``load``."""

    arrays: tuple[np.ndarray, ...]

    @property
    def specs(self) -> tuple:
        return tuple((tuple(a.shape), a.dtype.str) for a in self.arrays)

    def load(self, prefetch_next: bool = True) -> tuple[np.ndarray, ...]:
        return self.arrays


def _offload_async(arrays: Sequence[np.ndarray], reserve: int = 0) -> Any:
    """Write ``arrays`` to an offload file in this process's I/O thread (``reserve`` bytes more for `append`);
    a future of the `_Offloaded`, to `complete`."""
    # the worker's directory is looked up here, in the task's thread: the I/O thread does not know the worker
    return _files.submit(partial(_Offloaded, reserve=reserve, complete=False, directory=_files.directory()), arrays)


def _code_problem(
    index: int,
    X_block: np.ndarray,
    components: np.ndarray,
    encoder: np.ndarray | None,
    graph: _GraphBlock | None,
    params: dict[str, float],
) -> _CodeProblem:
    lambda_e = params["lambda_e"]
    return _CodeProblem(
        index=index,
        data=X_block,
        components=components if params["lambda_d"] > 0 else None,
        target=X_block @ encoder.T if lambda_e > 0 else None,
        lambda_d=params["lambda_d"],
        lambda_z=params["lambda_z"],
        lambda_g=params["lambda_g"],
        lambda_e=lambda_e,
        step=params["step"],
        graph=graph,
        offload=bool(params.get("offload_previous", False)),
    )


#: Rows per tile of `_block_iterate`: its reconstruction gradient (tile, m) and products stay in cache.
ITERATE_TILE = 1024


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _graph_row(i, own_data, own_indices, own_indptr, halo_data, halo_indices, halo_indptr, x, halo,
               out):  # pragma: no cover - compiled
    """``out = (L x)_i``: row ``i`` of ``L``'s own part times the block's rows ``x``, plus its halo part."""
    out[:] = 0
    for p in range(own_indptr[i], own_indptr[i + 1]):
        weight = out.dtype.type(own_data[p])
        row = x[own_indices[p]]
        for c in range(out.size):
            out[c] += weight * row[c]
    for p in range(halo_indptr[i], halo_indptr[i + 1]):
        weight = out.dtype.type(halo_data[p])
        row = halo[halo_indices[p]]
        for c in range(out.size):
            out[c] += weight * row[c]


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _block_iterate(x, x_prev, P, P_prev, X, C, CT, own_data, own_indices, own_indptr, halo_data, halo_indices,
                   halo_indptr, halo, halo_prev, target, alpha, lambda_d, lambda_g, lambda_e, step, threshold,
                   use_prev, use_recon, use_graph, use_target, residual, gradient, out,
                   P_out):  # pragma: no cover - compiled
    """A block's FISTA iteration (see `_code_iterate`), tile by tile, in one pass.

    Per tile: the reconstruction gradient at ``y``, ``lambda_d (y C - X) C^T``,
    with ``y C`` extrapolated from ``P = x_k C`` and ``P_prev = x_{k-1} C``;
    per row: ``y``, ``(L x_k)_i`` and ``(L x_{k-1})_i`` (own rows of ``x`` and
    ``x_prev``, halo rows ``halo`` and ``halo_prev``), the forward step, the
    soft threshold into ``out``; then ``P_out = x_{k+1} C`` for the tile.
    Returns the sums ``||x_k||_1``, ``<x_k, L x_k>``, ``||x_k - X E^T||^2``,
    ``<y, x_{k+1} - x_k>``, ``<x_{k+1}, x_{k+1} - x_k>``, ``nnz(x_k)``,
    ``nnz(x_{k+1})`` and ``||x_k C - X||^2``: per row in the arrays' dtype,
    over rows in float64 (as `sae.terms.inner`).  Arrays not used (by the
    flags) may be empty.  Tiles of ``gradient.shape[0]`` rows; ``residual``
    (tile, n) and ``gradient`` (tile, m) are work buffers: nothing is allocated
    but row vectors.
    """
    sums = np.zeros(8)
    n_rows, n_cols = out.shape
    tile = gradient.shape[0]
    zero = out.dtype.type(0)
    y = np.empty(n_cols, dtype=out.dtype)
    lx = np.empty(n_cols, dtype=out.dtype)
    lx_prev = np.empty(n_cols, dtype=out.dtype)
    for t0 in range(0, n_rows, tile):
        t1 = min(t0 + tile, n_rows)
        if use_recon:
            for r in range(t1 - t0):
                s = zero
                for c in range(residual.shape[1]):
                    value = P[t0 + r, c] - X[t0 + r, c]
                    s += value * value
                    if use_prev:
                        value += alpha * (P[t0 + r, c] - P_prev[t0 + r, c])
                    residual[r, c] = lambda_d * value
                sums[7] += s
            np.dot(residual[: t1 - t0], CT, gradient[: t1 - t0])
        else:
            gradient[:] = zero
        for i in range(t0, t1):
            xi, gi, oi = x[i], gradient[i - t0], out[i]
            if use_prev:
                pi = x_prev[i]
                for j in range(n_cols):
                    y[j] = alpha * (xi[j] - pi[j]) + xi[j]
            else:
                y[:] = xi
            if use_graph:
                _graph_row(i, own_data, own_indices, own_indptr, halo_data, halo_indices, halo_indptr, x, halo, lx)
                energy = zero
                for j in range(n_cols):
                    energy += xi[j] * lx[j]
                sums[1] += energy
                if use_prev:
                    _graph_row(i, own_data, own_indices, own_indptr, halo_data, halo_indices, halo_indptr, x_prev,
                               halo_prev, lx_prev)
                    for j in range(n_cols):
                        gi[j] += lambda_g * (alpha * (lx[j] - lx_prev[j]) + lx[j])
                else:
                    for j in range(n_cols):
                        gi[j] += lambda_g * lx[j]
            if use_target:
                ti = target[i]
                residual_e = zero
                for j in range(n_cols):
                    d = xi[j] - ti[j]
                    residual_e += d * d
                    gi[j] += lambda_e * (y[j] - ti[j])
                sums[2] += residual_e
            l1 = zero
            nnz = 0
            nnz_next = 0
            for j in range(n_cols):
                forward = y[j] - step * gi[j]
                oi[j] = max(forward - threshold, zero) - max(-forward - threshold, zero)
                l1 += abs(xi[j])
                nnz += xi[j] != zero
                nnz_next += oi[j] != zero
            sums[0] += l1
            sums[5] += nnz
            sums[6] += nnz_next
            if use_prev:
                restart_y = zero
                restart_x = zero
                for j in range(n_cols):
                    moved = oi[j] - xi[j]
                    restart_y += y[j] * moved
                    restart_x += oi[j] * moved
                sums[3] += restart_y
                sums[4] += restart_x
        if use_recon:
            np.dot(out[t0:t1], C, P_out[t0:t1])
    return sums


def _stacked_halo(packs: Sequence[dict] | None, index: int, n_cols: int, dtype: Any) -> np.ndarray:
    """The halo rows a block receives, stacked in neighbour order (dense, C-contiguous)."""
    rows = [_densify(pack[index]) for pack in packs or ()]
    return np.ascontiguousarray(np.vstack(rows), dtype=dtype) if rows else np.zeros((0, n_cols), dtype=dtype)


def _code_iterate(
    problem: _CodeProblem,
    state: _CodeState,
    packs: Sequence[dict],
    previous_packs: Sequence[dict] | None,
    momentum: tuple[float, float],
) -> _CodeState:
    """One FISTA iteration on one block (see the module docstring).

    Computes the block's parts of ``F(x_k)`` and ``x_{k+1, b} = soft(y_b - step
    grad_b, step lambda_z)`` with ``y = x_k + alpha (x_k - x_{k-1})`` and
    ``grad_b = lambda_d (y_b C - X_b) C^T + lambda_e (y_b - X_b E^T) + lambda_g (L y)_b``;
    ``y_b C`` is extrapolated from ``x_k C`` and ``x_{k-1} C``, and ``(L y)_b``
    from ``(L x_k)_b`` and ``(L x_{k-1})_b``, computed with the halo rows of
    ``x_k`` (``packs``) and of ``x_{k-1}`` (``previous_packs``).  Everything
    after densifying ``x_k`` and ``x_{k-1}`` is one compiled pass,
    `_block_iterate`, tile by tile: no (N_b, m) temporary but the new iterate.
    """
    # CSR iterates are densified into pooled arrays, free again once the task is over
    x = _densify(state.x, _pooled_empty(state.x.shape, state.x.dtype) if sp.issparse(state.x) else None)
    dtype = x.dtype.type
    alpha = dtype(momentum[1])
    used = bool(state.x_prev is not None and alpha != 0)
    X, C = problem.data, problem.components
    m = x.shape[1]
    none = np.zeros((0, 0), dtype=x.dtype)
    use_recon = C is not None
    previous, P, P_previous = state.x_prev, state.P, state.P_prev
    offloaded_previous = previous if isinstance(previous, _Offloaded) else None
    if isinstance(previous, (_Offloaded, _Resident)) and (used or use_recon):
        # x_{k-1} (and x_{k-1} C, x_k C) read back into pooled arrays, usually ahead of this task
        previous, *parts = previous.load(prefetch_next=False)
        if parts:
            P_previous, P = parts
    if use_recon and P is None:
        P = x @ C
    # x_k and x_k C become the next state's x_{k-1} and x_{k-1} C: written to disk while the kernel runs,
    # then x_{k+1} C after them (the next state keeps none of the three in memory)
    offload = problem.offload and not sp.issparse(state.x) and state.x.size > 0
    written = _offload_async((state.x, P) if use_recon else (state.x,), P.nbytes if use_recon else 0) if offload \
        else None
    if offloaded_previous is not None and offloaded_previous.sequence:
        # then the I/O thread reads the next block's ahead (after this write: this task waits for the write)
        offloaded_previous.files.prefetch_after(offloaded_previous.sequence)
    if used:
        x_prev = _densify(previous, _pooled_empty(x.shape, x.dtype) if sp.issparse(previous) else None)
    else:
        x_prev = none
    if use_recon:
        P_prev = P_previous if used else none
        CT = np.ascontiguousarray(C.T)
        P_next = _pooled_empty(P.shape, P.dtype)
    else:
        P = P_prev = CT = P_next = none
        C = none
    graph = problem.graph
    use_graph = graph is not None
    if use_graph:
        own, halo_part = graph.own, graph.halo
        halo = _stacked_halo(packs, problem.index, m, x.dtype)
        halo_prev = _stacked_halo(previous_packs, problem.index, m, x.dtype) if used else halo
        graph_arrays = (own.data, own.indices, own.indptr, halo_part.data, halo_part.indices, halo_part.indptr,
                        halo, halo_prev)
    else:
        index = np.zeros(1, dtype=np.int64)
        graph_arrays = (np.zeros(0), index[:0], index, np.zeros(0), index[:0], index, none, none)
    target = problem.target if problem.target is not None else none
    # the next iterate: compacted to CSR below SPARSE_STATE_DENSITY (its pooled array is then free again)
    x_next = _pooled_empty(x.shape, x.dtype)
    tile = min(ITERATE_TILE, max(x.shape[0], 1))
    sums = _block_iterate(
        x, x_prev, P, P_prev, X if use_recon else none, C, CT, *graph_arrays, target, alpha,
        dtype(problem.lambda_d), dtype(problem.lambda_g), dtype(problem.lambda_e), dtype(problem.step),
        dtype(problem.step * problem.lambda_z), used, use_recon, use_graph, problem.target is not None,
        np.empty((tile, X.shape[1] if use_recon else 0), dtype=x.dtype), np.empty((tile, m), dtype=x.dtype),
        x_next, P_next,
    )
    l1, graph_energy, encoder_residual, restart_y, restart_x, nnz, nnz_next, reconstruction = (float(v) for v in sums)
    smooth = 0.5 * problem.lambda_d * reconstruction if use_recon else 0.0
    if use_graph:
        smooth += 0.5 * problem.lambda_g * graph_energy
    if problem.target is not None:
        smooth += 0.5 * problem.lambda_e * encoder_residual
    scalars = {"smooth": smooth, "l1": l1, "graph": graph_energy, "nnz": nnz, "momentum_used": used,
               "restart_y": restart_y, "restart_x": restart_x}
    x_next = _compact(x_next, nnz_next)
    if written is not None:
        offloaded = written.result()
        if use_recon:
            offloaded.append(P_next)
        offloaded.complete()
        return _CodeState(x=x_next, x_prev=offloaded, scalars=scalars)
    return _CodeState(x=x_next, x_prev=state.x, P=P_next if use_recon else None,
                      P_prev=P if use_recon else None, scalars=scalars)


# --------------------------------------------------------------------------- memory accounting
# Dask decides when a worker spills results to disk (``distributed.worker.memory``) from their sizes as
# ``dask.sizeof`` reports them; it knows numpy arrays and scipy's ``spmatrix`` but not scipy's sparse *arrays*
# nor our dataclasses (56 bytes each otherwise): a block state of hundreds of MB would count as nothing.


@sizeof.register(sp.sparray)
def _sizeof_sparse_array(matrix: sp.sparray) -> int:
    return sum(sizeof(value) for value in vars(matrix).values())


def _sizeof_fields(obj: Any) -> int:
    return sum(sizeof(getattr(obj, f.name)) for f in fields(obj))


for _block_type in (_GraphBlock, _CodeProblem, _CodeState, _Resident):
    sizeof.register(_block_type)(_sizeof_fields)


@sizeof.register(_Offloaded)
def _sizeof_offloaded(offloaded: _Offloaded) -> int:
    """Its arrays are on disk, but those read ahead, or being read, are in memory."""
    if offloaded.prefetched is None:
        return 64
    return 64 + sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in offloaded.specs)


def _first_momentum() -> tuple[float, float]:
    """``(t_1, alpha_1) = (1, 0)``: the first step is a plain proximal-gradient step."""
    return 1.0, (1.0 - 1.0) / next_momentum(1.0)


def _next_momentum(
    momentum: tuple[float, float], parts: Sequence[dict[str, Any]], restart: bool = True
) -> tuple[float, float]:
    """``(t_{k+1}, alpha_{k+1})`` after iteration ``k``, with the adaptive restart of :func:`sae.solvers.fista`.

    ``t_{k+1} = next_momentum(t_k)``, or 1 when the momentum was used and
    ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0`` (block sums added in block order);
    ``alpha_{k+1} = (t_{k+1} - 1) / next_momentum(t_{k+1})``.  ``restart=False``: plain FISTA.
    """
    t = next_momentum(momentum[0])
    if restart and parts and parts[0]["momentum_used"]:
        if sum(p["restart_y"] for p in parts) - sum(p["restart_x"] for p in parts) > 0:
            t = 1.0
    return t, (t - 1.0) / next_momentum(t)


def _state_scalars(state: _CodeState) -> dict[str, float]:
    return state.scalars


def _state_solution(state: _CodeState) -> Any:
    if isinstance(state.x_prev, (_Offloaded, _Resident)):
        return state.x_prev.load(prefetch_next=False)[0]
    return state.x_prev


def _halo_pack(state: _CodeState, plan: dict[int, np.ndarray]) -> dict[int, Any]:
    """The rows of ``x_k`` every neighbour wants: ``{receiver: rows}`` (CSR when sparse enough)."""
    pack = {}
    for receiver, wanted in plan.items():
        rows = state.x[wanted]
        if not sp.issparse(rows) and rows.size and np.count_nonzero(rows) <= SPARSE_HALO_DENSITY * rows.size:
            rows = sp.csr_array(rows)
        pack[receiver] = rows
    return pack


def _send_plan(receivers: Sequence[int], wanted: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    return dict(zip(receivers, wanted))


def _solve_codes_block(
    X_block: np.ndarray,
    components: np.ndarray,
    encoder: np.ndarray | None,
    Z0: np.ndarray,
    params: dict[str, float],
) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole Z step of one block when blocks are independent (``lambda_g = 0``)."""
    result = solve_codes(
        X_block, components, encoder, None, _densify(Z0),
        lambda_d=params["lambda_d"], lambda_z=params["lambda_z"], lambda_e=params["lambda_e"],
        rtol=params["rtol"], atol=params["atol"], max_iter=int(params["max_iter"]), restart=bool(params["restart"]),
        method=params["z_solver"], n_threads=1,  # one core per task: the workers' threads are the parallelism
    )
    return _compact(result.solution), {"n_iter": result.n_iter, "stop_reason": result.stop_reason, "graph": 0.0}


def _first(pair: tuple) -> Any:
    return pair[0]


def _second(pair: tuple) -> Any:
    return pair[1]


# --------------------------------------------------------------------------- per-block statistics


def _block_statistics(X_block: np.ndarray, Z_block: np.ndarray) -> dict[str, Any]:
    """``Z_b^T Z_b`` (m, m), ``Z_b^T X_b`` (m, n), ``||Z_b||_F^2``, ``||Z_b||_1`` and its non-zeros."""
    _trim_pool()  # the Z step is over
    Z_block = _densify(Z_block)
    return {
        "ZtZ": Z_block.T @ Z_block,
        "ZtX": Z_block.T @ X_block,
        "Z_sq": inner(Z_block, Z_block),
        "l1": float(np.abs(Z_block).sum(dtype=np.float64)),
        "nnz": int(np.count_nonzero(Z_block)),
    }


def _block_data_statistics(X_block: np.ndarray) -> dict[str, Any]:
    """``X_b^T X_b`` (n, n) and ``||X_b||_F^2``."""
    return {"XtX": X_block.T @ X_block, "X_sq": inner(X_block, X_block)}


def _block_residuals(
    X_block: np.ndarray, Z_block: np.ndarray, components: np.ndarray, encoder: np.ndarray | None
) -> dict[str, float]:
    """``||X_b - Z_b C||_F^2`` and ``||Z_b - X_b E^T||_F^2`` (NaN without encoder)."""
    Z_block = _densify(Z_block)
    residual = X_block - Z_block @ components
    out = {"reconstruction": inner(residual, residual), "encoder": float("nan")}
    if encoder is not None:
        residual = Z_block - X_block @ encoder.T
        out["encoder"] = inner(residual, residual)
    return out


def _write_rows(array: zarr.Array, start: int, stop: int, values: Any) -> int:
    array[start:stop] = _densify(values)
    return stop - start


def _zeros(n_rows: int, n_cols: int, dtype: str) -> sp.csr_array:
    return sp.csr_array((n_rows, n_cols), dtype=dtype)


def _read_code_rows(source: Any, start: int, stop: int, dtype: str) -> Any:
    """Rows ``[start, stop)`` of stored codes, compact (CSR when sparse enough, as the iterates)."""
    _trim_pool()
    return _compact(_read_rows(source, start, stop, dtype))


# --------------------------------------------------------------------------- results and checkpoints


@dataclass(frozen=True)
class DistributedFit:
    """Result of :func:`fit_distributed`.

    Attributes
    ----------
    components : ndarray (m, n)
    encoder : ndarray (m, n) or None
        None when ``lambda_e = 0``.
    codes : zarr.Array (N, m), ndarray (N, m) or None
        The stored codes of the last checkpoint when checkpointing; the
        gathered codes when ``return_codes=True`` and no checkpoint; else None.
    history : list of dict
        As :attr:`sae.model.FitResult.history` (iteration 0 is the start).
    n_iter : int
        Outer iterations performed in total (resumed ones included).
    stop_reason : {"rtol", "max_outer"}
    resumed_from : int
        The outer iteration of the checkpoint the run started from (0: fresh).
    """

    components: np.ndarray
    encoder: np.ndarray | None
    codes: Any
    history: list[dict[str, Any]]
    n_iter: int
    stop_reason: str
    resumed_from: int = 0


def _python_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (float("nan") if v is None else v) for k, v in record.items()}


def _checkpoint_arrays(
    group: zarr.Group, slot: int, n_rows: int, n_atoms: int, n_features: int, block_size: int, dtype: str, encoder: bool
) -> zarr.Group:
    from sae.store import create_array

    name = f"checkpoint_{slot}"
    sub = group.require_group(name)
    if "codes" not in sub:
        create_array(sub, "codes", shape=(n_rows, n_atoms), chunks=(block_size, n_atoms), dtype=dtype,
                     dimension_names=("frame", "atom"))
    for array_name in ("components",) + (("encoder",) if encoder else ()):
        if array_name not in sub:
            create_array(sub, array_name, shape=(n_atoms, n_features), dtype=dtype)
    return sub


def checkpoint_arrays(group: zarr.Group) -> list[str]:
    """Paths (relative to ``model/<key>``) of the arrays of its last complete checkpoint ([] if none)."""
    if group.attrs.get("last_complete_outer") is None:
        return []
    name = f"checkpoint_{int(group.attrs['checkpoint_slot'])}"
    return [f"{name}/{array}" for array in ("codes", "components", "encoder") if array in group[name]]


def read_checkpoint(group: zarr.Group) -> dict[str, Any] | None:
    """The last complete checkpoint of a ``model/<key>`` group, or None.

    Returns
    -------
    dict or None
        ``iteration`` (int), ``components`` (m, n), ``encoder`` (m, n) or None,
        ``codes`` (the stored zarr array, (N, m)), ``history`` (list of dict),
        ``stop_reason`` ("" while running, else "rtol" or "max_outer").

    Raises
    ------
    sae.store.StoreDamaged
        A chunk of the checkpoint's arrays is missing from disk.
    """
    from sae.store import StoreDamaged

    iteration = group.attrs.get("last_complete_outer")
    if iteration is None:
        return None
    for path in checkpoint_arrays(group):
        array = group[path]
        if array.nchunks_initialized != array.nchunks:
            raise StoreDamaged(f"{group.path}: the checkpoint of outer iteration {int(iteration)} is damaged "
                               f"({array.nchunks - array.nchunks_initialized} chunks of {path} missing)")
    sub = group[f"checkpoint_{int(group.attrs['checkpoint_slot'])}"]
    return {
        "iteration": int(iteration),
        "components": sub["components"][:],
        "encoder": sub["encoder"][:] if "encoder" in sub else None,
        "codes": sub["codes"] if "codes" in sub else None,
        "history": [_python_record(r) for r in group.attrs["history"]],
        "stop_reason": group.attrs.get("stop_reason", ""),
    }


# --------------------------------------------------------------------------- the trainer


_STEALING_PAUSES = "_sae_work_stealing_pauses"  # attribute of the scheduler: (trainings running, was stealing on)


async def _pause_work_stealing(dask_scheduler: Any, pause: bool) -> None:
    """Pause (``pause=True``) or resume the scheduler's work stealing for one training (run on the scheduler).

    Overlapping trainings (a sweep's) share the pause: stealing restarts when
    the last of them ends, and only if it was running before the first.
    """
    extension = dask_scheduler.extensions.get("stealing")
    if extension is None:  # distributed.scheduler.work-stealing: false
        return
    count, was_running = getattr(dask_scheduler, _STEALING_PAUSES, (0, False))
    if pause:
        if count == 0:
            was_running = "stealing" in dask_scheduler.periodic_callbacks
        setattr(dask_scheduler, _STEALING_PAUSES, (count + 1, was_running))  # before the await: overlapping calls
        if count == 0:
            try:
                await extension.stop()
            except BaseException:
                setattr(dask_scheduler, _STEALING_PAUSES, (count, was_running))
                raise
    elif count > 0:
        setattr(dask_scheduler, _STEALING_PAUSES, (count - 1, was_running))
        if count == 1 and was_running:
            await extension.start()


@contextmanager
def _without_work_stealing(client: Any) -> Iterator[None]:
    """Pause the cluster's work stealing while a training runs (`_pause_work_stealing`).

    Each block's tasks run on its home worker, where its state is (`_Trainer._home`);
    work stealing moves queued tasks from a busy worker to an idle one *with
    their inputs*: at full scale, block iterations and the instant tasks that
    read their result were moved back and forth with the 160 MB block states
    (up to 10 transfers of 0.4-1.1 s per Z-step iteration, and a copy of the
    state on each side).  Loose restrictions still send a lost worker's
    blocks elsewhere: recovery does not need stealing.  A client that dies
    during a training leaves stealing paused until the scheduler restarts
    (a matter of speed for other work, not of results).
    """
    try:
        client.run_on_scheduler(_pause_work_stealing, pause=True)
        paused = True
    except Exception as error:  # e.g. a scheduler that refuses functions (distributed.scheduler.pickle: false)
        logger.warning("could not pause the scheduler's work stealing (%s): block states may move between workers",
                       error)
        paused = False
    try:
        yield
    finally:
        if paused:
            try:
                client.run_on_scheduler(_pause_work_stealing, pause=False)
            except Exception:  # the cluster is gone: nothing to resume
                logger.debug("could not resume work stealing", exc_info=True)


class _Trainer:
    """Client-side driver of :func:`fit_distributed` (holds futures, never big arrays)."""

    def __init__(self, client: Any, X: Any, laplacian: Any, config: ModelConfig, block_size: int,
                 laplacian_norm: float | str, lookahead: int, offload_previous: bool = False) -> None:
        self.client = client
        self.config = config
        self.dtype = config.dtype
        self.n_rows, self.n_features = (int(s) for s in X.shape)
        self.bounds = block_bounds(self.n_rows, block_size)
        self.block_size = block_size
        self.lookahead = lookahead
        self.offload_previous = offload_previous
        self.token = uuid.uuid4().hex[:8]
        self.refresh_homes()
        self.X_blocks = [
            client.submit(_read_rows, *_row_source(X, start, stop), self.dtype, key=f"sae-X-{self.token}-{b}",
                          **self._home(b))
            for b, (start, stop) in enumerate(self.bounds)
        ]
        self.graph = None
        self.laplacian_norm = None
        if config.lambda_g > 0:
            self._setup_graph(laplacian, laplacian_norm)

    # -- graph
    def _setup_graph(self, laplacian: Any, laplacian_norm: float | str) -> None:
        client, bounds = self.client, self.bounds
        if laplacian is None:
            raise ValueError(
                f"laplacian is required when lambda_g > 0 (got lambda_g={self.config.lambda_g!r} and "
                "laplacian=None): pass a sparse (N, N) matrix or a LaplacianRef, or set lambda_g=0"
            )
        if tuple(laplacian.shape) != (self.n_rows, self.n_rows):
            raise ValueError(
                f"laplacian must have shape (n_samples, n_samples) = ({self.n_rows}, {self.n_rows}), "
                f"got {tuple(laplacian.shape)}"
            )
        if sp.issparse(laplacian):
            laplacian = sp.csr_array(laplacian)
        self.graph = []
        row_blocks = []  # released after the norm: only the split blocks stay for the training
        for b, (start, stop) in enumerate(bounds):
            rows = client.submit(_read_laplacian_rows, *_row_source(laplacian, start, stop), self.dtype,
                                 key=f"sae-Lrows-{self.token}-{b}", **self._home(b))
            row_blocks.append(rows)
            self.graph.append(client.submit(_graph_block, rows, bounds, b, key=f"sae-graph-{self.token}-{b}",
                                            **self._home(b)))
        info = client.gather([client.submit(_graph_neighbours, g) for g in self.graph])
        self.neighbours = [neighbours for neighbours, _ in info]
        # send_plans[c] = {b: indices of block c's rows that b needs}, built on the workers
        requests = {
            (b, c): client.submit(_graph_request, self.graph[b], c, key=f"sae-request-{self.token}-{b}-{c}")
            for b in range(len(bounds)) for c in self.neighbours[b]
        }
        self.send_plans = []
        for c in range(len(bounds)):
            receivers = [b for b in range(len(bounds)) if c in self.neighbours[b]]
            self.send_plans.append(client.submit(_send_plan, receivers, [requests[b, c] for b in receivers],
                                                 key=f"sae-plan-{self.token}-{c}"))
        if isinstance(laplacian_norm, (int, float)):
            self.laplacian_norm = float(laplacian_norm)
        elif laplacian_norm == "bound":
            self.laplacian_norm = max(bound for _, bound in info)
        elif laplacian_norm == "power":
            self.laplacian_norm = client.submit(_laplacian_norm, *row_blocks).result()
        else:
            raise ValueError(f"laplacian_norm must be 'power', 'bound' or a number, got {laplacian_norm!r}")
        logger.info("||L||_2 = %.6g (%s) over %d blocks", self.laplacian_norm, laplacian_norm, len(bounds))

    def refresh_homes(self) -> None:
        """Give every block a home worker (block b -> worker b mod W, workers sorted by address)."""
        workers = sorted(self.client.scheduler_info().get("workers", {}))
        self.homes = [workers[b % len(workers)] if workers else None for b in range(len(self.bounds))]

    def _home(self, b: int) -> dict[str, Any]:
        """``submit`` keywords that run block ``b``'s task on its home worker if it is alive, else anywhere.

        Each block's state then stays on one worker from iteration to iteration
        (no transfer of (N_b, m) iterates); the restriction is loose, so a lost
        worker's blocks go elsewhere.
        """
        home = self.homes[b]
        return {} if home is None else {"workers": [home], "allow_other_workers": True}

    def _scatter(self, array: np.ndarray | None) -> Any:
        # C and E are small ((m, n)): they travel inside the task specifications rather than as scattered
        # data, so that a task lost with its worker can be recomputed (scattered data would be lost with it).
        return array

    # -- Z step
    def _params(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        config = self.config
        params = {
            "lambda_d": config.lambda_d, "lambda_z": config.lambda_z,
            "lambda_g": config.lambda_g, "lambda_e": config.lambda_e,
            "rtol": config.inner_tolerance, "atol": config.atol, "max_iter": config.max_inner,
            "restart": config.fista_restart, "z_solver": config.z_solver,
            "offload_previous": self.offload_previous,
        }
        params.update(extra or {})
        return params

    def code_step(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, outer: int,
                  reload: Callable[[], list] | None = None) -> tuple[list, dict]:
        """The Z step from the code blocks ``Z_blocks`` (futures); returns the new blocks and the step's record.

        ``reload``: how to get ``Z_blocks`` again (from the store); then the global
        FISTA *empties* the list ``Z_blocks`` once its first iteration is
        submitted, so that the starting codes, a whole generation, are not held
        on the workers during the step, and reloads them only if the start turns
        out better than the last iterate.
        """
        self.refresh_homes()  # workers may have come or gone since the last step
        if self.graph is None:
            return self._code_step_independent(Z_blocks, C, E, outer)
        return self._code_step_global(Z_blocks, C, E, outer, reload)

    def _code_step_independent(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, outer: int):
        client = self.client
        C_f, E_f = self._scatter(C), self._scatter(E)
        params = self._params()
        results = [
            client.submit(_solve_codes_block, X, C_f, E_f, Z, params, key=f"sae-zsolve-{self.token}-{outer}-{b}",
                          **self._home(b))
            for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))
        ]
        new_blocks = [client.submit(_first, r, key=f"sae-Z-{self.token}-{outer}-{b}", **self._home(b))
                      for b, r in enumerate(results)]
        infos = client.gather([client.submit(_second, r) for r in results])
        n_iter = max(info["n_iter"] for info in infos)
        reasons = sorted({info["stop_reason"] for info in infos})
        return new_blocks, {"n_iter": n_iter, "stop_reason": "+".join(reasons), "graph": float("nan")}

    def _code_step_global(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, outer: int,
                          reload: Callable[[], list] | None):
        client, config = self.client, self.config
        m, n = C.shape
        terms_norm = []
        if config.lambda_d > 0:
            small = C @ C.T if m <= n else C.T @ C
            terms_norm.append(config.lambda_d * spectral_norm(small))
        if config.lambda_e > 0:
            terms_norm.append(config.lambda_e)
        terms_norm.append(config.lambda_g * self.laplacian_norm)
        beta = LIPSCHITZ_SAFETY * sum(terms_norm)
        beta = beta if beta > 0 else 1.0
        params = self._params({"step": 1.0 / beta})
        C_f, E_f = self._scatter(C), self._scatter(E)
        tag = f"{self.token}-{outer}"
        problems = [
            client.submit(_code_problem, b, X, C_f, E_f, g, params, key=f"sae-zproblem-{tag}-{b}", **self._home(b))
            for b, (X, g) in enumerate(zip(self.X_blocks, self.graph))
        ]
        n_blocks = len(self.bounds)
        submitted_states = [client.submit(_CodeState, Z, key=f"sae-zstate-{tag}-0-{b}", **self._home(b))
                            for b, Z in enumerate(Z_blocks)]
        start_blocks = list(Z_blocks) if reload is None else None
        if reload is not None:
            Z_blocks.clear()  # the client lets go of the starting codes (see code_step)

        # The halo rows, scalars and momentum (instant tasks) have priority over the block iterations: a worker
        # runs its blocks one after the other, and without it the halo rows the *other* worker waits for were cut
        # only after all of this worker's blocks (at full scale: one worker idle for up to half an iteration).
        def submit_iteration(k: int, states: list, previous: list | None, momentum: Any) -> tuple[list, list, list, Any]:
            packs = [
                client.submit(_halo_pack, states[c], self.send_plans[c], key=f"sae-halo-{tag}-{k}-{c}",
                              priority=1, **self._home(c))
                for c in range(n_blocks)
            ]
            new = [
                client.submit(_code_iterate, problems[b], states[b], [packs[c] for c in self.neighbours[b]],
                              None if previous is None else [previous[c] for c in self.neighbours[b]], momentum,
                              key=f"sae-ziter-{tag}-{k}-{b}", **self._home(b))
                for b in range(n_blocks)
            ]
            scalars = [client.submit(_state_scalars, s, key=f"sae-zscalars-{tag}-{k}-{b}", priority=1,
                                     **self._home(b))
                       for b, s in enumerate(new)]
            # the momentum of the next iteration is decided on the cluster (adaptive restart needs a global sum),
            # so iterations can be submitted ahead of the client's stopping test
            following = client.submit(_next_momentum, momentum, scalars, config.fista_restart,
                                      key=f"sae-momentum-{tag}-{k}", priority=1)
            return new, scalars, packs, following

        pending: deque = deque()
        previous_packs: list | None = None
        momentum: Any = _first_momentum()
        next_k = 0
        max_iter, rtol, atol = config.max_inner, config.inner_tolerance, config.atol
        history: list[float] = []
        graph_energy = start_graph_energy = float("nan")
        stop_reason = "max_iter"
        final_states = None
        n_rows = self.bounds[-1][1]
        started = reported = time.perf_counter()
        while True:
            while len(pending) < self.lookahead and next_k <= max_iter:
                new, scalars, previous_packs, momentum = submit_iteration(next_k, submitted_states, previous_packs,
                                                                          momentum)
                pending.append((next_k, new, scalars))
                submitted_states = new
                next_k += 1
                # the client lets go of the states this iteration reads: each block's is freed on its worker as
                # soon as the block's next state exists (two generations of iterates alive per block, not three)
                final_states = None
            k, new, scalars = pending.popleft()
            parts = client.gather(scalars)
            value = sum(p["smooth"] for p in parts) + config.lambda_z * sum(p["l1"] for p in parts)
            history.append(value)
            graph_energy = math.fsum(p["graph"] for p in parts)
            if time.perf_counter() - reported >= PROGRESS_SECONDS:
                reported = time.perf_counter()
                logger.info("outer %d, Z step: iteration %d, F = %.6g, %.2f%% non-zeros, %.2f s per iteration",
                            outer, k, value, 100 * sum(p["nnz"] for p in parts) / (n_rows * m),
                            (reported - started) / max(k, 1))
            if k == 0:
                start_graph_energy = graph_energy
            final_states = new
            if k >= 1:
                reason = fista_stop_reason(history, rtol, atol)
                if reason is not None:
                    stop_reason = reason
                    break
                if k >= max_iter:
                    break
        pending.clear()  # iterations submitted past the stop: dropping the futures releases them
        if history[-1] > history[0]:
            logger.debug("Z step: last iterate worse than the start, keeping the start")
            new_blocks, graph_energy = (start_blocks if reload is None else reload()), start_graph_energy
        else:
            new_blocks = [client.submit(_state_solution, s, key=f"sae-Z-{tag}-{b}", **self._home(b))
                          for b, s in enumerate(final_states)]
        return new_blocks, {"n_iter": len(history) - 1, "stop_reason": stop_reason, "graph": graph_energy,
                            "objective": history}

    # -- statistics and objective
    def statistics(self, Z_blocks: list) -> dict[str, Any]:
        stats = self.client.gather([self.client.submit(_block_statistics, X, Z, **self._home(b))
                                    for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))])
        out: dict[str, Any] = {}
        for name in ("ZtZ", "ZtX"):
            total = np.zeros(stats[0][name].shape, dtype=np.float64)
            for s in stats:
                total += s[name]
            out[name] = total.astype(self.dtype)
        for name in ("Z_sq", "l1"):
            out[name] = math.fsum(s[name] for s in stats)
        out["nnz"] = sum(s["nnz"] for s in stats)
        return out

    def data_statistics(self) -> dict[str, Any]:
        stats = self.client.gather([self.client.submit(_block_data_statistics, X) for X in self.X_blocks])
        total = np.zeros(stats[0]["XtX"].shape, dtype=np.float64)
        for s in stats:
            total += s["XtX"]
        return {"XtX": total.astype(self.dtype), "X_sq": math.fsum(s["X_sq"] for s in stats)}

    def residuals(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None) -> dict[str, float]:
        C_f, E_f = self._scatter(C), self._scatter(E)
        parts = self.client.gather(
            [self.client.submit(_block_residuals, X, Z, C_f, E_f, **self._home(b))
             for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))]
        )
        return {name: math.fsum(p[name] for p in parts) for name in ("reconstruction", "encoder")}

    def zero_codes(self, n_atoms: int) -> list:
        return [
            self.client.submit(_zeros, stop - start, n_atoms, self.dtype, key=f"sae-Z0-{self.token}-{b}",
                               **self._home(b))
            for b, (start, stop) in enumerate(self.bounds)
        ]

    def read_codes(self, array: zarr.Array, outer: int) -> list:
        return [
            self.client.submit(_read_code_rows, array, start, stop, self.dtype,
                               key=f"sae-Zread-{self.token}-{outer}-{b}", **self._home(b))
            for b, (start, stop) in enumerate(self.bounds)
        ]

    def write_codes(self, array: zarr.Array, Z_blocks: list) -> None:
        written = [
            self.client.submit(_write_rows, array, start, stop, Z, pure=False, **self._home(b))
            for b, ((start, stop), Z) in enumerate(zip(self.bounds, Z_blocks))
        ]
        self.client.gather(written)

    def gather_codes(self, Z_blocks: list) -> np.ndarray:
        return np.concatenate([_densify(Z) for Z in self.client.gather(Z_blocks)], axis=0)


def _record(
    iteration: int,
    config: ModelConfig,
    residuals: dict[str, float],
    l1: float,
    graph: float,
    nnz: int,
    size: int,
    previous: float | None,
    steps: dict[str, dict[str, Any] | None],
    seconds: float,
) -> dict[str, Any]:
    """One history record, with the keys and meaning of :class:`sae.model.FitResult`'s."""
    record: dict[str, Any] = {
        "iteration": iteration,
        "reconstruction": residuals["reconstruction"],
        "sparsity": l1,
        "graph": graph if config.lambda_g > 0 else float("nan"),
        "encoder": residuals["encoder"],
    }
    record.update(weigh_terms(record, config))
    record["relative_change"] = relative_change(previous, record["total"])
    record["sparsity_percent"] = 100.0 * nnz / max(size, 1)
    for name in ("codes", "dictionary", "encoder"):
        step = steps.get(name)
        record[f"inner_{name}"] = 0 if step is None else int(step["n_iter"])
        record[f"stop_{name}"] = "" if step is None else str(step["stop_reason"])
    record["seconds"] = seconds
    return record


def fit_distributed(
    X: Any,
    config: ModelConfig,
    *,
    client: Any,
    laplacian: Any = None,
    block_size: int = 50_000,
    laplacian_norm: float | Literal["power", "bound"] = "power",
    lookahead: int = 2,
    offload_previous: bool = False,
    checkpoint: zarr.Group | None = None,
    checkpoint_final_only: bool = False,
    return_codes: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> DistributedFit:
    """Fit the structured auto-encoder on a Dask cluster, block by block (see the module docstring).

    Same objective, initialisation (``np.random.default_rng(config.random_state)``:
    components then encoder, ``Z = 0``), sub-problems, stopping rules and
    history as :func:`sae.model.fit_sae`.

    Parameters
    ----------
    X : zarr.Array or ndarray (N, n)
        The frames.  A Zarr array is read block by block on the workers (and
        re-read if a worker is lost); an ndarray is cut on the client and
        its blocks travel inside the task graph (small problems only).
    config : ModelConfig
    client : distributed.Client
    laplacian : scipy sparse (N, N), LaplacianRef or None
        Required when ``config.lambda_g > 0``; a ``LaplacianRef`` is read by
        row blocks on the workers.
    block_size : int
        Frames per block (the last block may be shorter); also the chunk of the
        stored codes.
    laplacian_norm : "power", "bound" or float
        How ``||L||_2`` is obtained (module docstring), or its value.
    lookahead : int
        Z-step iterations submitted ahead of the stopping test.
    offload_previous : bool
        Keep each dense block's previous iterate ``x_{k-1}``, ``x_{k-1} C`` and
        ``x_k C`` in a file of its worker (direct I/O, the worker's local
        directory) instead of its memory: the iterates then hold one
        generation in memory, not two (module docstring, Memory).  Same
        iterates, to the bit.
    checkpoint : zarr.Group, optional
        A ``model/<key>`` group: a checkpoint is written after every outer
        iteration and the fit resumes from the last complete one found there.
    checkpoint_final_only : bool
        Write only the checkpoint of the last outer iteration (the result);
        an interrupted fit then starts again from the beginning.
    return_codes : bool
        Without checkpoint, gather the codes into :attr:`DistributedFit.codes`.
    callback : callable, optional
        Called with each outer iteration's history record.

    Returns
    -------
    DistributedFit
    """
    try:
        client.run(_start_pool_trimming)
    except Exception as error:  # only memory is at stake: the pool is also trimmed by the tasks
        logger.warning("could not start the workers' pool trimming (%s)", error)
    try:
        with _without_work_stealing(client):
            return _fit_distributed(X, config, client, laplacian, block_size, laplacian_norm, lookahead,
                                    offload_previous, checkpoint, checkpoint_final_only, return_codes, callback)
    finally:
        try:
            client.run(_release_pool)
        except Exception:  # the cluster is gone: nothing to release
            logger.debug("could not release the workers' pooled arrays", exc_info=True)


def _fit_distributed(
    X: Any,
    config: ModelConfig,
    client: Any,
    laplacian: Any,
    block_size: int,
    laplacian_norm: float | str,
    lookahead: int,
    offload_previous: bool,
    checkpoint: zarr.Group | None,
    checkpoint_final_only: bool,
    return_codes: bool,
    callback: Callable[[dict[str, Any]], None] | None,
) -> DistributedFit:
    started = time.perf_counter()
    dtype = config.dtype
    if len(getattr(X, "shape", ())) != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {getattr(X, 'shape', None)}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead!r}")
    trainer = _Trainer(client, X, laplacian, config, block_size, laplacian_norm, lookahead, offload_previous)
    n_rows, n_features, m = trainer.n_rows, trainer.n_features, config.n_atoms
    use_encoder = config.lambda_e > 0
    slots = {}  # created when first written (a final-only checkpoint writes one)

    def slot_group(slot: int) -> zarr.Group:
        if slot not in slots:
            slots[slot] = _checkpoint_arrays(checkpoint, slot, n_rows, m, n_features, block_size, dtype, use_encoder)
        return slots[slot]

    data_stats = trainer.data_statistics() if use_encoder else None
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        C = np.asarray(state["components"], dtype=dtype)
        E = np.asarray(state["encoder"], dtype=dtype) if use_encoder else None
        history = state["history"]
        start_outer = state["iteration"]
        reload = partial(trainer.read_codes, state["codes"], start_outer)
        Z_blocks = reload()
        logger.info("resuming from the checkpoint of outer iteration %d", start_outer)
        if config.balance_lambdas and any(r.get("balanced") for r in history):
            config = trainer.config = config.model_copy(  # the weights the checkpoint was trained with
                update={name: float(history[-1][name]) for name in ("lambda_d", "lambda_g", "lambda_e")}
            )
        if state["stop_reason"] == "rtol" or start_outer >= config.max_outer:
            return DistributedFit(C, E, state["codes"], history, start_outer,
                                  state["stop_reason"] or "max_outer", start_outer)
    else:
        rng = np.random.default_rng(config.random_state)
        C = init_dictionary(m, n_features, rng=rng, dtype=dtype)
        E = init_encoder(m, n_features, rng=rng, dtype=dtype) if use_encoder else None
        reload = partial(trainer.zero_codes, m)
        Z_blocks = reload()
        start_outer = 0
        residuals = trainer.residuals(Z_blocks, C, E)
        history = [_record(0, config, residuals, 0.0, 0.0, 0, n_rows * m, None, {}, 0.0)]
    X_sq = data_stats["X_sq"] if data_stats is not None else None

    stop_reason = "max_outer"
    iteration = start_outer
    for iteration in range(start_outer + 1, config.max_outer + 1):
        tic = time.perf_counter()
        steps: dict[str, dict[str, Any] | None] = {}
        Z_blocks, steps["codes"] = trainer.code_step(Z_blocks, C, E, iteration, reload)
        reload = None  # the new codes are only in memory until the checkpoint
        code_seconds = time.perf_counter() - tic
        stats = trainer.statistics(Z_blocks) if (config.lambda_d > 0 or use_encoder) else None
        inner_kw = dict(rtol=config.inner_tolerance, atol=config.atol, max_iter=config.max_inner,
                        restart=config.fista_restart)
        if config.lambda_d > 0:
            if X_sq is None:
                X_sq = trainer.data_statistics()["X_sq"]
            result = solve_dictionary(stats["ZtZ"], stats["ZtX"], C, lambda_d=config.lambda_d, data_sq_norm=X_sq,
                                      **inner_kw)
            C = result.solution
            steps["dictionary"] = {"n_iter": result.n_iter, "stop_reason": result.stop_reason}
        if use_encoder:
            result = solve_encoder(data_stats["XtX"], stats["ZtX"], E, lambda_e=config.lambda_e,
                                   codes_sq_norm=stats["Z_sq"], **inner_kw)
            E = result.solution
            steps["encoder"] = {"n_iter": result.n_iter, "stop_reason": result.stop_reason}
        if stats is None:
            stats = trainer.statistics(Z_blocks)
        residuals = trainer.residuals(Z_blocks, C, E)
        record = _record(iteration, config, residuals, stats["l1"], steps["codes"]["graph"], stats["nnz"],
                         n_rows * m, history[-1]["total"], steps, 0.0)
        record["seconds_codes"] = code_seconds  # extra key: wall time of the Z step alone
        if config.balance_lambdas and iteration == 1:
            config = trainer.config = rebalance(history + [record], config)
        converged = record["relative_change"] <= config.rtol and not record.get("balanced")
        if converged:
            stop_reason = "rtol"
        last = converged or iteration == config.max_outer
        if checkpoint is not None and (last or not checkpoint_final_only):
            slot = iteration % 2
            target = slot_group(slot)
            trainer.write_codes(target["codes"], Z_blocks)
            target["components"][...] = C
            if use_encoder:
                target["encoder"][...] = E
            record["seconds"] = time.perf_counter() - tic
            history.append(record)
            checkpoint.attrs.update({
                "history": json_safe(history),
                "stop_reason": stop_reason if last else "",
                "checkpoint_slot": slot,
                "last_complete_outer": iteration,
            })
            reload = partial(trainer.read_codes, target["codes"], iteration)
            if not last:
                Z_blocks = reload()  # cut the lineage (after the last iteration nothing reads them)
        else:
            record["seconds"] = time.perf_counter() - tic
            history.append(record)
        log_outer(logger, record)
        if callback is not None:
            callback(record)
        if converged:
            break

    if checkpoint is not None:
        codes: Any = checkpoint[f"checkpoint_{int(checkpoint.attrs['checkpoint_slot'])}"]["codes"]
    elif return_codes:
        codes = trainer.gather_codes(Z_blocks)
    else:
        codes = None
    logger.info("trained in %.1f s: %d outer iterations (%s)", time.perf_counter() - started, iteration, stop_reason)
    return DistributedFit(C, E, codes, history, iteration, stop_reason, start_outer)


# --------------------------------------------------------------------------- the training stage in a store

STAGE = "model"
"""Stage name of trained models in a store."""


def _stage_config(train: TrainConfig, preprocess_key: str, graph_key: str | None) -> dict[str, Any]:
    """What identifies a training run: everything but ``max_outer`` (so a longer rerun resumes) and how it runs."""
    config = train.model_dump(mode="json")
    config["model"].pop("max_outer")
    config.pop("lookahead")
    config.pop("offload_previous")
    config.pop("checkpoint")
    return {"train": config, "preprocess": preprocess_key, "graph": graph_key if train.model.lambda_g > 0 else None}


def model_key(train: TrainConfig, preprocess_key: str, graph_key: str | None = None) -> str:
    """Stage group key of a training run: a fingerprint of the configuration (but ``max_outer``) and its inputs.

    >>> from sae.config import ModelConfig, TrainConfig
    >>> a = model_key(TrainConfig(model=ModelConfig(max_outer=2)), "p")
    >>> a == model_key(TrainConfig(model=ModelConfig(max_outer=9)), "p"), a == model_key(TrainConfig(), "q")
    (True, False)
    """
    blob = json.dumps(_stage_config(train, preprocess_key, graph_key), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_model(
    store_path: Any,
    preprocess_key: str,
    train: TrainConfig,
    *,
    client: Any,
    graph_key: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train on the frames ``preprocess/<preprocess_key>/X`` of a store; write ``model/<key>``.

    The Laplacian is ``graph/<graph_key>/laplacian`` (required when
    ``train.model.lambda_g > 0``).  Checkpoints (module docstring) go to the
    stage group; a rerun resumes from the last one, and returns at once when
    the group is complete for this ``max_outer`` or converged.

    Returns
    -------
    dict
        ``key``, ``n_iter``, ``stop_reason``, ``resumed_from``, ``objective``
        (final total), ``sparsity_percent``, ``seconds``, ``skipped`` (bool).
    """
    from sae import store
    from sae.preprocess import open_preprocessed

    config = train.model
    if config.lambda_g > 0 and graph_key is None:
        raise ValueError(
            f"graph_key is required when lambda_g > 0 (got lambda_g={config.lambda_g!r} and graph_key=None)"
        )
    key = model_key(train, preprocess_key, graph_key)
    root = store.open_store(store_path, mode="r+")
    inputs = [open_preprocessed(root, preprocess_key)]
    X = inputs[0]["X"]
    laplacian = None
    if config.lambda_g > 0:
        from sae.graph import open_graph

        inputs.append(open_graph(root, graph_key))
        laplacian = LaplacianRef(inputs[-1], "laplacian")
    stage_config = _stage_config(train, preprocess_key, graph_key)
    group = store.stage_group(root, STAGE, key, config=stage_config, mode="w" if overwrite else "a")
    try:
        done = None if overwrite else read_checkpoint(group)
    except store.StoreDamaged as error:
        logger.warning("%s: training again from the start", error)
        group = store.stage_group(root, STAGE, key, config=stage_config, mode="w")
        done = None
    if done is not None and store.is_complete(root, STAGE, key) and (
        done["stop_reason"] == "rtol" or done["iteration"] >= config.max_outer
    ):
        logger.info("model %s: complete at outer iteration %d (%s), skipped", key, done["iteration"], done["stop_reason"])
        last = done["history"][-1]
        return {"key": key, "n_iter": done["iteration"], "stop_reason": done["stop_reason"] or "max_outer",
                "resumed_from": done["iteration"], "objective": last["total"],
                "sparsity_percent": last["sparsity_percent"], "seconds": 0.0, "skipped": True}
    group.attrs.update({"complete": False, "max_outer": config.max_outer, "block_size": train.block_size})
    started = time.perf_counter()
    fit = fit_distributed(
        X, config, client=client, laplacian=laplacian, block_size=train.block_size,
        laplacian_norm=train.laplacian_norm, lookahead=train.lookahead, offload_previous=train.offload_previous,
        checkpoint=group, checkpoint_final_only=not train.checkpoint, callback=callback,
    )
    store.mark_complete(group, inputs=inputs, arrays=checkpoint_arrays(group))
    last = fit.history[-1]
    return {"key": key, "n_iter": fit.n_iter, "stop_reason": fit.stop_reason, "resumed_from": fit.resumed_from,
            "objective": last["total"], "sparsity_percent": last["sparsity_percent"],
            "seconds": time.perf_counter() - started, "skipped": False}


def open_model(store_path: Any, key: str) -> dict[str, Any]:
    """A trained model of a store: ``components``, ``encoder`` (or None), ``codes`` (zarr (N, m)), ``history``.

    Reads the last complete checkpoint of ``model/<key>`` (the final one when
    the group is complete).
    """
    from sae import store

    root = store.open_store(store_path) if not isinstance(store_path, zarr.Group) else store_path
    group = store.stage_group(root, STAGE, key, mode="r")
    state = read_checkpoint(group)
    if state is None:
        raise ValueError(f"model/{key} holds no complete outer iteration yet: run train_model first")
    state["complete"] = store.is_complete(root, STAGE, key)
    return state
