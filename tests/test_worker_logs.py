"""The ``sae`` library's log lines of tasks on Dask worker processes: in the run's log and on the terminal."""

from __future__ import annotations

import io
import logging
import time

import pytest
from distributed import LocalCluster

from flows._dask import LOOPBACK


@pytest.mark.parametrize("extra_loggers", ["", "sae"])
def test_the_library_log_lines_of_a_task_on_a_dask_worker_reach_the_run_log_and_the_terminal(
        prefect_harness, monkeypatch, extra_loggers):
    """A task on a worker process: its ``sae`` INFO lines (and those of a thread it starts with its context) go to
    the UI's log of that task run and to the command's terminal, once each, whether or not the workers' Prefect
    forwards the library's logger itself (``PREFECT_LOGGING_EXTRA_LOGGERS``); the lines of another task on the
    same worker do not, and the worker's library logger is given back as it was.

    (In a module of its own: an in-process cluster's default client, as other modules' fixtures hold, would run
    the task in this process, where the library's own handlers print its lines.)"""
    import contextvars
    import threading

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect_dask import DaskTaskRunner

    from flows._progress import _WorkerLogHandler, terminal_display, worker_logs

    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", extra_loggers)  # the worker processes inherit it

    def elsewhere() -> None:
        logging.getLogger("sae.knn").info("from another task")

    def state() -> tuple[int, list[str]]:
        library = logging.getLogger("sae")
        return library.level, sorted(type(handler).__name__ for handler in library.handlers)

    @task
    def work() -> tuple[tuple, tuple, bool]:
        from distributed import get_client as dask_client

        library = logging.getLogger("sae.distributed.trainer")
        before = state()
        with worker_logs("/a.zarr"):
            inside = any(isinstance(h, _WorkerLogHandler) for h in logging.getLogger("sae").handlers)
            library.info("halo: %d rows", 1234)
            thread = threading.Thread(target=contextvars.copy_context().run, args=(library.info, "from its thread"))
            thread.start()
            thread.join()
            dask_client().submit(elsewhere, pure=False).result()  # on the worker's other thread
            library.debug("below the level")
        library.info("after the task")
        return before, state(), inside

    @flow(name="worker-logs")
    def run() -> tuple[str, tuple]:
        from prefect.runtime import flow_run

        return flow_run.id, work.submit().result()

    stream = io.StringIO()
    with LocalCluster(n_workers=1, threads_per_worker=2, host="127.0.0.1", **LOOPBACK) as cluster:
        with terminal_display(cluster.scheduler_address, stream=stream, store="/a.zarr"):
            run_id, (before, after, inside) = run.with_options(
                task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
            deadline = time.monotonic() + 20  # the scheduler's events reach the display's client
            while "from its thread" not in stream.getvalue() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # anything that should not come has had time to
    assert inside and after == before  # the worker's library logger as it was, forwarding handler gone
    printed = stream.getvalue()
    assert printed.count("INFO    | sae.distributed.trainer - halo: 1234 rows") == 1, printed
    assert printed.count("INFO    | sae.distributed.trainer - from its thread") == 1, printed
    for absent in ("another task", "below the level", "after the task"):
        assert absent not in printed, printed
    with get_client(sync_client=True) as client:
        def read() -> list:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [log for log in logs if log.name.startswith("sae.")]

        deadline = time.monotonic() + 20
        while len(read()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3.0)  # a duplicate, if any, comes with the next batch (Prefect sends every 2 s)
        mine = read()
    assert sorted(log.message for log in mine) == ["from its thread", "halo: 1234 rows"], mine
    assert all(log.task_run_id is not None and log.level == logging.INFO for log in mine)


def test_two_steps_at_once_on_one_worker_each_end_at_100_percent(prefect_harness):
    """Two tasks run at once on one worker process: the first to end must not stop the other's progress (their
    runs' Prefect client can be one, which the first closes as it ends: every later write of the other failed)."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect_dask import DaskTaskRunner

    from flows._dask import cluster_client
    from flows._progress import ARTIFACT_SECONDS, Progress

    @task
    def step(name: str, seconds: float) -> None:
        progress = Progress(f"train {name}", 2, "outer iterations")
        with cluster_client():  # as the training: the worker's thread is freed for the other task
            progress(1)
            time.sleep(seconds)  # the short step has ended meanwhile
            progress(2)

    @flow(name="two-steps")
    def run() -> str:
        from prefect.runtime import flow_run

        futures = [step.submit("short", 0.0), step.submit("long", 3 + ARTIFACT_SECONDS)]
        for future in futures:
            future.result()
        return flow_run.id

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", **LOOPBACK) as cluster:
        run_id = run.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    assert sorted((a.key, float(a.data)) for a in found if a.type == "progress") == [
        ("progress-train-long", 100.0), ("progress-train-short", 100.0)]


def test_a_step_whose_run_is_gone_stops_at_its_next_check_and_a_wanted_one_goes_on(tmp_path):
    """`run_gone_check` on a real worker: a task that secedes (as the training, graph and classification steps do)
    goes on while its future is held, and stops at its next check once its client lets go of it."""
    from distributed import Client, secede

    from flows._dask import RunGone, checked, run_gone_check

    class Parts:  # what `checked` reports to besides the check: a flows._progress.Progress's unit and call
        unit = "parts"

        def __call__(self, done: int, total: int) -> None:
            pass

    def step(name: str, parts: int) -> str:  # says how it ended in a file (the task runs on a copy of this function)
        check = run_gone_check(f"step {name}")
        secede()
        progress = checked(Parts(), check)
        try:
            for done in range(parts):
                progress(done, parts)
                time.sleep(0.02)
        except RunGone as error:
            (tmp_path / name).write_text(str(error))
            raise
        (tmp_path / name).write_text("ran to its end")
        return name

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, **LOOPBACK) as cluster, \
            Client(cluster) as client:
        wanted = client.submit(step, "wanted", 100, pure=False)
        dropped = client.submit(step, "dropped", 3000, pure=False)
        deadline = time.monotonic() + 30
        tasks = cluster.workers[0].state.tasks  # read from this thread: plain look-ups only
        while any(getattr(tasks.get(f.key), "state", None) != "long-running" for f in (wanted, dropped)):  # seceded
            assert time.monotonic() < deadline
            time.sleep(0.05)
        del dropped  # its client lets go of it, as when the command that submitted it is gone
        assert wanted.result(timeout=60) == "wanted"
        while not (tmp_path / "dropped").exists():
            assert time.monotonic() < deadline, "the dropped step did not stop"
            time.sleep(0.05)
    assert (tmp_path / "wanted").read_text() == "ran to its end"
    said = (tmp_path / "dropped").read_text()
    assert said.startswith("step dropped: the run that started it is gone") and " of 3000 parts" in said
