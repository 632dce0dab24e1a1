"""The store lock: one process writes a store at a time.

The run that holds `store_lock` (a lock file ``<store>.lock`` beside the store,
`sae.store.keys.lock_path`, released by the operating system when its process
dies, even by SIGKILL) is the one writer; tasks of that run on Dask workers
write the chunks it assigns them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sae.store.keys import lock_path
from sae.store.layout import PathLike, StoreLocked, _now

logger = logging.getLogger("sae.store")


def lock_holder(store: PathLike) -> str:
    """Who holds (or last held) the lock of a store, as recorded in its lock file ("" if unknown)."""
    try:
        info = json.loads(lock_path(store).read_text() or "{}")
    except (OSError, ValueError):
        return ""
    return ", ".join(f"{k} {info[k]}" for k in ("pid", "host", "since", "command") if k in info)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": " ".join(sys.argv)[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


_LOCKS: dict[str, Any] = {}


@contextmanager
def store_lock(store: PathLike, *, wait: float | None = None, log_every: float = 30.0) -> Iterator[None]:
    """Hold the store's lock: the calling process is the one writer of ``store`` until the block ends.

    The lock is re-entrant within a process (a pipeline holds it around its
    stages, which take it again).  Another process waits, logging who holds
    it every ``log_every`` seconds, at most ``wait`` seconds (None: as long as
    it takes), then raises `StoreLocked`.  It is an operating-system lock on
    ``<store>.lock`` (`filelock`): it is released when its process ends, even
    when killed, and works on local filesystems (not across the hosts of a
    network filesystem).
    """
    from filelock import FileLock, Timeout

    path = str(lock_path(store))
    lock = _LOCKS.get(path)
    if lock is None:
        lock = _LOCKS[path] = FileLock(path, thread_local=False, on_acquired=_write_holder)
    deadline = None if wait is None else time.monotonic() + wait
    step = 0.0  # the first attempt does not wait: a busy store is reported at once
    while True:
        try:
            lock.acquire(timeout=step)
            break
        except Timeout:
            holder = lock_holder(store) or "unknown process"
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreLocked(
                    f"store {str(store)!r} is in use by another sae run ({holder}); "
                    f"{f'waited {wait:.0f} s; ' if wait else ''}try again when it ends"
                ) from None
            logger.warning("store %s is in use by another sae run (%s): waiting for it to end%s", store, holder,
                           " (Ctrl-C to give up)" if step == 0 else "")
            step = log_every if deadline is None else max(0.0, min(log_every, deadline - time.monotonic()))
    try:
        yield
    finally:
        lock.release()


def lock_state(store: PathLike) -> str:
    """Who holds the store's lock now ("" when nobody: the lock is free)."""
    from filelock import FileLock, Timeout

    path = lock_path(store)
    if not path.exists() or str(path) in _LOCKS and _LOCKS[str(path)].is_locked:
        return ""
    probe = FileLock(str(path), thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return lock_holder(store) or "another process"
    probe.release()
    return ""
