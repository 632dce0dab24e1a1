"""What a user sees of the long steps while they run: Prefect progress artifacts, the terminal, the log.

A `Progress` follows one step of a run (ingestion in clips, the kNN search in
steps (builds, queries, merges), a training in outer iterations, a cross-validation in splits);
it is a progress callback of `sae.progress` (``progress(done, total)``), and:

- inside a Prefect flow or task run, it creates a progress artifact (key
  ``progress-<step>``) and updates it as the step proceeds (at most every
  `ARTIFACT_SECONDS`: an update that comes sooner is written that long after
  the previous one; the last one at once), so the run's page in the UI shows
  how far the step is, wherever the work runs: on a Dask worker the task has
  its run's API settings and updates the artifact itself;
- it feeds the terminal display of the ``sae`` command (`terminal_display`):
  directly when the step runs in the command's process, through the Dask
  scheduler's event log (topic `TOPIC`) when it runs on a Dask worker;
- with ``log_seconds``, it writes a line to the run's log (the UI and, when
  the run is local, the terminal) at most that often, and at the end.

A task that runs on a Dask worker wraps its work in `worker_logs`: the ``sae``
library's records of its thread (the training's halo, memory estimate and Z-step
progress, the kNN's and the classification's lines) reach the run's log in the
UI and, through the same event topic, the terminal of the command that started
the run. On a worker the library's logger has neither handlers nor level of its
own: the lines would be lost.

On a terminal the display draws one progress bar per step (`rich`) and the
log lines that repeat a bar are left out of the terminal (not out of the UI);
when the output is not a terminal it prints nothing of its own for local
steps (their log lines say it) and a plain log line per update of a step that
runs on a Dask worker (at most every `LINE_SECONDS` per step).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

TOPIC = "sae-progress"
"""Dask event topic of progress messages sent by steps running on Dask workers."""

ARTIFACT_SECONDS = 1.0
"""Shortest interval between two writes of a progress artifact (but the last)."""

FINAL_ATTEMPTS = 3
"""Requests made, at most, to write a step's last state to its artifact."""

LINE_SECONDS = 10.0
"""Shortest interval between two plain progress lines of a remote step (but its first and last)."""

PROGRESS_RECORD = "sae_progress"
"""Attribute of the log records that repeat a progress bar (the terminal display hides them)."""

LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"
"""How a worker's forwarded record prints on the terminal (the format of Prefect's console lines)."""

_logger = logging.getLogger("sae.progress")
_display: TerminalDisplay | None = None
_forwarding: contextvars.ContextVar[tuple[str | None, logging.Handler | None] | None] = contextvars.ContextVar(
    "sae_worker_logs", default=None)
"""Inside `worker_logs`: the store and the API handler (or None) of the task's records."""
_library = {"users": 0, "saved": logging.NOTSET}
_library_lock = threading.Lock()


def _origin() -> str:
    """This process, as a worker's log message names it (the display prints the messages of other processes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def artifact_key(step: str) -> str:
    """Key of the progress artifact of a step: lowercase letters, digits and dashes.

    >>> artifact_key("classify baseline"), artifact_key("train 1A2b_x")
    ('progress-classify-baseline', 'progress-train-1a2b-x')
    """
    return "progress-" + re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")


def _current_run() -> tuple[Any, Any, int] | None:
    """The current run: (flow run id, task run id or None, attempt of the task run); None outside runs."""
    from prefect.context import FlowRunContext, TaskRunContext

    task = TaskRunContext.get()
    if task is not None:
        return task.task_run.flow_run_id, task.task_run.id, int(task.task_run.run_count or 1)
    flow = FlowRunContext.get()
    return None if flow is None or flow.flow_run is None else (flow.flow_run.id, None, 1)


@contextmanager
def _own_api_client() -> Iterator[None]:
    """Prefect's requests inside go through a client of their own, not the run's shared one.

    Tasks that run at once on one Dask worker can share one client, which the
    first to end closes under the others ("Cannot send a request, as the
    client has been closed"): their progress would stop there. Without an API
    address (an ephemeral API) the run's client is kept.
    """
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    token = SyncClientContext.__var__.set(None)  # so that the context below makes its own client
    try:
        with SyncClientContext():
            yield
    finally:
        SyncClientContext.__var__.reset(token)


def _run_logger() -> Any:
    """The logger of the current flow or task run (the UI's log), or None outside runs."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return None
    return get_run_logger()


class Progress:
    """One step's progress: ``done`` of ``total`` ``unit`` (see the module docstring).

    Parameters
    ----------
    step : str
        Short name, also the artifact's key (``"ingest"``, ``"train 1a2b3c"``).
    total : int or None
        Parts of the step; None: given by the first update (the artifact is
        created then), as `sae.progress` callbacks do with ``progress(0, total)``.
    unit : str
        What a part is (``"clips"``, ``"steps"``, ``"outer iterations"``, ``"splits"``).
    store : str, optional
        The store the step works on: the terminal display of a command shows
        the steps of its own store only.
    log_seconds : float, optional
        Write a progress line to the run's log at most this often (and at the
        end); None: never (the step logs its own lines).
    done : int
        Parts complete already (a resumed step).
    """

    def __init__(self, step: str, total: int | None, unit: str, *, store: str | None = None,
                 log_seconds: float | None = None, done: int = 0) -> None:
        self.step, self.unit, self.store = step, unit, store
        self.total = 0 if total is None else int(total)
        self.done, self.detail = int(done), ""
        self.finished = False
        self.log_seconds = log_seconds
        self.id = f"{step}-{uuid.uuid4().hex[:8]}"
        self._artifact: Any = None
        self._create_failures = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._started = False
        self._artifact_at = self._log_at = time.monotonic()
        self._run_logger = _run_logger()
        self._run = _current_run()
        if total is not None:
            self._start()

    def _start(self) -> None:
        """Create the artifact and show the step, once its total is known."""
        self._started = True
        if self._run_logger is not None:
            with self._lock:
                self._create()
        _publish(self.message())

    def _create(self) -> bool:
        """Create the artifact with the state of now; False if that state was not written (the caller holds
        the lock).

        A failure (the API busy or out of reach for a moment) is logged, and
        the next update tries again, no sooner than `ARTIFACT_SECONDS` (the
        last update at once): a step's artifact is not lost to one failed request.
        The step has one artifact per run: after a failed request (which the
        server may have carried out) or in a retry of its task run, an artifact
        of the step's key already in the run is taken over, not doubled.
        """
        from prefect.artifacts import create_progress_artifact

        self._artifact_at = time.monotonic()
        try:
            if self._create_failures or (self._run is not None and self._run[2] > 1):
                earlier = self._artifacts_of_step()
                if earlier:
                    self._artifact = earlier[-1].id
                    return self._write()
            with _own_api_client():
                self._artifact = create_progress_artifact(self.percent, key=artifact_key(self.step),
                                                          description=self.text())
            return True
        except Exception as error:  # noqa: BLE001 - progress never fails the work
            self._create_failures += 1
            if self._create_failures == 1:
                _logger.warning("%s: progress artifact not created yet (%s); trying again with the next update",
                                self.step, error)
            return False

    def _artifacts_of_step(self) -> list[Any]:
        """The progress artifacts of this step's key in its run (its task run, or its flow run outside tasks),
        oldest first."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        assert self._run is not None
        flow_run, task_run, _ = self._run
        with _own_api_client():
            found = get_client(sync_client=True).read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(self.step)]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])))
        return sorted((a for a in found if a.type == "progress" and a.task_run_id == task_run), key=lambda a: a.created)

    @property
    def percent(self) -> float:
        """Share done, in percent (100 for an empty step)."""
        return 100.0 if self.total <= 0 else min(100.0, 100.0 * self.done / self.total)

    def text(self) -> str:
        """One line: ``"train 1a2b3c: 3/10 outer iterations (objective 1.2e+04)"``."""
        return f"{self.step}: {self.done}/{self.total} {self.unit}" + (f" ({self.detail})" if self.detail else "")

    def message(self) -> dict[str, Any]:
        """What the terminal display needs, as plain values (it may cross the network)."""
        return {"id": self.id, "step": self.step, "done": self.done, "total": self.total, "unit": self.unit,
                "detail": self.detail, "store": self.store}

    def __call__(self, done: int, total: int | None = None, detail: str | None = None) -> None:
        """Record that ``done`` parts are complete (a `sae.progress` callback)."""
        if total is not None:
            self.total = int(total)
        self.done = int(done)
        if detail is not None:
            self.detail = detail
        if not self._started:
            self._start()
            if self.done == 0:
                return
        finished = self.finished = self.done >= self.total
        now = time.monotonic()
        if self._run_logger is not None:
            with self._lock:
                self._update_artifact(finished, now)
        if self.log_seconds is not None and self._run_logger is not None and (
            finished or now - self._log_at >= self.log_seconds
        ):
            self._log_at = now
            self._run_logger.info("%s", self.text(), extra={PROGRESS_RECORD: True})
        _publish(self.message())

    def _update_artifact(self, finished: bool, now: float) -> None:
        """The artifact follows the step: written (created, if an earlier request failed) at most every
        `ARTIFACT_SECONDS`, the last update at once (the caller holds the lock)."""
        if finished:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._finish_artifact()
            return
        wait = ARTIFACT_SECONDS - (now - self._artifact_at)
        if self._artifact is None:
            if wait <= 0:
                self._create()
        elif wait <= 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._write()
        elif self._timer is None:  # written later, with the state of then
            self._timer = threading.Timer(wait, contextvars.copy_context().run, args=(self._write_later,))
            self._timer.daemon = True
            self._timer.start()

    def _finish_artifact(self) -> None:
        """Write the step's last state, the state the run's page keeps (the caller holds the lock).

        A failed request is tried again (`FINAL_ATTEMPTS` in all, a second, then two, ... apart). Then
        any other artifact of the step's key in the run (a request the client retried after the
        server had carried it out, an earlier attempt of a retried task run) is given the same state:
        none stays behind at an earlier percentage.
        """
        for attempt in range(FINAL_ATTEMPTS):
            if attempt:
                time.sleep(float(attempt))
            if self._create() if self._artifact is None else self._write():
                break
        if self._artifact is None:
            self._run_logger.warning("%s: no progress artifact (%d requests failed, see the log of the "
                                     "process that ran the step)", self.step, self._create_failures)
            return
        try:
            twins = [a.id for a in self._artifacts_of_step() if a.id != self._artifact]
        except Exception as error:  # noqa: BLE001 - progress never fails the work
            _logger.warning("%s: progress artifacts of the run not read (%s)", self.step, error)
            return
        for twin in twins:
            self._write(twin)

    def _write(self, artifact: Any = None) -> bool:
        """Write the state of now to the artifact (or to ``artifact``); False if the request failed (the
        caller holds the lock)."""
        from prefect.artifacts import update_progress_artifact

        self._artifact_at = time.monotonic()
        try:
            with _own_api_client():
                update_progress_artifact(self._artifact if artifact is None else artifact, self.percent,
                                         description=self.text())
        except Exception as error:  # noqa: BLE001 - progress never fails the work
            _logger.warning("%s: progress artifact not updated (%s)", self.step, error)
            return False
        return True

    def _write_later(self) -> None:
        """A write put off by `_update_artifact`, in a timer's thread (the step's context): nothing if the
        step's task run has been retried since (its next attempt took the artifact over)."""
        run = _current_run()
        if run is not None and self._run is not None and run[2] != self._run[2]:
            return
        with self._lock:
            if self._timer is not None:
                self._timer = None
                self._write()

    def finish(self, detail: str | None = None) -> None:
        """The step is complete: when it ends before ``total`` (a training that converged), ``total`` is ``done``.

        Nothing more is reported if the last update already completed it.
        """
        if not self.finished or detail is not None:
            self(self.done, total=min(self.done, self.total), detail=detail)


def _publish(message: dict[str, Any]) -> None:
    """To the display of this process, else (on a Dask worker) to the scheduler's event log."""
    display = _display
    if display is not None:
        display.show(message)
        return
    from flows._dask import on_dask_worker

    if on_dask_worker():
        from distributed import get_worker

        try:
            get_worker().log_event(TOPIC, message)
        except Exception:  # noqa: BLE001 - a lost message costs one update of a bar
            _logger.debug("progress message not sent", exc_info=True)


class _WorkerLogHandler(logging.Handler):
    """On the ``sae`` logger of a worker process while a task is inside `worker_logs`: the records logged in
    such a task's context (its thread, and threads started with a copy of its context) go to the run's log
    through Prefect's API handler when the library's logger has none, and to the terminal display through
    the event topic; the records of other tasks are left alone."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        forwarding = _forwarding.get()
        if forwarding is None:
            return
        store, api = forwarding
        try:
            if api is not None:
                api.handle(record)
            _publish({"log": self.format(record), "origin": _origin(), "store": store})
        except Exception:  # noqa: BLE001 - a line that cannot be forwarded never fails the task
            self.handleError(record)


_WORKER_LOG_HANDLER = _WorkerLogHandler()


@contextmanager
def worker_logs(store: str | None = None) -> Iterator[None]:
    """Inside a task on a Dask worker: the ``sae`` library's INFO records of the task go to the run's log
    (UI) and to the terminal of the command that started the run; elsewhere, nothing changes.

    While a task of the process is inside, the library's logger has one forwarding handler and the level
    INFO (unless it was set to another level); both are given back when the last task leaves.
    """
    from flows._dask import on_dask_worker

    if not on_dask_worker():
        yield
        return
    from prefect.logging.handlers import APILogHandler

    library = logging.getLogger("sae")
    has_api = any(isinstance(handler, APILogHandler) for handler in library.handlers)
    with _library_lock:
        if _library["users"] == 0:
            _library["saved"] = library.level
            if library.level == logging.NOTSET:
                library.setLevel(logging.INFO)
            library.addHandler(_WORKER_LOG_HANDLER)
        _library["users"] += 1
    token = _forwarding.set((store, None if has_api or _run_logger() is None else APILogHandler()))
    try:
        yield
    finally:
        _forwarding.reset(token)
        with _library_lock:
            _library["users"] -= 1
            if _library["users"] == 0:
                library.removeHandler(_WORKER_LOG_HANDLER)
                library.setLevel(_library["saved"])


class TerminalDisplay:
    """Progress bars on a terminal, plain log lines elsewhere (see the module docstring).

    ``live`` defaults to whether ``stream`` is a terminal.  Only the messages
    of ``store`` are shown when it is given.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, store: str | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(self.stream.isatty()) if live is None else live
        self.store = store
        self.dashboard: str | None = None
        """The Dask dashboard's address (set by `terminal_display` with a cluster)."""
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._lines: dict[str, float] = {}
        self._consoles: list[tuple[Any, Any]] = []
        self.progress: Any = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                console=Console(file=self.stream, force_terminal=True), redirect_stdout=False, redirect_stderr=False,
            )

    def show(self, message: dict[str, Any], remote: bool = False) -> None:
        """Draw a progress message, or print a worker's log line (``remote``: it comes from a Dask worker)."""
        if self.store is not None and message.get("store") not in (None, self.store):
            return
        if "log" in message:
            if message.get("origin") != _origin():  # a worker in this process logs here itself
                self._print(message["log"])
            return
        if self.live:
            with self._lock:
                bar = self._bars.get(message["id"])
                if bar is None:
                    bar = self._bars[message["id"]] = self.progress.add_task(
                        message["step"], total=message["total"], unit=message["unit"], detail=message["detail"])
                self.progress.update(bar, completed=message["done"], total=message["total"],
                                     unit=message["unit"], detail=message["detail"])
            return
        if not remote:
            return  # the step's own log lines are on the terminal already
        now = time.monotonic()
        last = self._lines.get(message["id"])
        finished = message["done"] >= message["total"]
        if last is None or finished or now - last >= LINE_SECONDS:
            self._lines[message["id"]] = now
            detail = f" ({message['detail']})" if message["detail"] else ""
            _logger.info("%s: %d/%d %s%s", message["step"], message["done"], message["total"], message["unit"],
                         detail)

    def _print(self, line: str) -> None:
        if self.live:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    def __enter__(self) -> TerminalDisplay:
        global _display
        if self.live:
            self.progress.start()
            self._route_console_logs()
        _display = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _display
        _display = None
        if self.live:
            self.progress.stop()
            for handler, console in self._consoles:
                handler.console = console
                handler.removeFilter(_hide_progress_records)
            self._consoles.clear()

    def _route_console_logs(self) -> None:
        """Prefect's console log lines print above the bars, without the lines that repeat a bar."""
        from prefect.logging.handlers import PrefectConsoleHandler

        loggers = [logging.getLogger()] + [item for item in logging.Logger.manager.loggerDict.values()
                                           if isinstance(item, logging.Logger)]
        seen = set()
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, PrefectConsoleHandler) and id(handler) not in seen:
                    seen.add(id(handler))
                    self._consoles.append((handler, handler.console))
                    handler.console = self.progress.console
                    handler.addFilter(_hide_progress_records)


def _hide_progress_records(record: logging.LogRecord) -> bool:
    return not getattr(record, PROGRESS_RECORD, False)


@contextmanager
def terminal_display(address: str | None = None, *, store: str | None = None,
                     stream: TextIO | None = None) -> Iterator[TerminalDisplay]:
    """The display of a command for its duration; with a Dask ``address``, the workers' progress too.

    With a cluster, the address of its dashboard is written first (and kept in
    ``display.dashboard``).  Yields the display.
    """
    display = TerminalDisplay(stream, store=store)
    client = None
    if address is not None:
        from distributed import Client

        client = Client(address, timeout=10, set_as_default=False)
        client.subscribe_topic(TOPIC, lambda event: display.show(event[1], remote=True))
        display.dashboard = client.dashboard_link
        print(f"Dask dashboard: {display.dashboard}", file=display.stream, flush=True)
    try:
        with display:
            yield display
    finally:
        if client is not None:
            client.unsubscribe_topic(TOPIC)
            client.close()
