"""The classification flow: cross-validated genre classification of per-frame features in a store.

Coarse Prefect tasks, each calling a function of `sae.stages.results` and returning
metadata only:

- one ``classify-features`` task per feature set: stream the per-frame features
  (scaled CQT frames of ``preprocess/<key>`` for the baseline, codes of
  ``model/<key>``, ...) into window vectors per clip (`sae.pooling.aggregate_clips`),
  then cross-validate them (`sae.classify.cross_validate`), one plain Dask task per
  split on the cluster of a ``DaskTaskRunner`` (``flows._dask.cluster_client``,
  the vectors scattered once), serially otherwise; the splits done are a progress
  artifact of the task run (`flows._progress`);
- with protocol "inductive", one ``classify-inductive`` task that fits the
  auto-encoder per fold on the training clips' frames (`sae.inductive.inductive_cross_validate`);
- the flow writes the summaries to ``results/<key>`` of the store
  (`sae.stages.results.classify_sources`), renders a markdown report and its figure
  (`sae.report`) beside the store, and publishes the report, figure inline, as a
  Prefect artifact.

A complete ``results/<key>`` (same store, sources and configuration) is reused.

Feature sources are ``"<stage>/<key>"`` or ``"<stage>/<key>/<array>"``
(`sae.store.keys.parse_source`); their rows must be the rows of
``preprocess/<preprocess_key>``, whose ``clip_index`` maps rows to clips::

    from sae.config import ClassifyConfig
    from flows.classify import classify_flow

    classify_flow("gtzan.zarr", "1fae41a142a7",
                  {"baseline": "preprocess/1fae41a142a7", "sae": "model/0c2d9e1b7a55"},
                  ClassifyConfig())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner

from flows._dask import StoppableTaskRunner, checked, cluster_client, run_gone_check
from flows._progress import Progress, worker_logs
from flows._runs import run_namer
from sae.config import ClassifyConfig
from sae.report import classification_report, inline_images, plot_results
from sae.stages.results import brief, classify_features, classify_inductive, classify_sources
from sae.store.keys import PREPROCESS, group_name, report_paths, results_key


@task(name="classify-features", cache_policy=NO_CACHE)
def classify_features_task(
    store: str, preprocess_key: str, name: str, source: str, config: ClassifyConfig, key: str
) -> dict[str, Any]:
    """`sae.stages.results.classify_features` as a Prefect task (returns the summary: scores, confusion, ...)."""
    progress = Progress(f"classify {name}", None, "splits", store=store, log_seconds=10.0)
    gone = run_gone_check(f"the classification of {name}")
    with worker_logs(store), cluster_client() as client:
        return classify_features(store, preprocess_key, name, source, config, key, client=client,
                                 progress=checked(progress, gone), interrupt=gone)


@task(name="classify-inductive", cache_policy=NO_CACHE)
def classify_inductive_task(store: str, preprocess_key: str, config: ClassifyConfig, key: str) -> dict[str, dict]:
    """`sae.stages.results.classify_inductive` as a Prefect task."""
    progress = Progress("classify inductive", None, "folds", store=store, log_seconds=10.0)
    gone = run_gone_check("the inductive classification")
    with worker_logs(store), cluster_client() as client:
        return classify_inductive(store, preprocess_key, config, key, client=client, progress=checked(progress, gone),
                                  interrupt=gone)


def submit_classification(
    store: str, preprocess_key: str, features: dict[str, str], config: ClassifyConfig
) -> tuple[str, bool, dict[str, dict[str, Any]]]:
    """Inside a flow: `sae.stages.results.classify_sources`, its feature sets as tasks of the flow's task runner.

    The feature sets not current are submitted as ``classify-features`` tasks
    (and ``classify-inductive`` for the inductive protocol).

    Returns
    -------
    key, reused, summaries
        The combined key, whether every feature set was reused, feature set -> summary.
    """
    return classify_sources(store, preprocess_key, features, config, submit_features=classify_features_task.submit,
                            submit_inductive=classify_inductive_task.submit)


def publish_results(
    store: str, key: str, summaries: dict[str, dict[str, Any]], title: str
) -> tuple[Path, Path]:
    """Write the markdown and PNG of ``results/<key>`` beside the store; publish them as an artifact in a flow run.

    The report links its figure by relative path; the artifact holds the figure itself.
    """
    markdown_path, png_path = report_paths(store, key)
    markdown = classification_report(summaries, title, png_path.name)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown)
    plot_results(summaries, png_path)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            inline_images(markdown, png_path.parent), key=f"classify-{key}",
            description=f"Classification results/{key} of {store}",
        )
    return markdown_path, png_path


def _results_key(parameters: dict[str, Any]) -> str:
    preprocess_key = parameters["preprocess_key"]
    features = parameters.get("features") or {"baseline": group_name(PREPROCESS, preprocess_key)}
    return results_key(preprocess_key, features, ClassifyConfig.model_validate(parameters.get("config") or {}))


@flow(name="classify", flow_run_name=run_namer("classify", _results_key),
      task_runner=StoppableTaskRunner(max_workers=2))
def classify_flow(
    store: str,
    preprocess_key: str,
    features: dict[str, str] | None = None,
    config: ClassifyConfig = ClassifyConfig(),  # noqa: B008 - frozen pydantic model
) -> dict[str, Any]:
    """Cross-validated genre classification of feature sets of a store.

    Parameters
    ----------
    store : str
        Path of the store.
    preprocess_key : str
        Key of the preprocessed frames whose rows the features follow (their
        ``clip_index`` maps rows to clips); also the frames of the inductive protocol.
    features : dict of str to str, optional
        Feature set name -> source (module docstring).  Default: the baseline
        ``{"baseline": "preprocess/<preprocess_key>"}``.
    config : ClassifyConfig

    Returns
    -------
    dict
        ``store``, ``key`` (of ``results/<key>``), ``reused`` (bool), ``results``
        (feature set -> accuracy_mean, accuracy_std, chance, n_scores), ``markdown``
        and ``png`` (paths).
    """
    log = get_run_logger()
    features = dict(features or {"baseline": group_name(PREPROCESS, preprocess_key)})
    key, reused, summaries = submit_classification(store, preprocess_key, features, config)
    if reused:
        log.info("results/%s is complete: reused", key)
    for name, summary in summaries.items():
        log.info("%s: accuracy %.1f ± %.1f %% (chance %.1f %%, %d splits)", name, 100 * summary["accuracy_mean"],
                 100 * summary["accuracy_std"], 100 * summary["chance"], summary["n_scores"])
    markdown_path, png_path = publish_results(
        store, key, summaries, f"Genre classification ({config.protocol} protocol)"
    )
    return {"store": store, "key": key, "reused": reused, "results": brief(summaries),
            "markdown": str(markdown_path), "png": str(png_path)}


def run_classify(
    store: str,
    preprocess_key: str,
    features: dict[str, str] | None = None,
    config: ClassifyConfig | None = None,
    task_runner: TaskRunner | None = None,
) -> dict[str, Any]:
    """Run `classify_flow` with a given task runner (default: 2 threads, splits run serially)."""
    runnable = classify_flow if task_runner is None else classify_flow.with_options(task_runner=task_runner)
    return runnable(store=store, preprocess_key=preprocess_key, features=features, config=config or ClassifyConfig())
