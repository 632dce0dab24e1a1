"""The end-to-end pipeline: ingestion, preprocessing and graph, training, classification.

`pipeline_flow` chains the stage flows as sub-flows, passing them only the
store path, stage keys and typed configurations (`sae.config.PipelineConfig`):

1. ``ingest`` (`flows.ingest.ingest_flow`): audio -> ``frames`` and the clip table;
2. ``graph`` (`flows.graph.graph_flow`): ``preprocess/<key>`` and ``graph/<key>``;
3. ``train`` (`flows.train.train_flow`): ``model/<key>``;
4. ``classify`` (`flows.classify.classify_flow`): the baseline (scaled CQT) and the
   auto-encoder's codes, cross-validated, in ``results/<key>``, with a markdown
   report and a figure in ``<store>-reports/``;
5. ``export`` (`run_export_stage`): the trained model as a model folder
   ``<store>-models/<model key>`` (`sae.artifact`), for ``sae predict`` and ``sae encode``.

A stage whose complete result is already in the store for the same
configuration is skipped without starting its flow, so a re-run only computes
what changed; ``force`` creates the store anew and recomputes everything.

Where the tasks run: local threads by default; with a Dask scheduler address
(``config.cluster`` or the environment variable ``SAE_DASK_ADDRESS``) every
stage flow runs with ``prefect_dask.DaskTaskRunner(address=...)``::

    from flows.pipeline import pipeline_flow
    from sae.config import PipelineConfig

    summary = pipeline_flow(PipelineConfig(ingest={"data": "gtzan/genres", "store": "gtzan.zarr"},
                                           cluster="tcp://127.0.0.1:8786"))
    print(summary["table"])

The ``run_*_stage`` functions run one stage (with the same skipping: the plain
stage functions of `sae.stages`, given the stage's flow to run) outside or inside
a flow; the ``sae`` command calls them, and `stage_flow` runs one of them as a
flow (the per-stage deployments of ``deploy/prefect.yaml``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from flows._dask import StoppableTaskRunner
from flows._runs import run_namer, stage_tags
from sae import store as sae_store
from sae.config import PipelineConfig
from sae.report import accuracy_table, inline_images, pipeline_report
from sae.stages import classify_stage, export_stage, graph_stage, ingest_stage, train_stage
from sae.stages.inputs import require_frames
from sae.stages.results import check_folds
from sae.stages.train import require_model, train_inputs
from sae.store.keys import stage_keys

DASK_ADDRESS_VARIABLE = "SAE_DASK_ADDRESS"
"""Environment variable naming the Dask scheduler when ``config.cluster`` is None."""

_library_logger = logging.getLogger(__name__)


def show_library_logs() -> None:
    """Let the ``sae`` library's INFO records through (unless its level was set explicitly).

    Prefect forwards the loggers named in ``PREFECT_LOGGING_EXTRA_LOGGERS`` (``sae``
    in the deployments and the ``sae`` command) to the terminal and the UI, but
    leaves their level to the root logger's (WARNING).
    """
    library = logging.getLogger("sae")
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)


def _logger() -> Any:
    """The run logger inside a flow run (shown in the UI), else this module's logger."""
    return get_run_logger() if FlowRunContext.get() is not None else _library_logger


# --------------------------------------------------------------------------- configuration


def resolve_paths(config: PipelineConfig) -> PipelineConfig:
    """The configuration with absolute ``ingest.store`` and ``ingest.data``.

    Tasks may run on Dask workers started in another folder: they get absolute paths.
    """
    ingest = config.ingest
    update: dict[str, Any] = {"store": str(Path(ingest.store).expanduser().resolve())}
    if ingest.data is not None:
        update["data"] = str(Path(ingest.data).expanduser().resolve())
    return config.model_copy(update={"ingest": ingest.model_copy(update=update)})


def check_frames(config: PipelineConfig) -> None:
    """Fail before any work if ``preprocess.frames_per_clip`` exceeds the frames the CQT gives a clip."""
    from sae.audio import frames_per_clip

    available = frames_per_clip(config.ingest.cqt)
    wanted = config.preprocess.frames_per_clip
    if wanted is not None and wanted > available:
        raise ValueError(
            f"preprocess.frames_per_clip must be <= {available} (the frames of a clip of "
            f"ingest.cqt.clip_samples = {config.ingest.cqt.clip_samples}), got {wanted}"
        )


def dask_address(config: PipelineConfig) -> str | None:
    """The Dask scheduler the stages use: ``config.cluster``, else ``$SAE_DASK_ADDRESS``, else None (threads)."""
    return address_of(config.cluster)


def address_of(cluster: str | None) -> str | None:
    """The Dask scheduler named by a ``cluster`` setting: itself, None for "local", ``$SAE_DASK_ADDRESS`` for None."""
    if cluster == "local":
        return None
    if cluster is not None:
        return cluster
    return os.environ.get(DASK_ADDRESS_VARIABLE) or None


def make_task_runner(address: str | None) -> TaskRunner | None:
    """``DaskTaskRunner(address=address)``, or None (each stage flow's own threaded runner)."""
    if address is None:
        return None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def _run_stage_flow(stage: str, stage_flow: Any, address: str | None, **parameters: Any) -> Any:
    """Run a stage's flow on the Dask cluster at ``address`` (else its own threads), tagged with the stage."""
    runner = make_task_runner(address)
    runnable = stage_flow if runner is None else stage_flow.with_options(task_runner=runner)
    with stage_tags(stage):
        return runnable(**parameters)


class PreflightError(ValueError):
    """What a command needs is missing or unusable (checked before any work); the message says what to do."""


def check_cluster(address: str, timeout: float = 10.0) -> int:
    """Connect to the Dask scheduler at ``address``; returns its number of workers.

    Raises
    ------
    PreflightError
        Nothing answers there within ``timeout`` seconds.
    """
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError) as error:
        raise PreflightError(
            f"cannot reach the Dask scheduler at {address} ({type(error).__name__}: {error}); start a cluster "
            "(python deploy/cluster.py start) or run on local threads (--cluster local)"
        ) from None


def preflight(stage: str, config: PipelineConfig) -> None:
    """Check, before any work, what ``stage`` ("run", "sweep" or one stage) needs from ``config``.

    The kNN package of ``graph.method`` imports (faiss is optional, see
    `sae.knn.missing_backend`); the Dask scheduler (if any) answers; the store can be created or written
    (not a file, not read-only); for a single stage, its inputs are complete.

    Raises
    ------
    PreflightError
        With one message saying what is missing and how to get it.
    """
    check_frames(config)
    if stage in ("run", "sweep", "experiment", "graph"):
        from sae.knn import missing_backend

        missing = missing_backend(config.graph.method)
        if missing is not None:
            raise PreflightError(missing)
    address = dask_address(config)
    if address is not None:
        check_cluster(address)
    store = config.ingest.store
    try:
        if stage in ("run", "sweep", "experiment", "ingest"):
            sae_store.check_location(store)
            if Path(store).exists() and not config.force:
                sae_store.open_store(store)
            return
        sae_store.check_location(store, exists=True)
        sae_store.open_store(store)
    except (sae_store.StoreError, FileNotFoundError) as error:
        raise PreflightError(str(error)) from None
    keys = stage_keys(config)
    try:
        require_frames(store)
        if stage in ("train", "classify"):
            train_inputs(config)
        if stage == "classify":
            require_model(store, keys["model"], config.train.model.max_outer)
    except RuntimeError as error:
        raise PreflightError(str(error)) from None


# --------------------------------------------------------------------------- the stages


def run_ingest_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """`sae.stages.ingest_stage`, the ingestion running as `flows.ingest.ingest_flow` (on ``address``'s Dask if any).

    Returns
    -------
    dict
        ``skipped``, ``repaired`` (clip_id -> what was found) and the ingestion
        summary (``counts``, ``errors``, ``empty_labels``, ...).
    """
    from flows.ingest import ingest_flow

    return ingest_stage(config, functools.partial(_run_stage_flow, "ingest", ingest_flow, address), log=_logger())


def run_graph_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """`sae.stages.graph_stage`, running `flows.graph.graph_flow`; returns the keys and ``skipped``."""
    from flows.graph import graph_flow

    return graph_stage(config, functools.partial(_run_stage_flow, "graph", graph_flow, address), log=_logger())


def run_train_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """`sae.stages.train_stage`, running `flows.train.train_flow`: skipped when ``model/<key>`` is complete."""
    from flows.train import train_flow

    return train_stage(config, functools.partial(_run_stage_flow, "train", train_flow, address), log=_logger())


def run_classify_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """`sae.stages.classify_stage`, running `flows.classify.classify_flow`: skipped when current, report there.

    Returns
    -------
    dict
        ``skipped``, ``key``, ``results`` (feature set -> accuracy_mean,
        accuracy_std, chance, n_scores), ``markdown`` and ``png`` (paths).
    """
    from flows.classify import classify_flow

    return classify_stage(config, functools.partial(_run_stage_flow, "classify", classify_flow, address),
                          log=_logger())


def run_export_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """`sae.stages.export_stage`: the model folder ``<store>-models/<model key>``, logged in the flow run (the
    training clips encoded on the Dask cluster at ``address``, if any)."""
    return export_stage(config, address=address, log=_logger())


# --------------------------------------------------------------------------- the flow


def _store_name(parameters: dict[str, Any]) -> str:
    return Path(PipelineConfig.model_validate(parameters.get("config") or {}).ingest.store).name


@flow(name="pipeline", flow_run_name=run_namer("pipeline", _store_name),
      task_runner=StoppableTaskRunner(max_workers=1), log_prints=False)
def pipeline_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - frozen model
    """Ingest, preprocess and build the graph, train, classify, export the model; each stage skipped when complete.

    Parameters
    ----------
    config : PipelineConfig
        Every stage's configuration, the Dask address (``cluster``) and ``force``.

    Returns
    -------
    dict
        ``store`` (absolute path), ``keys`` (stage -> key in the store),
        ``skipped`` (stage -> bool), ``cluster`` (Dask address or None),
        ``results`` (feature set -> accuracy_mean, accuracy_std, chance,
        n_scores), ``table`` (markdown), ``markdown`` and ``png`` (report paths),
        ``model`` (the model folder, `run_export_stage`).
    """
    log = get_run_logger()
    show_library_logs()
    check_frames(config)
    config = resolve_paths(config)
    address = dask_address(config)
    log.info("pipeline on %s; tasks on %s", config.ingest.store, address or "local threads")
    skipped: dict[str, bool] = {}
    with sae_store.store_lock(config.ingest.store):  # one run writes a store at a time
        ingest = run_ingest_stage(config, address)
        skipped["ingest"] = ingest["skipped"]
        check_folds(config.ingest.store, config.classify)
        for stage, run in (("graph", run_graph_stage), ("train", run_train_stage)):
            skipped[stage] = run(config, address)["skipped"]
        out = run_classify_stage(config, address)
        exported = run_export_stage(config, address)
    skipped["classify"] = out["skipped"]
    skipped["export"] = exported["skipped"]
    table = accuracy_table(out["results"])
    log.info("report: %s", out["markdown"])
    if FlowRunContext.get() is not None:
        figure = Path(out["png"])
        create_markdown_artifact(
            inline_images(pipeline_report(config.ingest.store, out["results"], figure), figure.parent),
            key="pipeline-summary", description=f"Accuracies of the pipeline on {config.ingest.store}",
        )
    return {
        "store": config.ingest.store,
        "keys": stage_keys(config),
        "skipped": skipped,
        "repaired": ingest["repaired"],
        "ingest_errors": ingest["counts"]["error"],
        "cluster": address,
        "results": out["results"],
        "table": table,
        "markdown": out["markdown"],
        "png": out["png"],
        "model": exported["path"],
    }


def _stage_name(parameters: dict[str, Any]) -> str:
    return f"{parameters['stage']}-{_store_name(parameters)}"


@flow(name="pipeline-stage", flow_run_name=run_namer("stage", _stage_name),
      task_runner=StoppableTaskRunner(max_workers=1))
def stage_flow(
    stage: Literal["ingest", "graph", "train", "classify"],
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen model
) -> dict[str, Any]:
    """One stage of the pipeline for ``config`` (skipped when complete), on ``config.cluster``'s Dask if any.

    The stage keys come from the configuration, so a stage is run with the same
    parameters as the whole pipeline; the stages it reads must be complete.
    """
    runners = {"ingest": run_ingest_stage, "graph": run_graph_stage, "train": run_train_stage,
               "classify": run_classify_stage}
    if stage not in runners:
        raise ValueError(f"stage must be one of {tuple(runners)}, got {stage!r}")
    show_library_logs()
    config = resolve_paths(config)
    address = dask_address(config)
    get_run_logger().info("%s stage on %s; tasks on %s", stage, config.ingest.store, address or "local threads")
    out = runners[stage](config, address)
    return {"stage": stage, "store": config.ingest.store, **out}


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run `pipeline_flow` (a plain call: local Prefect, or the server of ``PREFECT_API_URL``)."""
    return pipeline_flow(config)
