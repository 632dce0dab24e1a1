"""Previous iterates on the workers' disks (``offload_previous``): files instead of memory.

With ``offload_previous``, a dense block's ``x_{k-1}``, ``x_{k-1} C`` and
``x_k C`` live in a file of its worker instead of its memory, so the Z step
holds one generation of iterates in memory instead of two.  `Offloaded`
writes arrays to an unlinked file of the worker's local directory (Dask's
``temporary-directory``), with direct I/O (``O_DIRECT``) where the filesystem
allows, so the page cache does not hold them either; files are recycled
(`OffloadFiles`, trimmed with the array pool).  A block iteration writes
``x_k`` and ``P_k`` in the worker's I/O thread while its kernel computes
``x_{k+1}``, then appends ``P_{k+1}``; loading a block's file has the I/O
thread read the next block's ahead (`OffloadFiles.prefetch_after`: a worker
runs its blocks in the same order at every iteration).  Pickled (Dask moving
or spilling a state), an `Offloaded` becomes the arrays themselves
(`Resident`), so spilling one costs more than it saves.  The iterates are the
same to the bit as in memory.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from sae.distributed.memory import ArrayPool, aligned, pool, pooled_empty, sizeof_fields

logger = logging.getLogger(__name__)

#: Bytes per read or write call of an offloaded array (through a page-aligned buffer of this size, per thread).
OFFLOAD_CHUNK = 8 << 20


@dataclass(eq=False)
class FileSlot:
    """An open, unlinked file of a worker (gone with its descriptor, also when the process dies)."""

    fd: int
    capacity: int  # bytes, a multiple of DIRECT_ALIGN
    direct: bool  # opened with O_DIRECT


class OffloadFiles:
    """The worker process's offload files, recycled as `ArrayPool` recycles arrays.

    A file is in use while the `Offloaded` written to it exists; it is then
    free and written again by a later iteration (overwriting an allocated file
    is cheaper than creating one).  Free files beyond `POOL_SPARE` per
    size are closed by `trim`.  Files are created unlinked in the Dask
    worker's local directory (Dask's ``temporary-directory``), else in
    ``tempfile.gettempdir()``.
    """

    def __init__(self, pool: ArrayPool, chunk: int = OFFLOAD_CHUNK) -> None:
        self.pool = pool  # whose ``trainings`` say whether free files are kept
        self.chunk = chunk  # bytes per read or write call, a multiple of DIRECT_ALIGN
        self.lock = threading.RLock()  # a finalizer may release a file in any thread, also one holding it
        self.free: dict[int, list[FileSlot]] = {}  # capacity -> free files
        self.in_use = 0
        self.buffers = threading.local()  # the page-aligned buffer of each thread
        self.live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # sequence -> Offloaded
        self.sequence = 0
        self.executor: Any = None  # the I/O thread: writes and reads ahead

    def submit(self, function: Callable, *args: Any) -> Any:
        """Run ``function(*args)`` in the I/O thread (one per process: writes and reads ahead in order)."""
        with self.lock:
            if self.executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self.executor = ThreadPoolExecutor(1, thread_name_prefix="sae-offload")
            return self.executor.submit(function, *args)

    def register(self, offloaded: Offloaded) -> int:
        """Number a new `Offloaded` in order of creation; returns its number."""
        with self.lock:
            self.sequence += 1
            self.live[self.sequence] = offloaded
            return self.sequence

    def prefetch_after(self, sequence: int) -> None:
        """Have the I/O thread read the live `Offloaded` created next after number ``sequence``, unless it was
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

    def acquire(self, nbytes: int, directory: str | None = None) -> FileSlot:
        """A free file of at least ``nbytes``, else a new one in ``directory`` (default: `directory()`)."""
        capacity = aligned(nbytes)
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
            slot = FileSlot(fd, capacity, direct)
        return slot

    def release(self, slot: FileSlot) -> None:
        """Give a file back (the `Offloaded` on it is gone); it is closed if no training runs."""
        with self.lock:
            self.in_use -= 1
            self.free.setdefault(slot.capacity, []).append(slot)
        if not self.pool.trainings:
            self.trim()

    def trim(self, keep: int | None = None) -> int:
        """Close the free files beyond ``keep`` per size (default: the pool's `ArrayPool.spare`); returns the
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
                mmap.mmap(-1, self.chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        return buffer

    def write(self, slot: FileSlot, arrays: Sequence[np.ndarray], offset: int = 0) -> None:
        """Write ``arrays`` one after the other from ``offset``, each from an aligned offset."""
        self._transfer(slot, arrays, write=True, offset=offset)

    def read(self, slot: FileSlot, out: Sequence[np.ndarray]) -> None:
        """Read back into ``out`` (C-contiguous arrays of the shapes and dtypes written)."""
        self._transfer(slot, out, write=False)

    @staticmethod
    def _move(slot: FileSlot, piece: memoryview, position: int, write: bool) -> int:
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

    def _transfer(self, slot: FileSlot, arrays: Sequence[np.ndarray], write: bool, offset: int = 0) -> None:
        """Move ``arrays`` to or from the file: straight from their memory when they are pooled (page-aligned,
        `direct_extent`), else through this thread's page-aligned buffer."""
        for array in arrays:
            if not write and not array.flags.c_contiguous:
                raise ValueError("offloaded arrays are read into C-contiguous arrays")
            extent = direct_extent(array)
            if extent is None:  # through the buffer: copied in before a write, out after a read
                buffer = self._buffer()
                staging = np.frombuffer(buffer, dtype=np.uint8)
                raw = (np.ascontiguousarray(array) if write else array).reshape(-1).view(np.uint8)
            step = self.chunk if extent is not None else buffer.nbytes
            for start in range(0, array.nbytes, step):
                size = min(step, array.nbytes - start)
                piece = (extent[start:] if extent is not None else buffer)[:aligned(size)]
                if write and extent is None:
                    staging[:size] = raw[start:start + size]
                moved = self._move(slot, piece, offset + start, write)
                if moved < (piece.nbytes if write else size):
                    raise OSError(f"short {'write to' if write else 'read from'} an offload file "
                                  f"({moved} of {piece.nbytes} bytes at {offset + start})")
                if not write and extent is None:
                    raw[start:start + size] = staging[:size]
            offset += aligned(array.nbytes)


def direct_extent(array: np.ndarray) -> memoryview | None:
    """The bytes of ``array`` rounded up to `DIRECT_ALIGN`, if it is a whole `page_aligned_flat` array (or a
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
    length = aligned(array.nbytes)
    return view[:length] if length <= view.nbytes else None


offload_files = OffloadFiles(pool)
"""This process's offload files (a worker's), trimmed with its array pool."""
pool.companions.append(offload_files.trim)


class Offloaded:
    """Arrays kept in an offload file of this worker (`OffloadFiles`) instead of its memory.

    ``load`` reads them back into pooled arrays (`pooled_empty`), and has the
    I/O thread read ahead the *next* `Offloaded` of this process in order of
    creation (`OffloadFiles.prefetch_after`): a worker runs its blocks in the
    same order at every iteration, so that is the one its next block iteration
    loads, and its read then overlaps this iteration's kernel.  The file is free
    again once this object is gone.  Pickled (Dask moving a block state to
    another worker, or spilling it), it becomes the arrays themselves: a
    `Resident`.
    """

    def __init__(self, arrays: Sequence[np.ndarray], files: OffloadFiles | None = None, *, reserve: int = 0,
                 complete: bool = True, directory: str | None = None) -> None:
        """Write ``arrays``; ``reserve``: bytes for arrays to `append`; ``complete=False``: `complete` later;
        ``directory``: where a new file goes (`OffloadFiles.directory`)."""
        self.files = offload_files if files is None else files
        self.specs: tuple = ()
        self.size = 0  # bytes written, each array from an aligned offset
        slot = self.files.acquire(sum(aligned(a.nbytes) for a in arrays) + aligned(reserve), directory)
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
        if self.size + aligned(array.nbytes) > self.slot.capacity:
            raise ValueError(f"no room left for {array.nbytes} bytes (reserve them when creating)")
        self.files.write(self.slot, (array,), offset=self.size)
        self.specs += ((tuple(array.shape), array.dtype.str),)
        self.size += aligned(array.nbytes)

    def complete(self) -> None:
        """All arrays are written: number it in order of creation, so that loads read it ahead."""
        self.sequence = self.files.register(self)

    def read(self) -> tuple[np.ndarray, ...]:
        out = tuple(pooled_empty(shape, dtype) for shape, dtype in self.specs)
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
        return Resident, (self.load(prefetch_next=False),)


@dataclass(frozen=True, eq=False)
class Resident:
    """Offloaded arrays brought back into memory (an unpickled `Offloaded`): the same ``load``."""

    arrays: tuple[np.ndarray, ...]

    @property
    def specs(self) -> tuple:
        return tuple((tuple(a.shape), a.dtype.str) for a in self.arrays)

    def load(self, prefetch_next: bool = True) -> tuple[np.ndarray, ...]:
        return self.arrays


def offload_async(arrays: Sequence[np.ndarray], reserve: int = 0) -> Any:
    """Write ``arrays`` to an offload file in this process's I/O thread (``reserve`` bytes more for `append`);
    a future of the `Offloaded`, to `complete`."""
    # the worker's directory is looked up here, in the task's thread: the I/O thread does not know the worker
    directory = offload_files.directory()
    return offload_files.submit(partial(Offloaded, reserve=reserve, complete=False, directory=directory), arrays)


sizeof.register(Resident)(sizeof_fields)


@sizeof.register(Offloaded)
def _sizeof_offloaded(offloaded: Offloaded) -> int:
    """Its arrays are on disk, but those read ahead, or being read, are in memory."""
    if offloaded.prefetched is None:
        return 64
    return 64 + sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in offloaded.specs)
