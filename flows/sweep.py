"""Hyper-parameter sweeps as one flow: the pipeline at every point of a grid, with a table and plots.

`sweep_flow` runs the pipeline for every point of the grid of
`sae.sweep.sweep_points`, each stage **once per distinct configuration**: the
points' stage keys (`sae.store.keys.stage_keys`) are grouped (`sae.stages.sweep_plan`), so

1. the ingestion (the CQT of every clip) runs once, as in ``sae run``;
2. ``preprocess`` and ``graph`` tasks (`flows.graph`) run once per distinct
   preprocessing / graph configuration, the graph only for points with
   ``lambda_g > 0``;
3. ``train`` tasks (`flows.train`) run once per distinct model, several at a
   time on a Dask cluster (``parallel``; they share its workers), one at a time
   on local threads;
4. the classification (`flows.classify.submit_classification`) of the
   baseline and the codes runs once per distinct model and classifier setting.

Steps 2-4 run in the sub-flow `sweep_stages_flow`, whose task runner is the
cluster's (``config.cluster``, else ``$SAE_DASK_ADDRESS``: a
``prefect_dask.DaskTaskRunner``), also when the sweep runs from a deployment.
A stage already complete in the store (from an earlier run or sweep) is
reused.  The flow then writes (`sae.stages.sweep_rows`, `sae.stages.write_sweep_outputs`),
beside the store in ``<store>-reports/``:
``sweep-<key>.csv`` (one row per point, `sae.sweep.point_row`),
``sweep-<key>-metrics.png`` (each metric against the first swept parameter),
``sweep-<key>-atoms.png`` (the learned dictionaries), ``sweep-<key>-convergence.png``
(the objective terms against the outer iteration) and ``sweep-<key>.md`` (the table
and the figures); the rows also go to the store (``sweep/<key>``, attribute
``rows``), and the table (rounded, `sae.report.summary_rows`) and the report (figures inline)
are published as Prefect artifacts.  Runs are named ``sweep-<parameters>``
(``sweep-lambda_g``).  The flows are defined here, in an importable module, so
that the Dask workers that run their tasks can import them too (the deployment's
entrypoint is ``flows.sweep:sweep_flow``)::

    from flows.sweep import sweep_flow
    from sae.config import PipelineConfig

    summary = sweep_flow(PipelineConfig(ingest={"store": "sae.zarr"}),
                         {"lambda_g": [0, 10, 100], "balance_lambdas": [False, True]})
    print(summary["table"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from flows._dask import StoppableTaskRunner
from flows._runs import run_namer, stage_tags
from flows.classify import submit_classification
from flows.graph import graph_task, preprocess_task
from flows.pipeline import (
    check_frames,
    dask_address,
    make_task_runner,
    resolve_paths,
    run_ingest_stage,
    show_library_logs,
)
from flows.train import train_task
from sae import store as sae_store
from sae.config import PipelineConfig
from sae.report import inline_images, summary_rows, sweep_table
from sae.stages.results import brief, check_folds
from sae.stages.sweep import SweepPlan, sweep_plan, sweep_rows, write_sweep_outputs
from sae.store.keys import sweep_key
from sae.sweep import resolve_parameter, sweep_grid, sweep_points


def _parameter_names(parameters: dict[str, Any]) -> str:
    """The swept fields of a sweep's ``parameters`` argument: ``lambda_g`` or ``lambda_d-lambda_g``."""
    return "-".join(resolve_parameter(name).rsplit(".", 1)[-1] for name in parameters)


@flow(name="sweep-stages", flow_run_name=run_namer("sweep-stages", lambda p: _parameter_names(p["parameters"])),
      task_runner=StoppableTaskRunner(max_workers=8))
def sweep_stages_flow(config: PipelineConfig, parameters: dict[str, list[Any]], parallel: int) -> dict[str, Any]:
    """Steps 2-4 of the module docstring for the points of a sweep whose ingestion is complete.

    Submits the work of `sae.stages.sweep_plan`, in its order, on the task
    runner it is given (`sweep_flow` passes the cluster's); ``config`` has
    absolute paths.  Returns ``computed`` (stage -> keys computed here) and
    ``results`` (results key -> feature set -> accuracy_mean, accuracy_std,
    chance, n_scores).
    """
    plan = sweep_plan(sweep_points(config, parameters))
    store = config.ingest.store
    computed: dict[str, list[str]] = {"preprocess": [], "graph": [], "model": [], "results": []}

    # preprocessing and graphs, once per distinct configuration
    for pre_key, preprocess in plan.preprocess.items():
        if not preprocess_task.submit(store, preprocess).result()["skipped"]:
            computed["preprocess"].append(pre_key)
    for graph_key, graph in plan.graphs.items():
        if not graph_task.submit(store, graph.preprocess_key, graph.config).result()["skipped"]:
            computed["graph"].append(graph_key)

    # trainings, once per distinct model, `parallel` at a time
    for wave in plan.model_waves(parallel):
        futures = {model_key: train_task.submit(store, model.preprocess_key, model.graph_key, model.train)
                   for model_key, model in wave}
        for model_key, future in futures.items():
            if not future.result()["skipped"]:
                computed["model"].append(model_key)

    # classification of the baseline and the codes, once per distinct model and classifier
    results: dict[str, dict[str, Any]] = {}
    for results_key, classification in plan.classifications.items():
        _, reused, summaries = submit_classification(store, classification.preprocess_key, classification.features,
                                                     classification.config)
        results[results_key] = brief(summaries)
        if not reused:
            computed["results"].append(results_key)
    return {"computed": computed, "results": results}


@flow(name="sweep", flow_run_name=run_namer("sweep", lambda p: _parameter_names(p["parameters"])),
      task_runner=StoppableTaskRunner(max_workers=1))
def sweep_flow(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen model
    parameters: dict[str, list[Any]] = {"train.model.balance_lambdas": [False, True]},  # noqa: B006 - never mutated
    parallel: int | None = None,
) -> dict[str, Any]:
    """Run the pipeline at every point of the grid over ``parameters``; a table, a CSV and plots.

    The stages run on ``config.cluster``'s Dask scheduler (else
    ``$SAE_DASK_ADDRESS``, else local threads), as in `flows.pipeline.pipeline_flow`.

    Parameters
    ----------
    config : PipelineConfig
        The base configuration (store, data, every stage's settings, cluster).
    parameters : dict
        Parameter name or dotted path -> list of values; the grid is their
        product, the first parameter the x axis of the metric plot.
    parallel : int, optional
        Trainings at the same time; default: all on a Dask cluster, 1 on local threads.

    Returns
    -------
    dict
        ``key`` (of ``sweep/<key>``), ``store``, ``rows`` (one dict per point,
        `sae.sweep.point_row`), ``table`` (markdown), ``computed`` (stage ->
        keys computed by this run, not reused), the paths ``csv``, ``markdown``,
        ``metrics_png``, ``atoms_png``, ``convergence_png``, and ``cluster``.
    """
    log = get_run_logger()
    show_library_logs()
    check_frames(config)
    config = resolve_paths(config)
    address = dask_address(config)
    plan = sweep_plan(sweep_points(config, parameters))
    points = plan.points
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel!r}")
    key = sweep_key(config, sweep_grid(parameters))
    paths = list(points[0].values)
    store = config.ingest.store
    log.info("sweep %s: %d points over %s, on %s", key, len(points), ", ".join(paths), address or "local threads")

    with sae_store.store_lock(store):  # one run writes a store at a time
        ingest = run_ingest_stage(points[0].config, address)  # shared by every point
        # before any training, once per distinct classifier setting (a sweep may vary the protocol)
        for classify in dict.fromkeys(c.config for c in plan.classifications.values()):
            check_folds(store, classify)
        stages = sweep_stages_flow
        if address is not None:
            stages = stages.with_options(task_runner=make_task_runner(address))
        with stage_tags("sweep"):
            out = stages(config=config, parameters=parameters,
                         parallel=parallel or (len(points) if address is not None else 1))
        computed = {"ingest": [] if ingest["skipped"] else [ingest["key"]], **out["computed"]}
        return _sweep_outputs(log, config, parameters, plan, key, out["results"], computed, address)


def _sweep_outputs(log: Any, config: PipelineConfig, parameters: dict[str, list[Any]], plan: SweepPlan, key: str,
                   results: dict[str, Any], computed: dict[str, list[str]], address: str | None) -> dict[str, Any]:
    """The rows of a sweep whose stages are complete, its files and artifacts; the summary of `sweep_flow`."""
    paths = list(plan.points[0].values)
    store = config.ingest.store
    swept = sweep_rows(plan, results, log=log)
    files = write_sweep_outputs(config, parameters, key, paths, swept)
    rows = swept.rows
    table = sweep_table(rows, paths)
    log.info("sweep %s (%s):\n%s", key, files["csv"], table)
    if FlowRunContext.get() is not None:
        create_table_artifact(
            sae_store.json_safe(summary_rows(rows, paths)),
            key=f"sweep-{key}", description=f"Sweep over {', '.join(paths)} on {store}: one row per point "
            f"(every column in {files['csv']})",
        )
        report = Path(files["markdown"])
        create_markdown_artifact(
            inline_images(report.read_text(), report.parent), key=f"sweep-{key}-report",
            description=f"Sweep over {', '.join(paths)} on {store}",
        )
    return {"key": key, "store": store, "cluster": address, "rows": rows, "table": table, "computed": computed,
            **files}


def run_sweep(config: PipelineConfig, parameters: dict[str, list[Any]], parallel: int | None = None) -> dict[str, Any]:
    """Run `sweep_flow` (a plain call: local Prefect, or the server of ``PREFECT_API_URL``)."""
    return sweep_flow(config=config, parameters=parameters, parallel=parallel)
