"""BLAS on one thread while parallel work of this process runs: `one_blas_thread`.

OpenBLAS spreads every product over all the cores and keeps its threads
spinning for a while after each call.  Where the parallelism is already ours
(several frames' solvers, tasks on several threads of this process) that
oversubscribes the cores: two products at once ran four BLAS threads on two
cores.  Dask's worker processes start with one BLAS thread for that reason
(``OPENBLAS_NUM_THREADS=1``: ``distributed.nanny.pre-spawn-environ``); the
per-frame solvers, the commands' task runners of several threads and a
training on an in-process cluster take the same setting from
`one_blas_thread` while they run.  Measured (README, "Benchmarks"): a batch of
256 frames of the per-frame solvers 9-10 ms -> 5 ms; an iteration of the
graph Z step on local threads (development set, 560,280 frames, 12 blocks)
5.2-5.5 s -> 2.9 s; `sae encode` of 48 clips on two task threads 49-54 s ->
38 s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["one_blas_thread", "blas_threads", "blas_threads_text"]

_STATE: dict[str, Any] = {"pid": None, "depth": 0, "limit": None}


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread in this whole process while the outermost use of this context in the main thread runs
    (threadpoolctl); in any other thread, nothing.

    BLAS's thread count is the process's, and OpenBLAS keeps the main thread's: once the main thread has set
    one, it ignores a count set from any other thread (measured, OpenBLAS 0.3.31: the request is dropped, the
    count read back unchanged).  So only the main thread sets it, and the uses there share one limit, lifted
    (back to what it was) when the outermost ends.  Work in other threads is covered by the main thread's use
    around it: a command's task runner, a training's in-process cluster.  Both BLAS libraries are limited:
    numpy's and scipy's, which the compiled kernels call (``scipy.linalg`` is loaded first so that the limit
    reaches it).  A context manager of contextlib: also a decorator, entered at each call.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _STATE["pid"] != os.getpid():  # first use, or a forked child: the parent's limit is not ours to lift
        _STATE.update(pid=os.getpid(), depth=0, limit=None)
    if _STATE["depth"] == 0:
        import scipy.linalg  # noqa: F401
        from threadpoolctl import ThreadpoolController

        # the libraries loaded now (0.4 ms): one loaded since the last use (faiss brings its own) is limited too
        _STATE["limit"] = ThreadpoolController().limit(limits=1, user_api="blas")
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
        if _STATE["depth"] == 0:
            _STATE["limit"].restore_original_limits()
            _STATE["limit"] = None


def blas_threads() -> list[int]:
    """The thread counts of the BLAS libraries of this process threaded by their own threads, sorted, no repeats.

    Left out: a BLAS threaded by OpenMP, whose count is OpenMP's, kept per thread, so that a limit set in the
    main thread does not reach the others (faiss-cpu brings an OpenBLAS of that kind, for faiss's own
    products; numpy's and scipy's wheels, which our products use, are threaded by their own threads).
    """
    from threadpoolctl import threadpool_info

    return sorted({info["num_threads"] for info in threadpool_info()
                   if info["user_api"] == "blas" and info.get("threading_layer") != "openmp"})


def blas_threads_text() -> str:
    """``"BLAS on N thread(s) per product"`` (counts of `blas_threads` joined by ``/``), for the stages' logs."""
    return f"BLAS on {'/'.join(map(str, blas_threads()))} thread(s) per product"
