"""Progress: the callbacks of `sae.progress` (kNN blocks, cross-validation splits), the Prefect progress
artifacts and the terminal display of `flows._progress`."""

from __future__ import annotations

import io
import logging
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from flows._dask import LOOPBACK
from flows._progress import ARTIFACT_SECONDS, PROGRESS_RECORD, TOPIC, Progress, TerminalDisplay, artifact_key
from sae.classify import cross_validate
from sae.config import ClassifyConfig
from sae.knn import approximate_neighbors, exact_neighbors
from sae.pooling import aggregate_clips
from sae.progress import compute


class Calls(list):
    """A progress callback that records its calls."""

    def __call__(self, done: int, total: int) -> None:
        self.append((done, total))


def check_calls(calls: Calls, total: int) -> None:
    """Starts at (0, total), counts every part once, ends at (total, total)."""
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == list(range(total + 1))
    assert {t for _, t in calls} == {total}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **LOOPBACK) as cluster, \
            Client(cluster) as client:
        yield client


def test_compute_reports_each_object_locally_and_on_a_cluster(client):
    objects = [dask.delayed(sum)([i, i]) for i in range(5)]
    expected = dask.compute(*objects, scheduler="threads")
    with dask.config.set(scheduler="threads"):
        calls = Calls()
        assert compute(*objects, progress=calls) == expected
        check_calls(calls, 5)
    with dask.config.set(scheduler=client.get):  # what a task on a worker does through get_dask_client
        calls = Calls()
        assert compute(*objects, progress=calls) == expected
        check_calls(calls, 5)


def test_the_knn_search_reports_every_step_with_the_same_result(rng, client):
    """Exact search: B^2 tiles and B merges; approximate: B builds, B own lists, B (B - 1) folds; locally and on
    a cluster, the same neighbours as without progress."""
    X = rng.random((90, 4)).astype(np.float32)
    B = 3  # ceil(90 / 40)
    for search, options in ((exact_neighbors, {}), (approximate_neighbors, {"n_neighbors_build": 5})):
        reference = search(X, 3, block_size=40, **options)
        for scheduler in ("threads", client.get):
            calls = Calls()
            with dask.config.set(scheduler=scheduler):
                found = search(X, 3, block_size=40, progress=calls, **options)
            check_calls(calls, B * (B + 1))
            np.testing.assert_array_equal(found[0], reference[0])
            np.testing.assert_array_equal(found[1], reference[1])


def test_compute_counts_intermediate_parts_and_releases_them(client):
    """``parts``: every intermediate counted once; the outputs' values unchanged; nothing left on the cluster."""
    first = [dask.delayed(abs)(-i) for i in range(4)]
    second = [dask.delayed(sum)([a, 1]) for a in first]
    with dask.config.set(scheduler=client.get):
        calls = Calls()
        assert compute(*second, progress=calls, parts=first + second) == (1, 2, 3, 4)
    check_calls(calls, 8)
    assert not any(key in client.futures for key in [d.key for d in first + second])


def test_cross_validation_reports_its_splits_serially_and_on_a_cluster(rng, client):
    frames = rng.random((60, 3)) + np.repeat(np.eye(3), 20, axis=0)
    features = aggregate_clips(frames, np.repeat(np.arange(6), 10), clip_labels=np.array([0, 1, 2, 0, 1, 2]),
                               n_windows=2)
    config = ClassifyConfig(n_windows=2, n_splits=2, n_repeats=2, classifier="ridge")
    serial, parallel = Calls(), Calls()
    assert cross_validate(features, config, progress=serial) == cross_validate(features, config, client=client,
                                                                               progress=parallel)
    check_calls(serial, 4)
    check_calls(parallel, 4)


def test_artifact_keys_are_what_prefect_accepts():
    for step in ("ingest", "knn", "train 0123456789ab", "classify sae_inductive_exact", "classify Baseline"):
        key = artifact_key(step)
        assert key.startswith("progress-") and all(c.islower() or c.isdigit() or c == "-" for c in key), key


def test_a_step_in_a_flow_run_is_a_progress_artifact_at_100_percent_when_it_ends(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="progress-check")
    def steps() -> list[str]:
        ingest = Progress("ingest", 12, "clips", log_seconds=0.0)
        for done in (4, 8, 12):
            ingest(done, detail=f"batch {done // 4 - 1}")
        train = Progress("train 0123456789ab", 10, "outer iterations")
        for outer in (1, 2, 3):
            train(outer, detail="objective 1.2e+04")
        train.finish("converged")  # before max_outer
        knn = Progress("knn", None, "blocks")  # the total comes with the first call
        knn(0, 3)
        knn(1, 3)
        knn(2, 3)  # stops here: written ARTIFACT_SECONDS after the previous write at the latest
        time.sleep(ARTIFACT_SECONDS + 1)
        return [str(p._artifact) for p in (ingest, train, knn)]

    ids = steps()
    with get_client(sync_client=True) as client:
        artifacts = {str(a.id): a for a in client.read_artifacts() if a.type == "progress"}
    ingest, train, knn = (artifacts[i] for i in ids)
    assert (ingest.key, float(ingest.data), ingest.description) == ("progress-ingest", 100.0,
                                                                    "ingest: 12/12 clips (batch 2)")
    assert (float(train.data), train.description) == (100.0, "train 0123456789ab: 3/3 outer iterations (converged)")
    assert float(knn.data) == pytest.approx(100 * 2 / 3) and knn.description == "knn: 2/3 blocks"


def test_an_artifact_whose_creation_fails_once_is_created_by_a_later_update(prefect_harness, monkeypatch):
    """One failed request (a busy API) does not lose the step's artifact: the next update creates it."""
    import prefect.artifacts
    from prefect import flow
    from prefect.client.orchestration import get_client

    create = prefect.artifacts.create_progress_artifact
    calls = []

    def busy_once(*args, **kwargs):
        calls.append(kwargs["key"])
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return create(*args, **kwargs)

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", busy_once)

    @flow(name="progress-retry")
    def steps() -> list[str]:
        first = Progress("classify sae", None, "splits")
        first(0, 4)  # the creation fails here
        first(1, 4)  # too soon to try again
        assert first._artifact is None
        first(4, 4)  # the last update tries at once
        second = Progress("classify baseline", 4, "splits")
        second(4)
        return [str(first._artifact), str(second._artifact)]

    ids = steps()
    assert calls == ["progress-classify-sae"] * 2 + ["progress-classify-baseline"]
    with get_client(sync_client=True) as client:
        artifacts = {str(a.id): a for a in client.read_artifacts() if a.type == "progress"}
    assert [(artifacts[i].key, float(artifacts[i].data), artifacts[i].description) for i in ids] == [
        ("progress-classify-sae", 100.0, "classify sae: 4/4 splits"),
        ("progress-classify-baseline", 100.0, "classify baseline: 4/4 splits")]


def _progress_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return sorted(((a.key, float(a.data), a.description) for a in found if a.type == "progress"))


def test_a_retried_task_run_leaves_one_artifact_per_step_at_its_last_state(prefect_harness):
    """The first attempt stops half-way; the retry takes over its artifact instead of adding a second one."""
    from prefect import flow, task
    from prefect.context import FlowRunContext

    attempts = []

    @task(retries=1, retry_delay_seconds=0)
    def train() -> None:
        step = Progress("train 0123456789ab", 4, "outer iterations")
        step(2)
        attempts.append(step._artifact)
        if len(attempts) == 1:
            raise RuntimeError("worker lost")
        step(4)

    @flow(name="progress-task-retry")
    def run() -> str:
        train()
        time.sleep(1.5 * ARTIFACT_SECONDS)  # the first attempt's write put off to then is not made
        return str(FlowRunContext.get().flow_run.id)

    flow_run = run()
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    assert _progress_artifacts(flow_run) == [
        ("progress-train-0123456789ab", 100.0, "train 0123456789ab: 4/4 outer iterations")]


@pytest.mark.parametrize("fault", ["reply lost", "request repeated", "last write lost"])
def test_requests_that_fail_or_repeat_leave_one_state_the_last(prefect_harness, monkeypatch, fault):
    """What an API under load does to a step's requests: the server creates the artifact but the reply is lost
    (the client raises), the client repeats a creation the server had done (two artifacts), the last update
    fails once. The run ends with the step's last state on every artifact of its key, one where one was asked."""
    import prefect.artifacts
    from prefect import flow
    from prefect.context import FlowRunContext

    create, update = prefect.artifacts.create_progress_artifact, prefect.artifacts.update_progress_artifact
    faults = []

    def faulty_create(*args, **kwargs):
        made = create(*args, **kwargs)
        if fault == "request repeated" and not faults:
            faults.append(made)
            return create(*args, **kwargs)
        if fault == "reply lost" and not faults:
            faults.append(made)
            raise RuntimeError("ReadTimeout")
        return made

    def faulty_update(artifact, progress, **kwargs):
        if fault == "last write lost" and progress == 100.0 and not faults:
            faults.append(artifact)
            raise RuntimeError("database is locked")
        return update(artifact, progress, **kwargs)

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", faulty_create)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", faulty_update)

    @flow(name="progress-faults")
    def run() -> str:
        step = Progress("classify sae", None, "splits")
        step(0, 4)
        time.sleep(ARTIFACT_SECONDS)
        for done in (1, 2, 3, 4):
            step(done)
        return str(FlowRunContext.get().flow_run.id)

    flow_run = run()
    assert len(faults) == 1, "the fault did not happen"
    expected = ("progress-classify-sae", 100.0, "classify sae: 4/4 splits")
    assert _progress_artifacts(flow_run) == [expected] * (2 if fault == "request repeated" else 1)


def test_a_step_outside_runs_only_feeds_the_display():
    stream = io.StringIO()
    with TerminalDisplay(stream, live=True) as display:
        step = Progress("knn", 3, "blocks")
        step(3)
        assert step._artifact is None
    assert len(display._bars) == 1
    assert "knn" in stream.getvalue() and "3/3" in stream.getvalue()


def test_off_a_terminal_only_the_steps_of_dask_workers_print_lines(caplog):
    display = TerminalDisplay(io.StringIO(), store="/a.zarr")
    assert not display.live
    message = {"id": "x", "step": "knn", "done": 1, "total": 3, "unit": "blocks", "detail": "", "store": "/a.zarr"}
    with caplog.at_level(logging.INFO, logger="sae.progress"):
        display.show(message)  # a local step: its own log lines say it
        display.show(message, remote=True)
        display.show({**message, "done": 2}, remote=True)  # within LINE_SECONDS: not repeated
        display.show({**message, "done": 3}, remote=True)  # the last is always shown
        display.show({**message, "store": "/other.zarr"}, remote=True)  # another command's run
    assert [record.getMessage() for record in caplog.records] == ["knn: 1/3 blocks", "knn: 3/3 blocks"]


def test_on_a_terminal_prefect_log_lines_print_above_the_bars_without_those_the_bars_repeat():
    from prefect.logging.handlers import PrefectConsoleHandler

    handler = PrefectConsoleHandler(stream=io.StringIO())
    logger = logging.getLogger("sae.test-display")
    logger.addHandler(handler)
    logger.propagate = False
    stream = io.StringIO()
    try:
        with TerminalDisplay(stream, live=True):
            logger.warning("a line of log")
            logger.warning("knn: 1/3 blocks", extra={PROGRESS_RECORD: True})
        assert handler.stream.getvalue() == ""  # everything went through the display's console
        assert "a line of log" in stream.getvalue() and "knn: 1/3 blocks" not in stream.getvalue()
        logger.warning("after")
        assert "after" in handler.stream.getvalue()  # the handler is given back
    finally:
        logger.removeHandler(handler)


def test_steps_on_dask_workers_send_their_progress_to_the_scheduler(client):
    def work() -> None:
        step = Progress("classify sae", 2, "splits", store="/a.zarr")
        step(1)
        step(2)

    client.submit(work, pure=False).result()
    messages = [message for _, message in client.get_events(TOPIC)]
    assert [(m["step"], m["done"], m["total"], m["store"]) for m in messages] == [
        ("classify sae", 0, 2, "/a.zarr"), ("classify sae", 1, 2, "/a.zarr"), ("classify sae", 2, 2, "/a.zarr")]


def test_a_flow_run_stopped_by_a_signal_stops_the_tasks_of_its_threads():
    """SIGTERM or Ctrl-C in a flow run: Prefect's thread-pool runner joins its running tasks' threads before the
    command can end; StoppableTaskRunner first sets the event that run_gone_check's checks read off a Dask
    worker, so a training or a classification stops at its next check instead of running to its end."""
    import threading

    from flows._dask import STOPPING, RunGone, StoppableTaskRunner, run_gone_check

    started, stopped = threading.Event(), []

    def work():
        check = run_gone_check("the work")
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                check("part 7")
            except RunGone as error:
                stopped.append((str(error), time.monotonic()))
                return
            time.sleep(0.01)

    runner = StoppableTaskRunner(max_workers=1)
    with pytest.raises(KeyboardInterrupt):
        with runner:
            worker = threading.Thread(target=work)  # as the runner's own thread would run the task
            worker.start()
            assert started.wait(10) and not STOPPING.is_set()
            raise KeyboardInterrupt
    worker.join(10)
    assert stopped and "the work: the command was stopped, so it stopped at part 7" in stopped[0][0]
    with StoppableTaskRunner(max_workers=1):  # a new flow run clears it
        assert not STOPPING.is_set()
        run_gone_check("other work")("part 1")
    with pytest.raises(ValueError):  # an ordinary failure does not stop the other tasks
        with StoppableTaskRunner(max_workers=1):
            raise ValueError("a task failed")
    assert not STOPPING.is_set()


def test_every_flow_of_the_project_runs_its_local_tasks_on_the_stoppable_runner():
    """A flow on Prefect's plain thread-pool runner would keep a stopped command alive until its running task
    ends (a graph stage measured 200 s after a SIGTERM; 2.7 s with the stoppable runner)."""
    import importlib
    import pkgutil

    import flows
    from prefect import Flow

    from flows._dask import StoppableTaskRunner

    found = {}
    for module_info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{module_info.name}")
        found.update({f"{module.__name__}.{name}": value for name, value in vars(module).items()
                      if isinstance(value, Flow) and value.__module__ == module.__name__})
    assert len(found) >= 10, sorted(found)
    assert {name: type(each.task_runner).__name__ for name, each in found.items()
            if not isinstance(each.task_runner, StoppableTaskRunner)} == {}


def test_task_runners_of_several_threads_run_blas_on_one_thread_while_they_run():
    """Tasks on several threads of one process make the parallelism, as on Dask's worker processes: BLAS on one
    thread while the runner runs (`sae encode` on two threads: 49-54 s -> 38 s), lifted after, also when a task
    fails; a runner of one thread leaves it alone."""
    from flows._dask import StoppableTaskRunner
    from sae.blas import blas_threads

    before = blas_threads()
    if before == [1]:
        pytest.skip("BLAS runs on one thread in this process already (OPENBLAS_NUM_THREADS=1?)")
    with StoppableTaskRunner(max_workers=2):
        several = blas_threads()
    with StoppableTaskRunner(max_workers=1):
        alone = blas_threads()
    assert several == [1] and alone == before and blas_threads() == before
    with pytest.raises(ValueError):
        with StoppableTaskRunner(max_workers=2):
            raise ValueError("a task failed")
    assert blas_threads() == before
    runner = StoppableTaskRunner(max_workers=2).duplicate()  # what a flow run enters
    with runner:
        assert blas_threads() == [1]
    assert blas_threads() == before
