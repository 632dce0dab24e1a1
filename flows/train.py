"""The training flow: the structured auto-encoder fitted on a store's preprocessed frames.

One coarse Prefect task, ``train``, calls `sae.distributed.train_model`: the
Z step as per-block Dask tasks, the D and E steps from reduced statistics, a
checkpoint in ``model/<key>`` after every outer iteration.  A retry (or a
rerun of the flow) resumes from the last checkpoint, so ``retries=1`` costs at
most one outer iteration; a training that does not fit in the workers' memory
(`sae.distributed.budget`) is not retried.  The task logs one line per outer iteration
(objective terms, relative change, sparsity, time) with ``get_run_logger`` and
updates a progress artifact (outer iterations, with the objective and the
inner iterations of the last one: `flows._progress`), so the progress shows
in the Prefect UI.  The flow then writes a report of the model beside the
store (`publish_model`: the convergence of every objective term and the
learned atoms) and publishes it, figures included, as an artifact.

Where the Dask work runs: on the cluster of a ``DaskTaskRunner``
(``flows._dask.cluster_client``; the task secedes from its worker thread
while it waits, so the thread is free for the training tasks), otherwise on
an in-process ``distributed.LocalCluster`` of threads::

    from prefect_dask import DaskTaskRunner
    from sae.config import ModelConfig, TrainConfig
    from flows.train import run_train_flow

    run_train_flow("gtzan.zarr", "<preprocess key>",
                   TrainConfig(model=ModelConfig(n_atoms=512, lambda_g=100, max_outer=15)),
                   graph_key="<graph key>",
                   task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1}))
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from flows._dask import StoppableTaskRunner, blas_for_local_tasks, dask_client, not_gone, run_gone_check
from flows._progress import Progress, worker_logs
from flows._runs import run_namer
from sae.blas import blas_threads_text
from sae.config import TrainConfig
from sae.distributed import open_model, train_model
from sae.distributed.budget import TrainingDoesNotFit
from sae.report import inline_images, model_report, plot_atoms, plot_convergence
from sae.store.keys import model_key, model_report_paths


def _log_record(logger: Any, record: dict[str, Any]) -> None:
    terms = ", ".join(
        f"{name} {record[name]:.5g} (x w = {record[name + '_weighted']:.5g})"
        for name in ("reconstruction", "sparsity", "graph", "encoder")
        if record[name + "_weighted"] or name == "reconstruction"
    )
    logger.info(
        "outer %d: objective %.6g, relative change %.2e, non-zeros %.2f%%, inner Z/D/E %d/%d/%d, %.1f s; %s",
        record["iteration"], record["total"], record["relative_change"], record["sparsity_percent"],
        record["inner_codes"], record["inner_dictionary"], record["inner_encoder"], record["seconds"], terms,
    )


def _progress_detail(record: dict[str, Any]) -> str:
    return (f"objective {record['total']:.4g}, rel. change {record['relative_change']:.1e}, "
            f"inner Z/D/E {record['inner_codes']}/{record['inner_dictionary']}/{record['inner_encoder']}")


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry the training (it resumes from its last checkpoint) unless it stopped because it does not fit in the
    workers' memory (that would stop again) or because the run that started it is gone."""
    return not isinstance(state.data, TrainingDoesNotFit) and not_gone(task, task_run, state)


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=worth_retrying)
def train_task(store: str, preprocess_key: str, graph_key: str | None, train: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or skip when complete) and return the run's metadata, never arrays."""
    logger = get_run_logger()
    key = model_key(train, preprocess_key, graph_key)
    progress = Progress(f"train {key}", train.model.max_outer, "outer iterations", store=store)

    def report(record: dict[str, Any]) -> None:
        _log_record(logger, record)
        progress(record["iteration"], detail=_progress_detail(record))

    gone = run_gone_check(f"the training of model/{key}")
    with worker_logs(store), dask_client() as client:
        address = client.scheduler.address
        blas = f"; {blas_threads_text()}" if address.startswith("inproc://") else ""  # this process's BLAS
        logger.info("training on %s (%d workers%s)", address, len(client.scheduler_info()["workers"]), blas)
        out = train_model(store, preprocess_key, train, client=client, graph_key=graph_key, callback=report,
                          interrupt=gone)
    if out["skipped"]:
        progress(out["n_iter"], total=out["n_iter"], detail="trained before")
    else:
        progress.finish(f"objective {out['objective']:.4g}, stopped: {out['stop_reason']}")
    return out


def publish_model(store: str, key: str) -> dict[str, str]:
    """Write the report of a trained model beside the store; in a flow run, publish it (figures inline) as an artifact.

    Returns the paths ``markdown``, ``convergence_png`` and ``atoms_png``.
    """
    model = open_model(store, key)
    paths = model_report_paths(store, key)
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    plot_convergence({key: model["history"]}, paths["convergence_png"])
    plot_atoms({key: model["components"]}, paths["atoms_png"])
    markdown = model_report(key, store, model, convergence_png=paths["convergence_png"].name,
                            atoms_png=paths["atoms_png"].name)
    paths["markdown"].write_text(markdown)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(inline_images(markdown, paths["markdown"].parent), key=f"model-{key}",
                                 description=f"Training of model/{key} in {store}")
    return {name: str(path) for name, path in paths.items()}


def _model_key(parameters: dict[str, Any]) -> str:
    train = TrainConfig.model_validate(parameters["train"])
    return model_key(train, parameters["preprocess_key"], parameters.get("graph_key"))


def blas_for_training(store: str, preprocess_key: str, train: TrainConfig) -> AbstractContextManager[None]:
    """BLAS on one thread while a training of several blocks runs on local threads (`blas_for_local_tasks`).

    Without a cluster the training runs on an in-process cluster of every core (`flows._dask.dask_client`),
    two blocks at once on two cores, whose workers share this process's BLAS: each block's products would
    spread over both cores while the other block's did the same (a Z-step iteration on the development set
    5.2-5.5 s -> 2.9 s with the limit).  One block (the built-in data) keeps both cores for its products.
    """
    from sae.preprocess import open_preprocessed

    return blas_for_local_tasks(lambda: open_preprocessed(store, preprocess_key)["X"].shape[0] > train.block_size)


@flow(name="train", flow_run_name=run_namer("train", _model_key), task_runner=StoppableTaskRunner(max_workers=1))
def train_flow(store: str, preprocess_key: str, train: TrainConfig, graph_key: str | None = None) -> dict[str, Any]:
    """Train the structured auto-encoder on ``preprocess/<preprocess_key>`` of ``store``.

    ``graph_key`` names ``graph/<graph_key>`` (see ``flows.graph``), needed
    when ``train.model.lambda_g > 0``.

    Returns
    -------
    dict
        ``key`` (of ``model/<key>``), ``n_iter``, ``stop_reason``,
        ``resumed_from``, ``objective``, ``sparsity_percent``, ``seconds``,
        ``skipped``, and ``report`` (the paths of `publish_model`).
    """
    logger = get_run_logger()
    with blas_for_training(store, preprocess_key, train):
        out = train_task.submit(store, preprocess_key, graph_key, train).result()
    logger.info(
        "model %s: %d outer iterations (%s%s), objective %.6g, non-zeros %.2f%%",
        out["key"], out["n_iter"], out["stop_reason"],
        f", resumed from {out['resumed_from']}" if out["resumed_from"] else "",
        out["objective"], out["sparsity_percent"],
    )
    return {**out, "report": publish_model(store, out["key"])}


def run_train_flow(
    store: str,
    preprocess_key: str,
    train: TrainConfig,
    *,
    graph_key: str | None = None,
    task_runner: TaskRunner | None = None,
) -> dict[str, Any]:
    """Run `train_flow` with a given task runner (default: local threads)."""
    runnable = train_flow if task_runner is None else train_flow.with_options(task_runner=task_runner)
    return runnable(store=store, preprocess_key=preprocess_key, train=train, graph_key=graph_key)
