"""Shared test set-up: offline Prefect settings, seeded generators, markers, an in-process Dask cluster."""

import os

# Prefect must never contact anything but 127.0.0.1 in tests.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (on 127.0.0.1, its own database) for the whole test session.

    Started through the guard of `flows._server` (as the ``sae`` commands start theirs), so that it stops with
    the test process however that ends: Prefect's `prefect_test_harness` leaves its server running, reparented
    to init, when the test process is killed.
    """
    from flows._server import prefect_api

    database = tmp_path_factory.mktemp("prefect") / "prefect-test.db"
    saved = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")}
    os.environ.pop("PREFECT_API_URL", None)  # always the session's own server
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"  # for the guard's server
    try:
        with prefect_api(timeout=60):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def task_run_messages():
    """The messages of Prefect's task run loggers during the test (a list, filled as they log).

    A handler on the run logger itself: independent of propagation and of stderr capture.
    """
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collect = Collect()
    run_logger = logging.getLogger("prefect.task_runs")
    run_logger.addHandler(collect)
    try:
        yield collect.messages
    finally:
        run_logger.removeHandler(collect)


@pytest.fixture(autouse=True)
def _restore_dask_config():
    """Give every test the dask configuration it started with.

    A distributed ``Client`` sets ``scheduler="dask.distributed"`` globally; one
    closed from another thread (e.g. by a Prefect task on a Dask worker) can
    leave that setting behind, and the next plain ``dask.compute`` then fails
    with "no Client active".
    """
    import copy

    import dask
    import distributed  # noqa: F401 - its defaults join dask's configuration at import: snapshot them too

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


@pytest.fixture(scope="module")
def thread_client():
    """A Dask cluster of 2 single-threaded in-process workers (one per test module) and its client.

    In-process workers talk over the inproc:// transport: no network address at all.
    """
    from distributed import Client, LocalCluster

    from flows._dask import LOOPBACK

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **LOOPBACK) as cluster, \
            Client(cluster) as client:
        yield client
