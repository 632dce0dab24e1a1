"""The graph flow: preprocessed frames, then the kNN graph and its Laplacian, in a store.

Two coarse Prefect tasks, each calling one ``sae`` function and returning
metadata only:

1. ``preprocess`` -> `sae.preprocess.run_preprocess` (skipped when complete);
2. ``graph`` -> `sae.graph.run_graph`: blocked kNN as plain Dask tasks (or,
   with ``method="faiss"``, one faiss HNSW index in the task's own process,
   on all its cores), recall against exact search on a sample, W and L written as CSR (skipped when
   complete); the kNN search's progress in steps (builds, queries, merges) is a progress
   artifact of the task run (`flows._progress`).

Inside a task the Dask work goes to the cluster of a ``DaskTaskRunner``
(``flows._dask.cluster_client``, the task seceding from its worker thread
while it waits), otherwise to the local threaded scheduler::

    from prefect_dask import DaskTaskRunner
    from sae.config import GraphConfig, PreprocessConfig
    from flows.graph import run_graph_flow

    run_graph_flow("gtzan.zarr", PreprocessConfig(frames_per_clip=298), GraphConfig(),
                   task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1}))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from flows._dask import StoppableTaskRunner, blas_for_local_tasks, checked, cluster_client, not_gone, run_gone_check
from flows._progress import Progress, worker_logs
from flows._runs import run_namer
from sae.config import GraphConfig, PreprocessConfig
from sae.blas import blas_threads_text
from sae.graph import exact_tiles, run_graph
from sae.preprocess import run_preprocess
from sae.store.keys import graph_key, preprocess_key


@contextmanager
def dask_scheduler() -> Iterator[str]:
    """Route ``dask.compute`` to the cluster when running on a Dask worker, else to local threads."""
    with cluster_client() as client:
        if client is not None:
            yield f"distributed {client.scheduler.address}"
            return
    with dask.config.set(scheduler="threads"):
        yield "threads"


@task(name="preprocess", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=not_gone)
def preprocess_task(store: str, config: PreprocessConfig) -> dict[str, Any]:
    """Selected, scaled, noisy frames written once to ``preprocess/<key>``."""
    gone = run_gone_check("the preprocessing")
    with worker_logs(store), dask_scheduler():
        return run_preprocess(store, config, interrupt=gone)


@task(name="graph", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=not_gone)
def graph_task(store: str, preprocess_key: str, config: GraphConfig) -> dict[str, Any]:
    """kNN, recall, W and L written to ``graph/<key>``."""
    gone = run_gone_check("the graph")
    with worker_logs(store), dask_scheduler() as where:
        blas = f"; {blas_threads_text()}" if where == "threads" else ""
        get_run_logger().info("kNN (%s, %s) on %s%s", config.method, config.metric, where, blas)
        progress = Progress("knn", None, "steps", store=store, log_seconds=10.0)
        return run_graph(store, preprocess_key, config, progress=checked(progress, gone), interrupt=gone)


def _graph_key(parameters: dict[str, Any]) -> str:
    preprocess = PreprocessConfig.model_validate(parameters["preprocess"])
    return graph_key(preprocess_key(preprocess), GraphConfig.model_validate(parameters["graph"]))


@flow(name="graph", flow_run_name=run_namer("graph", _graph_key), task_runner=StoppableTaskRunner(max_workers=1))
def graph_flow(store: str, preprocess: PreprocessConfig, graph: GraphConfig) -> dict[str, Any]:
    """Preprocess the frames of ``store`` and build their graph; returns both stages' metadata.

    Returns
    -------
    dict
        ``store``, ``preprocess`` (key, n_rows, n_bins, skipped) and ``graph``
        (key, n_rows, nnz, recall, recall_queries, skipped).
    """
    logger = get_run_logger()
    pre = preprocess_task.submit(store, preprocess).result()
    logger.info("preprocess %s: %d x %d%s", pre["key"], pre["n_rows"], pre["n_bins"], " (already complete)" if pre["skipped"] else "")
    # exact tiles on Dask's local threads, several at once: BLAS on one thread each (the built-in data's exact
    # graph, 29,800 frames in blocks of 8,192: 7.7 -> 5.0 s in bench/bench_knn.py)
    with blas_for_local_tasks(lambda: exact_tiles(pre["n_rows"], graph) > 1):
        out = graph_task.submit(store, pre["key"], graph).result()
    if out["recall"] is not None:
        logger.info("graph %s: recall@%d = %.4f on %d sampled frames", out["key"], graph.n_neighbors, out["recall"], out["recall_queries"])
    logger.info("graph %s: N=%d, nnz(L)=%d%s", out["key"], out["n_rows"], out["nnz"], " (already complete)" if out["skipped"] else "")
    return {"store": store, "preprocess": pre, "graph": out}


def run_graph_flow(
    store: str, preprocess: PreprocessConfig, graph: GraphConfig, task_runner: TaskRunner | None = None
) -> dict[str, Any]:
    """Run `graph_flow` with a given task runner (default: local threads)."""
    runnable = graph_flow if task_runner is None else graph_flow.with_options(task_runner=task_runner)
    return runnable(store=store, preprocess=preprocess, graph=graph)
