"""Worker memory: the array pool of the Z step's dense iterates, and what Dask counts of a block state.

**Array pool.**  The new iterate ``x_{k+1}`` (N_b, m) and ``x_{k+1} C``
(N_b, n) of every block iteration are taken from the worker process's
`ArrayPool`: Dask's workers run with ``MALLOC_TRIM_THRESHOLD_`` set, so a freed
array of that size goes back to the system and a new one is a fresh ``mmap``
whose pages the kernel zeroes and faults in again at every iteration.  The
pool keeps the flat array under every array it hands out (page-aligned, in a
mapping of its own: `page_aligned_flat`, so that direct I/O of the offload
files goes straight from and into it); one whose reference count is back to
the pool's own (its state was released by Dask: the arrays handed out, their
views and pickled buffers all hold references to it) is free and is handed
out again.  Free arrays beyond `POOL_SPARE` per shape are let go at each
request and by `ArrayPool.trim`: every `POOL_TRIM_SECONDS` on each worker
during a training (`start_pool_trimming`; a worker paused by its memory limit
runs no task), by the tasks that follow a Z step, and all of them after a
training (`release_pool`).  Where reference counts cannot tell (not
CPython), arrays are never recycled.

**Sizes.**  Dask decides when a worker spills results to disk
(``distributed.worker.memory``) from their ``dask.sizeof``; it knows numpy
arrays and scipy's ``spmatrix`` but not scipy's sparse *arrays* nor
dataclasses (56 bytes each otherwise): `sizeof_fields` and the registration
below make a block state count its arrays.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import scipy.sparse as sp
from dask.sizeof import sizeof

#: Free arrays the pool keeps per shape while a training runs (the others are let go).
POOL_SPARE = 2

#: Period of the pool trimming on each worker, in seconds.
POOL_TRIM_SECONDS = 0.5

#: Offsets, lengths and buffers of direct I/O are multiples of this many bytes.
DIRECT_ALIGN = 4096

#: Mappings of at least this many bytes ask for transparent huge pages (as numpy does for its large arrays).
_HUGE_PAGES_FROM = 4 << 20

_TRIM_CALLBACK = "sae-pool-trim"


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of `DIRECT_ALIGN`."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def page_aligned_flat(count: int, dtype: Any) -> np.ndarray:
    """Like ``np.empty(count)``, in an anonymous mapping of its own: page-aligned and a whole number of
    `DIRECT_ALIGN` bytes long, so that direct I/O goes straight from and into it.

    The array does not own its memory (the mapping does): every view of a view of it has *it* as base.
    """
    dtype = np.dtype(dtype)
    size = max(aligned(count * dtype.itemsize), DIRECT_ALIGN)
    # private (the default, shared, would be shmem: no transparent huge pages), huge pages as numpy asks them
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= _HUGE_PAGES_FROM and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, dtype=dtype, count=count)


def _refcounts_tell_free() -> bool:
    """Whether this interpreter's reference counts say when a pooled array is free (CPython's do)."""
    flats = [np.frombuffer(bytearray(8), dtype=np.uint8)]  # as `page_aligned_flat`: memory it does not own
    alone = sys.getrefcount(flats[0]) == 2
    handed = flats[0].reshape(2, 4)
    view = handed[1:]
    del handed
    held = sys.getrefcount(flats[0]) > 2  # the view of what was handed out holds the flat array
    del view
    return alone and held and sys.getrefcount(flats[0]) == 2


_REFCOUNTS_TELL_FREE = _refcounts_tell_free()  # else the pool hands out arrays it never recycles


class ArrayPool:
    """Uninitialised arrays like ``np.empty``, recycled: one that nothing references any more, if any.

    ``companions``: functions ``trim(keep) -> bytes`` of other recycled
    resources (the offload files) that `trim` trims by the same rule.
    """

    def __init__(self) -> None:
        self.arrays: dict[tuple, list[np.ndarray]] = {}  # (shape, dtype) -> the arrays handed out
        self.lock = threading.Lock()
        self.trainings = 0  # trainings running on this worker process (`start_pool_trimming` .. `release_pool`)
        self.companions: list[Callable[[int | None], int]] = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = math.prod(shape)
        if not _REFCOUNTS_TELL_FREE:
            return page_aligned_flat(count, dtype).reshape(shape)
        key = (tuple(shape), np.dtype(dtype).str)
        with self.lock:
            arrays = self.arrays.setdefault(key, [])
            free = self._trim(arrays, POOL_SPARE + 1)
            flat = arrays[free[0]] if free else page_aligned_flat(count, dtype)
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
        """Free arrays (and companions' resources) kept per shape: `POOL_SPARE` while a training runs, else none."""
        return POOL_SPARE if self.trainings else 0

    def trim(self, keep: int | None = None) -> int:
        """Let go of the free arrays beyond ``keep`` per shape (default: `spare`), and trim the companions.

        Returns the bytes let go.  Without trimming, the last generations of
        iterates would stay allocated after a Z step while the codes are read
        back, and the states Dask spills to disk would free nothing.
        """
        freed = 0
        with self.lock:
            kept = self.spare() if keep is None else keep
            for key in list(self.arrays):
                arrays = self.arrays[key]
                before = sum(a.nbytes for a in arrays)
                self._trim(arrays, kept)
                freed += before - sum(a.nbytes for a in arrays)
                if not arrays:
                    del self.arrays[key]
        return freed + sum(trim(keep) for trim in self.companions)


pool = ArrayPool()
"""This process's pool (a worker's, when it runs block tasks)."""


def pooled_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array of this process's pool (`ArrayPool.empty`)."""
    return pool.empty(shape, dtype)


def trim_pool() -> int:
    """Trim this process's pool (`ArrayPool.trim`); returns the bytes let go."""
    return pool.trim()


def start_pool_trimming(dask_worker: Any) -> None:
    """Trim the pool every `POOL_TRIM_SECONDS` on this worker's event loop (run by ``client.run``; idempotent).

    Left running for the worker's lifetime (trainings may overlap): a few
    microseconds when the pool is empty.
    """
    with pool.lock:
        pool.trainings += 1
    if _TRIM_CALLBACK not in dask_worker.periodic_callbacks:
        from tornado.ioloop import PeriodicCallback

        callback = PeriodicCallback(trim_pool, POOL_TRIM_SECONDS * 1000)
        dask_worker.periodic_callbacks[_TRIM_CALLBACK] = callback
        callback.start()


def release_pool() -> int:
    """Let go of the free pooled arrays (run on each worker after a training); returns the bytes let go.

    Pooled arrays still in use (another training's, or results Dask has not
    released yet) stay pooled until the periodic trimming finds them free.
    """
    with pool.lock:
        pool.trainings = max(pool.trainings - 1, 0)
    return pool.trim(keep=0)


@sizeof.register(sp.sparray)
def _sizeof_sparse_array(matrix: sp.sparray) -> int:
    return sum(sizeof(value) for value in vars(matrix).values())


def sizeof_fields(obj: Any) -> int:
    """The ``dask.sizeof`` of a dataclass: the sum of its fields'."""
    return sum(sizeof(getattr(obj, f.name)) for f in fields(obj))
