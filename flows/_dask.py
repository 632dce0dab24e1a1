"""Which Dask client a flow task computes on.

A task run by a ``prefect_dask.DaskTaskRunner`` executes on a Dask worker: its
fine-grained work goes to the same cluster through
a client of its own (`cluster_client`), the task seceding from its worker thread
while it waits (so a single-threaded worker cannot deadlock on its own
sub-tasks).  A task run by a thread pool (local runs) has no cluster.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from sae.blas import one_blas_thread
from sae.progress import Interrupt, ProgressCallback, go_on

LOOPBACK: dict[str, Any] = {"dashboard_address": "127.0.0.1:0", "worker_dashboard_address": "127.0.0.1:0"}
"""Keyword arguments of ``distributed.LocalCluster`` that keep its HTTP servers on 127.0.0.1.

A cluster of threads (``processes=False``) talks in-process, but its scheduler and
worker still serve HTTP (dashboard, ``/metrics``): on every interface, port 8787, even
with ``dashboard_address=None``, unless told otherwise.  A cluster of processes also
needs ``host="127.0.0.1"`` (which a cluster of threads refuses)."""


class RunGone(RuntimeError):
    """The run that started a task on a Dask worker is gone, so the task stops before it writes any more."""


def run_gone_check(step: str) -> Interrupt:
    """An `sae.progress.Interrupt` ``check(where)`` that raises `RunGone` once nothing wants the result of the
    running Dask task.

    A step that works through a client of its own (`cluster_client`) keeps
    going when the command that started it is killed or stopped: the
    scheduler lets go of the task (its client left the cluster) but cannot
    stop a running thread, and the step's own client still holds its work.
    The store's lock went with the command's process, so such a step would
    write into a store that another run may have taken meanwhile.  The step
    calls the check between its parts, before it writes and before it marks
    its work complete; ``where`` says where it stopped, for the message.  What
    is left: a write under way when the run goes still ends (its work is not
    recorded as complete), and a command whose host vanishes without closing
    its connection is noticed only when the scheduler's connection to it
    times out.  Off a Dask worker (a command's local threads) the check raises
    once the command's flow run is being stopped (`StoppableTaskRunner`); in a
    thread that executes no task of the worker it does nothing (the step dies
    with its process).  Call this in the task's thread.
    """
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return _stopping_check(step)
    # the key of the task this thread executes (a thread that inherited the worker but runs no task of it: none)
    key = worker.active_threads.get(threading.get_ident())
    if key is None:
        return go_on

    def check(where: str) -> None:
        state = worker.state.tasks.get(key)
        # "cancelled": the scheduler released a task that was executing (long-running once seceded)
        if state is None or state.state in ("cancelled", "released", "forgotten"):
            raise RunGone(f"{step}: the run that started it is gone (its client left the Dask cluster: the "
                          f"command was killed or stopped), so it stopped at {where} without writing more; "
                          f"the store keeps what was complete. Run the command again to resume.")

    return check


#: Set when a flow run of this process is being stopped (`StoppableTaskRunner`): its tasks' threads stop too.
STOPPING = threading.Event()


def _stopping_check(step: str) -> Interrupt:
    """Off a Dask worker: a check that raises `RunGone` once this process's flow run is being stopped."""

    def check(where: str) -> None:
        if STOPPING.is_set():
            raise RunGone(f"{step}: the command was stopped, so it stopped at {where} without writing more; the "
                          f"store keeps what was complete. Run the command again to resume.")

    return check


def blas_for_local_tasks(several: Callable[[], bool]) -> AbstractContextManager[None]:
    """BLAS on one thread (`sae.blas.one_blas_thread`) while several pieces of BLAS work of this flow run at once
    on threads of this process (``several()``, asked only then): a training of several blocks on an in-process
    cluster, the tiles of an exact kNN on Dask's threaded scheduler.  Only when the flow's tasks run here
    (`StoppableTaskRunner`): a cluster's workers run BLAS on one thread already.  Entered in the flow's thread,
    the main thread of a command, the only one OpenBLAS takes a count from; one piece of work keeps every core
    for its products.
    """
    context = FlowRunContext.get()
    if context is None or not isinstance(context.task_runner, StoppableTaskRunner) or not several():
        return nullcontext()
    return one_blas_thread()


class StoppableTaskRunner(ThreadPoolTaskRunner):
    """Prefect's thread-pool task runner, but a flow run stopped by a signal (SIGTERM, Ctrl-C) stops its tasks.

    Leaving a flow run's context joins the threads of its running tasks.  A task that runs for minutes (a
    training) would keep a stopped command alive to its end: Prefect sets an event per task before it joins,
    but only its task engine can read it.  This runner sets `STOPPING` first, which the checks of
    `run_gone_check` made off a Dask worker read, so the task stops at its next check (a training: the next
    Z-step iteration or mini-batch).  A flow run entered clears it.  Every flow of the project runs its local
    tasks on it (a graph stage stopped 2.7 s after a SIGTERM instead of 200 s).

    With more than one thread, BLAS runs on one thread while the runner runs, as on Dask's worker processes,
    since its tasks make the parallelism (`sae.blas.one_blas_thread`, entered in the flow's thread, the main
    one in a command: `sae encode` of 48 clips on two threads 49-54 s -> 38 s).
    """

    def __enter__(self) -> StoppableTaskRunner:
        STOPPING.clear()
        runner = super().__enter__()  # raises for a runner already started: its limit stays as it is
        self._blas = one_blas_thread() if self._max_workers > 1 else nullcontext()
        self._blas.__enter__()
        return runner

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):  # TerminationSignal, KeyboardInterrupt
            STOPPING.set()
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            blas = self.__dict__.pop("_blas", None)  # (a runner is pickled with its attributes)
            if blas is not None:
                blas.__exit__(None, None, None)


def not_gone(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task unless it stopped because its run is gone."""
    return not isinstance(state.data, RunGone)


def checked(progress: Any, check: Interrupt) -> ProgressCallback:
    """A `sae.progress` callback that asks ``check`` (a `run_gone_check`) before it reports to ``progress`` (a
    `flows._progress.Progress`): the step stops at its next part once its run is gone."""

    def callback(done: int, total: int) -> None:
        check(f"{done} of {total} {progress.unit}")
        progress(done, total)

    return callback


def on_dask_worker() -> bool:
    """True inside a task executing on a Dask worker."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


@contextmanager
def cluster_client() -> Iterator[Any]:
    """The cluster's client on a Dask worker (a client of the task's own), else None.

    The scheduler's address comes from the worker itself. ``distributed.get_client()``
    (which ``prefect_dask.get_dask_client`` asks for it) may hand over the process's
    default client, which in a cluster of threads can be another task's, closed when
    that task ends: the address was then read from a closed client (``None.address``).
    """
    if not on_dask_worker():
        yield None
        return
    from distributed import Client, get_worker, rejoin, secede

    address = get_worker().scheduler.address
    secede()  # free this worker thread for the tasks we wait on
    try:
        with Client(address, timeout=30) as client:
            yield client
    finally:
        rejoin()


@contextmanager
def dask_client() -> Iterator[Any]:
    """Always a client: the cluster's on a Dask worker, else an in-process threaded cluster's."""
    if on_dask_worker():
        with cluster_client() as client:
            yield client
        return
    from distributed import Client, LocalCluster

    import dask

    threads = max(1, os.cpu_count() or 1)
    # No statistical profiler (``sys._current_frames`` every 10 ms from the worker's event loop): in this
    # process, on Python 3.11, it deadlocked against the training's compiled kernels (every thread waiting
    # for the GIL, the profiler holding it while waiting for the interpreter's thread-list lock).
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, **LOOPBACK) as cluster:
        with Client(cluster) as client:
            yield client
