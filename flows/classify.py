"""The classification flow: cross-validated genre classification of per-frame features in a store.

Coarse Prefect tasks, each calling `sae` functions and returning metadata only:

- one ``classify-features`` task per feature set: stream the per-frame features
  (scaled CQT frames of ``preprocess/<key>`` for the baseline, codes of
  ``model/<key>``, ...) into window vectors per clip (`sae.classify.aggregate_clips`),
  then cross-validate them (`sae.classify.cross_validate`), one plain Dask task per
  split on the cluster of a ``DaskTaskRunner`` (``prefect_dask.get_dask_client()``,
  the vectors scattered once), serially otherwise; the splits done are a progress
  artifact of the task run (`flows._progress`);
- with protocol "inductive", one ``classify-inductive`` task that fits the
  auto-encoder per fold on the training clips' frames (`sae.classify.inductive_cross_validate`);
- the flow writes the summaries to ``results/<key>`` of the store, renders a markdown
  report and its figure (`sae.report`) beside the store, and publishes the report,
  figure inline, as a Prefect artifact.

A complete ``results/<key>`` (same store, sources and configuration) is reused.

Feature sources are ``"<stage>/<key>"`` or ``"<stage>/<key>/<array>"``; the default
array is ``X`` in ``preprocess`` groups and ``codes`` elsewhere.  Their rows must be
the rows of ``preprocess/<preprocess_key>``, whose ``clip_index`` maps rows to clips::

    from sae.config import ClassifyConfig
    from flows.classify import classify_flow

    classify_flow("gtzan.zarr", "1fae41a142a7",
                  {"baseline": "preprocess/1fae41a142a7", "sae": "model/0c2d9e1b7a55"},
                  ClassifyConfig())
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows._dask import cluster_client
from flows._progress import Progress
from flows._runs import run_namer
from sae import store as sae_store
from sae.classify import aggregate_clips, aggregate_options, cross_validate, inductive_cross_validate
from sae.config import ClassifyConfig
from sae.report import classification_report, inline_images, plot_results, report_folder

STAGE = "results"
DEFAULT_ARRAYS = {"preprocess": "X"}
"""Array read from a source group of a stage when the source names none (else ``codes``)."""


INDUCTIVE_FIELDS = ("model", "graph", "encode_methods")
"""Fields of `sae.config.ClassifyConfig` that only the "inductive" protocol reads."""


def feature_key(preprocess_key: str, source: str, config: ClassifyConfig) -> str:
    """Key of ``results/<key>`` for one feature source: what its classification depends on.

    The baseline's key does not depend on the model it is shown beside, so every
    model trained on the same preprocessed frames (a sweep's points) reuses it.
    The settings of the inductive protocol count only when it runs
    (``classify.model`` follows ``train.model`` in a pipeline: a longer training
    keeps the key of a grouped classification).
    """
    exclude = set() if config.protocol == "inductive" else set(INDUCTIVE_FIELDS)
    blob = json.dumps(
        {"preprocess": preprocess_key, "source": source, "config": config.model_dump(mode="json", exclude=exclude)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


INDUCTIVE_SOURCE = "inductive"
"""Source name of the inductive protocol's results (models fitted per fold on ``preprocess/<key>``)."""


def feature_keys(preprocess_key: str, features: dict[str, str], config: ClassifyConfig) -> dict[str, str]:
    """``results/<key>`` of every feature set (name -> key), plus the inductive protocol's when it is chosen."""
    keys = {name: feature_key(preprocess_key, source, config) for name, source in features.items()}
    if config.protocol == "inductive":
        keys[INDUCTIVE_SOURCE] = feature_key(preprocess_key, INDUCTIVE_SOURCE, config)
    return keys


def results_key(preprocess_key: str, features: dict[str, str], config: ClassifyConfig) -> str:
    """Key of the combined ``results/<key>`` (the table of all feature sets): a digest of their keys."""
    blob = json.dumps(feature_keys(preprocess_key, features, config), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def results_current(store: str, key: str) -> bool:
    """Whether ``results/<key>`` is complete and was computed with the clip groups the store holds now.

    Groups (the manifest's ``group`` column) decide the grouped folds; a store
    whose groups changed since (a resumed ingestion of an edited manifest)
    needs the classification again.
    """
    if not sae_store.is_complete(store, STAGE, key):
        return False
    recorded = sae_store.stage_group(store, STAGE, key, mode="r").attrs.get("groups")
    return recorded == sae_store.groups_digest(sae_store.open_store(store))


def read_summaries(store: str, key: str) -> dict[str, dict[str, Any]]:
    """The summaries (feature set -> summary) of a complete ``results/<key>``."""
    return dict(sae_store.stage_group(store, STAGE, key, mode="r").attrs["summaries"])


def parse_source(source: str) -> tuple[str, str, str]:
    """``"<stage>/<key>[/<array>]"`` -> (stage, key, array).

    >>> parse_source("preprocess/abc"), parse_source("model/def/codes_final")
    (('preprocess', 'abc', 'X'), ('model', 'def', 'codes_final'))
    """
    parts = source.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"a feature source must read '<stage>/<key>' or '<stage>/<key>/<array>', got {source!r}")
    stage, key = parts[:2]
    return stage, key, parts[2] if len(parts) == 3 else DEFAULT_ARRAYS.get(stage, "codes")


def open_rows(store: str, preprocess_key: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Row->clip mapping of the preprocessed frames, label index and group (int) of every clip, label names."""
    from sae.preprocess import open_preprocessed

    group = open_preprocessed(store, preprocess_key)
    root = sae_store.open_store(store)
    return (group["clip_index"][:], sae_store.clip_table(root)["label_index"], sae_store.store_labels(root),
            sae_store.clip_group_index(root))


def open_source(store: str, source: str) -> Any:
    """The (n_rows, d) Zarr array of a complete feature source (read lazily, by chunks).

    ``model/<key>`` (array ``codes``) is the last checkpoint of a training run
    (`sae.distributed.open_model`); any other source is the named array of
    its stage group.
    """
    stage, key, array = parse_source(source)
    if stage == "model" and array == "codes":
        from sae.distributed import open_model

        state = open_model(store, key)
        if not state["complete"]:
            raise ValueError(f"feature source {source!r} is not complete: finish its training first")
        return state["codes"]
    group = sae_store.stage_group(store, stage, key, mode="r")
    if group.attrs.get("complete") is not True:
        raise ValueError(f"feature source {source!r} is not complete: run its stage first")
    if array not in group:
        raise KeyError(f"feature source {source!r}: group {stage}/{key} has no array {array!r}")
    return group[array]


def _write_feature_results(group: Any, features: Any, summary: dict[str, Any]) -> None:
    for array_name, values in (
        ("vectors", features.vectors.astype(np.float32)),
        ("labels", features.labels),
        ("groups", features.groups),
        ("scores", np.asarray(summary["scores"])),
    ):
        sae_store.create_array(group, array_name, shape=values.shape, dtype=values.dtype, data=values, overwrite=True)


def _new_results_group(store: str, key: str, record: dict[str, Any]) -> Any:
    root = sae_store.open_store(store, mode="r+")
    group = sae_store.stage_group(root, STAGE, key, config=record, mode="w")
    group.attrs["groups"] = sae_store.groups_digest(root)
    return group


def _complete(store: str, group: Any, summaries: dict[str, dict[str, Any]], sources: list[str]) -> None:
    root = sae_store.open_store(store, mode="r+")
    group.attrs.update({"summaries": sae_store.json_safe(summaries)})
    sae_store.mark_complete(group, inputs=[root[path] for path in sorted(set(sources))])


def _source_group(preprocess_key: str, source: str) -> str:
    return "/".join(parse_source(source)[:2]) if source != INDUCTIVE_SOURCE else f"preprocess/{preprocess_key}"


def classify_features(
    store: str, preprocess_key: str, name: str, source: str, config: ClassifyConfig, key: str
) -> dict[str, Any]:
    """Aggregate one feature source and cross-validate it; writes and completes ``results/<key>``."""
    row_clips, clip_labels, class_names, clip_groups = open_rows(store, preprocess_key)
    array = open_source(store, source)
    if array.shape[0] != row_clips.shape[0]:
        raise ValueError(
            f"feature source {source!r} has {array.shape[0]} rows, but preprocess/{preprocess_key} "
            f"has {row_clips.shape[0]}: the features must be computed from those frames"
        )
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "source": source,
                                            "classify": config.model_dump(mode="json")})
    features = aggregate_clips(array, row_clips, clip_labels=clip_labels, **aggregate_options(config))
    progress = Progress(f"classify {name}", None, "splits", store=store, log_seconds=10.0)
    with cluster_client() as client:
        summary = cross_validate(features, config, client=client, clip_groups=clip_groups, progress=progress)
    summary.update(source=source, class_names=[class_names[k] for k in summary["classes"]])
    _write_feature_results(group, features, summary)
    _complete(store, group, {name: summary}, [f"preprocess/{preprocess_key}", _source_group(preprocess_key, source)])
    return summary


def classify_inductive(store: str, preprocess_key: str, config: ClassifyConfig, key: str) -> dict[str, dict]:
    """The inductive protocol on ``preprocess/<preprocess_key>``'s frames; one summary per encoding method."""
    from sae.preprocess import open_preprocessed

    row_clips, clip_labels, class_names, clip_groups = open_rows(store, preprocess_key)
    frames = open_preprocessed(store, preprocess_key)["X"]
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "source": INDUCTIVE_SOURCE,
                                            "classify": config.model_dump(mode="json")})
    progress = Progress("classify inductive", None, "folds", store=store, log_seconds=10.0)
    with cluster_client() as client:
        results = inductive_cross_validate(frames, row_clips, clip_labels, config, client=client,
                                           clip_groups=clip_groups, progress=progress)
    out = {}
    for method, summary in results.items():
        summary.update(source=f"preprocess/{preprocess_key}", class_names=[class_names[k] for k in summary["classes"]])
        out[f"sae_inductive_{method}"] = summary
    _complete(store, group, out, [f"preprocess/{preprocess_key}"])
    return out


@task(name="classify-features", cache_policy=NO_CACHE)
def classify_features_task(
    store: str, preprocess_key: str, name: str, source: str, config: ClassifyConfig, key: str
) -> dict[str, Any]:
    """`classify_features` as a Prefect task (returns the summary: scores, confusion, ...)."""
    return classify_features(store, preprocess_key, name, source, config, key)


@task(name="classify-inductive", cache_policy=NO_CACHE)
def classify_inductive_task(store: str, preprocess_key: str, config: ClassifyConfig, key: str) -> dict[str, dict]:
    """`classify_inductive` as a Prefect task."""
    return classify_inductive(store, preprocess_key, config, key)


def report_paths(store: str, key: str) -> tuple[Path, Path]:
    """Where the markdown and PNG of ``results/<key>`` are written: ``<store>-reports/`` beside the store."""
    folder = report_folder(store)
    return folder / f"classify-{key}.md", folder / f"classify-{key}.png"


def submit_classification(
    store: str, preprocess_key: str, features: dict[str, str], config: ClassifyConfig
) -> tuple[str, bool, dict[str, dict[str, Any]]]:
    """Inside a flow: the classification of ``features``, as tasks of the flow's task runner.

    Every feature set has its own ``results/<key>`` (`feature_key`), reused
    when current (`results_current`): the baseline of a preprocessing is
    classified once, whatever the models shown beside it.  The others are
    submitted as ``classify-features`` tasks (and ``classify-inductive`` for the
    inductive protocol); then the combined ``results/<key>`` (`results_key`)
    records the table.

    Returns
    -------
    key, reused, summaries
        The combined key, whether every feature set was reused, feature set -> summary.
    """
    for source in features.values():
        parse_source(source)
    key = results_key(preprocess_key, features, config)
    if results_current(store, key):
        return key, True, read_summaries(store, key)
    keys = feature_keys(preprocess_key, features, config)
    summaries: dict[str, dict[str, Any]] = {}
    futures = {}
    for name, feature in keys.items():
        if results_current(store, feature):
            found = read_summaries(store, feature)
            summaries.update(found if name == INDUCTIVE_SOURCE else {name: next(iter(found.values()))})
        elif name == INDUCTIVE_SOURCE:
            futures[name] = classify_inductive_task.submit(store, preprocess_key, config, feature)
        else:
            futures[name] = classify_features_task.submit(store, preprocess_key, name, features[name], config, feature)
    for name, future in futures.items():
        result = future.result()
        summaries.update(result if name == INDUCTIVE_SOURCE else {name: result})
    ordered = {name: summaries[name] for name in features} | {k: v for k, v in summaries.items() if k not in features}
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "features": keys,
                                            "classify": config.model_dump(mode="json")})
    # The sources too, not only the per-feature groups: a source that changed (a model trained further) makes
    # the table stale even before its own results group is looked at again.
    sources = [f"preprocess/{preprocess_key}", *(_source_group(preprocess_key, source) for source in features.values())]
    _complete(store, group, ordered, [*(f"results/{feature}" for feature in keys.values()), *sources])
    return key, not futures, ordered


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


def brief(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The headline numbers of summaries: accuracy_mean, accuracy_std, chance, n_scores."""
    return {
        name: {k: summary[k] for k in ("accuracy_mean", "accuracy_std", "chance", "n_scores")}
        for name, summary in summaries.items()
    }


def _results_key(parameters: dict[str, Any]) -> str:
    preprocess_key = parameters["preprocess_key"]
    features = parameters.get("features") or {"baseline": f"preprocess/{preprocess_key}"}
    return results_key(preprocess_key, features, ClassifyConfig.model_validate(parameters.get("config") or {}))


@flow(name="classify", flow_run_name=run_namer("classify", _results_key),
      task_runner=ThreadPoolTaskRunner(max_workers=2))
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
    features = dict(features or {"baseline": f"preprocess/{preprocess_key}"})
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
