"""Timing and memory shared by the bench/ scripts (run as ``python bench/<script>.py``: importable as ``_timing``)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import psutil


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls of ``function`` and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class Usage(NamedTuple):
    """What the sampled processes used over an interval of time."""

    seconds: float
    """Wall time of the interval."""
    cpu_seconds: float
    """CPU time (user + system) of every sampled process within the interval."""
    peak_total: int
    """Highest sum of the resident memory of all processes at one sample (bytes)."""
    sum_of_peaks: int
    """Sum over processes of each one's highest resident memory in the interval (bytes; >= peak_total)."""

    def cpu_share(self, cores: int) -> float:
        """CPU seconds / wall seconds / cores: 1.0 is every core busy all the time."""
        return self.cpu_seconds / self.seconds / cores if self.seconds > 0 else float("nan")


class PeakMemory:
    """Samples the resident memory and CPU time of process trees every ``interval`` seconds, in a thread.

    The trees are this process and its descendants, and those of the pids ``roots()``
    returns at each sample (e.g. a Dask scheduler and workers started in their own
    sessions).  Keeps, per pid, the peak (``peaks``: pid -> (name, bytes)) and the CPU
    time at its last sample (``cpu``: pid -> seconds), and the samples themselves, so
    that `usage` measures any interval of the run (a stage of a pipeline).  A process
    alive when sampling starts counts its CPU time from then; one started later, from
    its start.
    """

    def __init__(self, roots: Callable[[], Iterable[int]] | None = None, interval: float = 0.2) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self.cpu: dict[int, float] = {}
        self.samples: list[tuple[float, float, dict[int, int]]] = []  # (time, CPU seconds so far, pid -> rss)
        self._roots = roots or (lambda: ())
        self._interval = interval
        self._baseline: dict[int, float] = {}
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list[psutil.Process]:
        me = psutil.Process()
        found = {me.pid: me}
        tops = [me]
        for pid in self._roots():
            try:
                tops.append(psutil.Process(pid))
            except psutil.Error:
                continue
        for top in tops:
            found.setdefault(top.pid, top)
            try:
                for child in top.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                continue
        return list(found.values())

    @staticmethod
    def _name(process: psutil.Process) -> str:
        return "client" if process.pid == os.getpid() else " ".join(process.cmdline()[-2:])[:40]

    def sample(self) -> None:
        """Take one sample now (the thread calls it every ``interval`` seconds)."""
        rss_now: dict[int, int] = {}
        for process in self._processes():
            try:
                rss = process.memory_info().rss
                times = process.cpu_times()
                name = self.peaks[process.pid][0] if process.pid in self.peaks else self._name(process)
            except psutil.Error:
                continue
            cpu = times.user + times.system
            if process.pid not in self._baseline:
                self._baseline[process.pid] = cpu if self._first else 0.0
            self.cpu[process.pid] = cpu
            rss_now[process.pid] = rss
            if rss > self.peaks.get(process.pid, ("", 0))[1]:
                self.peaks[process.pid] = (name, rss)
        self._first = False
        used = sum(self.cpu[pid] - self._baseline[pid] for pid in self.cpu)
        self.samples.append((time.perf_counter(), used, rss_now))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def usage(self, start: float, stop: float) -> Usage:
        """What the processes used between two ``time.perf_counter()`` readings (samples within, and the
        last one before ``start`` for the CPU time at the start)."""
        before = [s for s in self.samples if s[0] <= start]
        inside = [s for s in self.samples if start < s[0] <= stop] or self.samples[-1:]
        cpu_start = before[-1][1] if before else 0.0
        peaks: dict[int, int] = {}
        for _, _, rss in inside:
            for pid, value in rss.items():
                peaks[pid] = max(peaks.get(pid, 0), value)
        return Usage(stop - start, inside[-1][1] - cpu_start, max(sum(rss.values()) for _, _, rss in inside),
                     sum(peaks.values()))

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
