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

The ``run_*_stage`` functions run one stage (with the same skipping) outside or
inside a flow; the ``sae`` command calls them, and `stage_flow` runs one of them
as a flow (the per-stage deployments of ``deploy/prefect.yaml``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows._runs import run_namer, stage_tags
from sae import store as sae_store
from sae.config import IngestConfig, PipelineConfig
from sae.report import accuracy_table, inline_images, pipeline_report

DASK_ADDRESS_VARIABLE = "SAE_DASK_ADDRESS"
"""Environment variable naming the Dask scheduler when ``config.cluster`` is None."""

INGEST_STAGE = "ingest"
"""Stage group recording a complete ingestion (its configuration and clip counts)."""

STAGES = ("ingest", "graph", "train", "classify")
"""The stages, in order."""

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
        _require_frames(config)
        if stage in ("train", "classify"):
            _require(store, "preprocess", keys["preprocess"], "graph")
            if config.train.model.lambda_g > 0:
                _require(store, "graph", keys["graph"], "graph")
        if stage == "classify" and not model_complete(store, keys["model"], config.train.model.max_outer):
            raise RuntimeError(f"store {store!r} has no complete model/{keys['model']}: run the train stage first")
    except RuntimeError as error:
        raise PreflightError(str(error)) from None


# --------------------------------------------------------------------------- stage keys and completeness


def ingest_key(config: IngestConfig) -> str:
    """Key of ``ingest/<key>``: what the frames depend on (data, CQT, chunking, built-in dataset).

    >>> ingest_key(IngestConfig(strict=True)) == ingest_key(IngestConfig(retries=0))
    True
    """
    return config.model_copy(update={"store": "", "strict": False, "retries": 0, "overwrite": False}).fingerprint()


def stage_keys(config: PipelineConfig) -> dict[str, str]:
    """The store keys of every stage's result for ``config`` (no store needed).

    Returns
    -------
    dict
        ``ingest``, ``preprocess``, ``graph``, ``model`` and ``results``.
    """
    from flows.classify import results_key
    from sae.distributed import model_key
    from sae.graph import graph_key
    from sae.preprocess import preprocess_key

    pre = preprocess_key(config.preprocess)
    graph = graph_key(pre, config.graph)
    model = model_key(config.train, pre, graph if config.train.model.lambda_g > 0 else None)
    return {
        "ingest": ingest_key(config.ingest),
        "preprocess": pre,
        "graph": graph,
        "model": model,
        "results": results_key(pre, feature_sources(pre, model), config.classify),
    }


def feature_sources(preprocess_key: str, model_key: str) -> dict[str, str]:
    """The feature sets classified: the scaled CQT frames (baseline) and the codes of the model."""
    return {"baseline": f"preprocess/{preprocess_key}", "sae": f"model/{model_key}"}


def _store_exists(store: str) -> bool:
    return Path(store).exists()


def ingest_complete(config: IngestConfig) -> bool:
    """Whether the store holds a complete ingestion for this configuration (no clip pending)."""
    if not _store_exists(config.store) or not sae_store.is_complete(config.store, INGEST_STAGE, ingest_key(config)):
        return False
    status = sae_store.clip_table(sae_store.open_store(config.store))["status"]
    return not bool((status == "pending").any())


def model_complete(store: str, key: str, max_outer: int) -> bool:
    """Whether ``model/<key>`` is complete: converged (rtol), or trained for at least ``max_outer`` iterations."""
    from sae.distributed import read_checkpoint

    if not sae_store.is_complete(store, "model", key):
        return False
    try:
        state = read_checkpoint(sae_store.stage_group(store, "model", key, mode="r"))
    except sae_store.StoreDamaged:
        return False
    return state is not None and (state["stop_reason"] == "rtol" or state["iteration"] >= max_outer)


def _named(clip_ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(clip_ids[:limit])
    return shown + (f" and {len(clip_ids) - limit} more" if len(clip_ids) > limit else "")


def repair_frames(store: str) -> dict[str, str]:
    """Find the ok clips of ``store`` whose frames are missing or damaged and queue them for re-ingestion.

    Returns
    -------
    dict
        clip_id -> what was found (empty when the frames are intact).
    """
    root = sae_store.open_store(store, mode="r+")
    problems = sae_store.frames_problems(root)
    if not problems:
        return {}
    clip_ids = sae_store.clip_table(root)["clip_id"]
    found = {str(clip_ids[i]): reason for i, reason in sorted(problems.items())}
    _logger().warning("store %s: the frames of %d clip(s) are missing or damaged (%s): %s; they are ingested "
                      "again", store, len(found), next(iter(found.values())), _named(list(found)))
    sae_store.mark_damaged(root, problems)
    return found


def check_ingestion(summary: dict[str, Any], strict: bool) -> None:
    """Report the labels without valid audio; with ``strict``, fail if any clip of the clip table is in error."""
    log = _logger()
    for label in summary.get("empty_labels", []):
        log.warning("label %r has no valid audio file: it is not a label of this dataset (not counted among the "
                    "labels, the chance level or the folds)", label)
    if strict and summary["counts"]["error"]:
        kinds = sorted({error["kind"] for error in summary["errors"]})
        raise RuntimeError(
            f"strict ingestion: {summary['counts']['error']} clip(s) in error (kinds: {', '.join(kinds)}): "
            f"{_named([error['clip_id'] for error in summary['errors']])}; see `sae verify --store {summary['store']}`"
        )


# --------------------------------------------------------------------------- the stages


def run_ingest_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """Ingestion, skipped when complete; with ``config.force`` the store is created anew.

    Clips whose frames are missing or damaged in the store are ingested again
    first (`repair_frames`); ``ingest.strict`` judges the clip table as it
    stands, whether or not ingestion ran.

    Returns
    -------
    dict
        ``skipped``, ``repaired`` (clip_id -> what was found) and the ingestion
        summary (``counts``, ``errors``, ``empty_labels``, ...).
    """
    from flows.ingest import ingest_flow

    log = _logger()
    ingest = config.ingest.model_copy(update={"overwrite": config.ingest.overwrite or config.force})
    key = ingest_key(ingest)
    with sae_store.store_lock(ingest.store):
        repaired = repair_frames(ingest.store) if not ingest.overwrite and _store_exists(ingest.store) else {}
        skipped = not ingest.overwrite and ingest_complete(ingest)
        if skipped:
            summary = sae_store.ingest_summary(sae_store.open_store(ingest.store))
            log.info("ingest: %s holds every clip (%s): skipped", ingest.store, summary["counts"])
        else:
            summary = _run_stage_flow("ingest", ingest_flow, address, config=ingest)
            group = sae_store.stage_group(ingest.store, INGEST_STAGE, key, config=ingest.model_dump(mode="json"),
                                          mode="w")
            group.attrs.update({"counts": summary["counts"]})
            sae_store.mark_complete(group)
    check_ingestion(summary, ingest.strict)
    return {"skipped": skipped, "key": key, "repaired": repaired, **summary}


def run_graph_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """Preprocessing and graph, skipped when both are complete and current; returns their keys and ``skipped``."""
    from flows.graph import graph_flow
    from sae.preprocess import preprocess_current

    log = _logger()
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        _require_frames(config)
        if preprocess_current(store, config.preprocess) and sae_store.is_complete(store, "graph", keys["graph"]):
            log.info("graph: preprocess/%s and graph/%s are complete: skipped", keys["preprocess"], keys["graph"])
            return {"skipped": True, "preprocess": {"key": keys["preprocess"]}, "graph": {"key": keys["graph"]}}
        out = _run_stage_flow("graph", graph_flow, address, store=store, preprocess=config.preprocess,
                              graph=config.graph)
    return {"skipped": False, **out}


def run_train_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """Training, skipped when ``model/<key>`` is complete for this ``max_outer``."""
    from flows.train import train_flow

    log = _logger()
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        _require(store, "preprocess", keys["preprocess"], "graph")
        graph = keys["graph"] if config.train.model.lambda_g > 0 else None
        if graph is not None:
            _require(store, "graph", graph, "graph")
        if model_complete(store, keys["model"], config.train.model.max_outer):
            log.info("train: model/%s is complete: skipped", keys["model"])
            return {"skipped": True, "key": keys["model"]}
        out = _run_stage_flow("train", train_flow, address, store=store, preprocess_key=keys["preprocess"],
                              train=config.train, graph_key=graph)
    return {**out, "skipped": False}


def run_classify_stage(config: PipelineConfig, address: str | None = None) -> dict[str, Any]:
    """Classification of the baseline and the codes, skipped when ``results/<key>`` is current and its report exists.

    Results are current when their inputs are unchanged: a model trained
    further under the same key (a larger ``max_outer``) makes them stale, and
    they are computed again.

    Returns
    -------
    dict
        ``skipped``, ``key``, ``results`` (feature set -> accuracy_mean,
        accuracy_std, chance, n_scores), ``markdown`` and ``png`` (paths).
    """
    from flows.classify import brief, classify_flow, read_summaries, report_paths, results_current

    log = _logger()
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        _require(store, "preprocess", keys["preprocess"], "graph")
        if not model_complete(store, keys["model"], config.train.model.max_outer):
            raise RuntimeError(f"store {store!r} has no complete model/{keys['model']}: run the train stage first")
        markdown, png = report_paths(store, keys["results"])
        if results_current(store, keys["results"]) and markdown.exists() and png.exists():
            summaries = read_summaries(store, keys["results"])
            log.info("classify: results/%s is complete: skipped", keys["results"])
            return {"skipped": True, "store": store, "key": keys["results"], "results": brief(summaries),
                    "markdown": str(markdown), "png": str(png)}
        out = _run_stage_flow(
            "classify", classify_flow, address, store=store, preprocess_key=keys["preprocess"],
            features=feature_sources(keys["preprocess"], keys["model"]), config=config.classify,
        )
    return {**out, "skipped": False}


def run_export_stage(config: PipelineConfig) -> dict[str, Any]:
    """The trained model as a model folder, ``<store>-models/<model key>`` (`sae.artifact.export_model`).

    Skipped when the folder is intact and was exported from the same model and
    classification (their versions in the store); exported again otherwise.

    Returns
    -------
    dict
        ``skipped`` and ``path``.
    """
    from sae.artifact import default_model_path, export_model, exported_source

    store, keys = config.ingest.store, stage_keys(config)
    path = default_model_path(store, keys["model"])
    root = sae_store.open_store(store)
    current = {
        "model_key": keys["model"],
        "model_version": sae_store.stage_group(root, "model", keys["model"], mode="r").attrs.get("version"),
        "results_key": keys["results"],
        "results_version": sae_store.stage_group(root, "results", keys["results"], mode="r").attrs.get("version"),
    }
    source = exported_source(path) or {}
    if all(source.get(name) == value for name, value in current.items()):
        _logger().info("export: %s is the model of model/%s and results/%s: skipped", path, keys["model"],
                       keys["results"])
        return {"skipped": True, "path": str(path)}
    export_model(store, path, model_key=keys["model"], results_key=keys["results"], overwrite=True)
    _logger().info("export: model/%s -> %s", keys["model"], path)
    return {"skipped": False, "path": str(path)}


def _require_frames(config: PipelineConfig) -> None:
    store = config.ingest.store
    status = sae_store.clip_table(sae_store.open_store(store))["status"] if _store_exists(store) else None
    if status is None or (status == "pending").any() or not (status == "ok").any():
        raise RuntimeError(f"store {store!r} holds no complete ingestion: run the ingest stage first")


def _require(store: str, stage: str, key: str, producer: str) -> None:
    if not _store_exists(store) or not sae_store.is_complete(store, stage, key):
        raise RuntimeError(f"store {store!r} has no complete {stage}/{key}: run the {producer} stage first")


# --------------------------------------------------------------------------- the flow


def _store_name(parameters: dict[str, Any]) -> str:
    return Path(PipelineConfig.model_validate(parameters.get("config") or {}).ingest.store).name


@flow(name="pipeline", flow_run_name=run_namer("pipeline", _store_name),
      task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=False)
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
        for stage, run in (("graph", run_graph_stage), ("train", run_train_stage)):
            skipped[stage] = run(config, address)["skipped"]
        out = run_classify_stage(config, address)
        exported = run_export_stage(config)
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
      task_runner=ThreadPoolTaskRunner(max_workers=1))
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
