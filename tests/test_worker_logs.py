"""The ``sae`` library's log lines of tasks on Dask worker processes: in the run's log and on the terminal."""

from __future__ import annotations

import io
import logging
import time

from distributed import LocalCluster

from flows._dask import LOOPBACK


def test_the_library_log_lines_of_a_task_on_a_dask_worker_reach_the_run_log_and_the_terminal(prefect_harness):
    """A task on a worker process: its thread's ``sae`` INFO lines go to the UI's log (of that task run) and to the
    command's terminal; the lines of the worker's other threads do not, and the worker's logger is given back.

    (In a module of its own: an in-process cluster's default client, as other modules' fixtures hold, would run
    the task in this process, where the library's own handlers print its lines.)"""
    import threading

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect_dask import DaskTaskRunner

    from flows._progress import terminal_display, worker_logs

    @task
    def work() -> tuple[int, int]:
        library = logging.getLogger("sae.distributed.trainer")
        with worker_logs("/a.zarr"):
            library.info("halo: %d rows", 1234)
            other = threading.Thread(target=library.info, args=("from another thread",))
            other.start()
            other.join()
            library.debug("below the level")
        library.info("after the task")
        return logging.getLogger("sae").level, len(logging.getLogger("sae").handlers)

    @flow(name="worker-logs")
    def run() -> tuple[str, tuple[int, int]]:
        from prefect.runtime import flow_run

        return flow_run.id, work.submit().result()

    stream = io.StringIO()
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", **LOOPBACK) as cluster:
        with terminal_display(cluster.scheduler_address, stream=stream, store="/a.zarr"):
            run_id, (level, n_handlers) = run.with_options(
                task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
            time.sleep(1.0)  # the scheduler's events reach the display's client
    assert (level, n_handlers) == (logging.NOTSET, 0)  # the worker's library logger as it was
    printed = stream.getvalue()
    assert "INFO    | sae.distributed.trainer - halo: 1234 rows" in printed, printed
    assert "another thread" not in printed and "below the level" not in printed and "after the task" not in printed
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            mine = [log for log in logs if log.name == "sae.distributed.trainer"]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert [log.message for log in mine] == ["halo: 1234 rows"]
    assert mine[0].task_run_id is not None and mine[0].level == logging.INFO
