"""Progress of long computations through a plain callback, whoever listens.

A *progress callback* is any callable ``progress(done, total)``: the functions
that take one (the kNN search of `sae.knn`, the cross-validation of
`sae.classify`) call it in the calling thread with ``done = 0`` when the work
starts (so the listener knows ``total``), then each time one more of their
``total`` parts is complete, the last call having ``done == total``.
What it does with the numbers (a progress bar, a line of log, an artifact of a
Prefect run) is the caller's business: this package never imports Prefect.

`compute` waits for Dask work part by part: it computes delayed objects
(``dask.compute``) on the active distributed client if ``dask.compute`` would
use one, else on the local scheduler.

>>> import dask
>>> seen = []
>>> compute(*[dask.delayed(abs)(-i) for i in range(3)], progress=lambda done, total: seen.append((done, total)))
(0, 1, 2)
>>> seen[0], seen[-1]
((0, 3), (3, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: ``done`` of ``total`` parts are complete."""

Interrupt = Callable[[str], None]
"""``interrupt(where)``: raises to stop a computation at ``where`` (e.g. the run that started it is gone,
``flows._dask.run_gone_check``); the computations that take one call it between their parts and before
each write that changes what the store holds, so that nothing is written once it raised."""

__all__ = ["Interrupt", "ProgressCallback", "compute", "go_on"]


def go_on(where: str) -> None:
    """The `Interrupt` of a computation wanted until it ends: never raises."""


def _distributed_client() -> Any:
    """The distributed client ``dask.compute`` would use now, or None (a local scheduler)."""
    from dask.base import get_scheduler

    scheduler = get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    return owner if isinstance(owner, Client) else None


def compute(*objects: Any, progress: ProgressCallback | None = None, parts: Sequence[Any] | None = None) -> tuple:
    """``dask.compute(*objects)``, calling ``progress(done, total)`` as each part is computed.

    The parts are ``objects`` themselves by default; ``parts`` (delayed
    objects of the same graph, ``objects`` among them or not) counts finer
    steps instead, e.g. every build and query of a blocked search, whose
    outputs only complete at its end.  On a distributed client the parts become
    futures, waited for as they complete (one that is not an output is
    released as soon as it is counted, so it is not held longer than its
    dependents need it); on a local scheduler a callback counts the tasks that
    produce them.  The results are those of ``dask.compute``.
    """
    if progress is None:
        return dask.compute(*objects)
    counted = list(objects) if parts is None else list(parts)
    client = _distributed_client()
    if client is not None:
        from distributed import as_completed

        counted_keys = {getattr(part, "key", None) for part in counted} - {None}
        output_keys = {getattr(obj, "key", None) for obj in objects}
        extra = [part for part in counted if getattr(part, "key", None) not in output_keys]
        futures = client.compute(list(objects) + extra)
        outputs, others = futures[:len(objects)], futures[len(objects):]
        watched = [f for f in outputs if f.key in counted_keys] + others
        released = {f.key for f in others}
        try:
            progress(0, len(watched))
            for done, future in enumerate(as_completed(watched), start=1):
                progress(done, len(watched))
                if future.key in released:
                    future.release()
            return tuple(client.gather(outputs))
        finally:
            client.cancel(outputs)
    from dask.callbacks import Callback

    total = len(counted)
    wanted = {getattr(obj, "key", None) for obj in counted} - {None}
    finished: set = set()

    def count(key: Any, *_: Any) -> None:
        if key in wanted and key not in finished:
            finished.add(key)
            progress(len(finished), total)

    progress(0, total)
    with Callback(posttask=count):
        results = dask.compute(*objects)
    if len(finished) < total:  # parts that were not tasks of the graph (constants, renamed keys)
        progress(total, total)
    return results
