"""The classification flow: cross-validated genre classification of per-frame features in a store.

Coarse Prefect tasks, each calling `sae` functions and returning metadata only:

- one ``classify-features`` task per feature set: stream the per-frame features
  (scaled CQT frames of ``preprocess/<key>`` for the baseline, codes of
  ``model/<key>``, ...) into window vectors per clip (`sae.classify.aggregate_clips`),
  then cross-validate them (`sae.classify.cross_validate`), one plain Dask task per
  split on the cluster of a ``DaskTaskRunner`` (``prefect_dask.get_dask_client()``,
  the vectors scattered once), serially otherwise;
- with protocol "inductive", one ``classify-inductive`` task that fits the
  auto-encoder per fold on the training clips' frames (`sae.classify.inductive_cross_validate`);
- the flow writes the summaries to ``results/<key>`` of the store, renders a markdown
  table and a PNG (`sae.report`) and publishes them as Prefect artifacts.

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
from sae import store as sae_store
from sae.classify import aggregate_clips, cross_validate, inductive_cross_validate
from sae.config import ClassifyConfig
from sae.report import plot_results, results_markdown

STAGE = "results"
DEFAULT_ARRAYS = {"preprocess": "X"}
"""Array read from a source group of a stage when the source names none (else ``codes``)."""


INDUCTIVE_FIELDS = ("model", "graph", "encode_methods")
"""Fields of `sae.config.ClassifyConfig` that only the "inductive" protocol reads."""


def results_key(preprocess_key: str, features: dict[str, str], config: ClassifyConfig) -> str:
    """Fingerprint of what a classification run depends on: its sources and its configuration.

    The settings of the inductive protocol count only when it runs (``classify.model`` follows
    ``train.model`` in a pipeline: a longer training keeps the key of a grouped classification).
    """
    exclude = set() if config.protocol == "inductive" else set(INDUCTIVE_FIELDS)
    blob = json.dumps(
        {"preprocess": preprocess_key, "features": features, "config": config.model_dump(mode="json", exclude=exclude)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


def open_rows(store: str, preprocess_key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row->clip mapping of the preprocessed frames, label index of every clip, label names."""
    from sae.preprocess import open_preprocessed

    group = open_preprocessed(store, preprocess_key)
    root = sae_store.open_store(store)
    return group["clip_index"][:], sae_store.clip_table(root)["label_index"], sae_store.store_labels(root)


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


def _write_feature_results(group: Any, name: str, features: Any, summary: dict[str, Any]) -> None:
    sub = group.require_group(name)
    for array_name, values in (
        ("vectors", features.vectors.astype(np.float32)),
        ("labels", features.labels),
        ("groups", features.groups),
        ("scores", np.asarray(summary["scores"])),
    ):
        sae_store.create_array(sub, array_name, shape=values.shape, dtype=values.dtype, data=values, overwrite=True)
    sub.attrs.update({"summary": sae_store.json_safe(summary)})


def classify_features(
    store: str, preprocess_key: str, name: str, source: str, config: ClassifyConfig, key: str
) -> dict[str, Any]:
    """Aggregate one feature source and cross-validate it; writes ``results/<key>/<name>``."""
    row_clips, clip_labels, class_names = open_rows(store, preprocess_key)
    array = open_source(store, source)
    if array.shape[0] != row_clips.shape[0]:
        raise ValueError(
            f"feature source {source!r} has {array.shape[0]} rows, but preprocess/{preprocess_key} "
            f"has {row_clips.shape[0]}: the features must be computed from those frames"
        )
    features = aggregate_clips(
        array, row_clips, clip_labels=clip_labels, n_windows=config.n_windows, window_frames=config.window_frames,
        shifted=config.shifted, rectify=config.rectify, chunk_clips=config.chunk_clips,
    )
    with cluster_client() as client:
        summary = cross_validate(features, config, client=client)
    summary.update(source=source, class_names=[class_names[k] for k in summary["classes"]])
    _write_feature_results(sae_store.stage_group(store, STAGE, key, mode="a"), name, features, summary)
    return summary


def classify_inductive(store: str, preprocess_key: str, config: ClassifyConfig, key: str) -> dict[str, dict]:
    """The inductive protocol on ``preprocess/<preprocess_key>``'s frames; one summary per encoding method."""
    from sae.preprocess import open_preprocessed

    row_clips, clip_labels, class_names = open_rows(store, preprocess_key)
    frames = open_preprocessed(store, preprocess_key)["X"]
    with cluster_client() as client:
        results = inductive_cross_validate(frames, row_clips, clip_labels, config, client=client)
    group = sae_store.stage_group(store, STAGE, key, mode="a")
    out = {}
    for method, summary in results.items():
        summary.update(source=f"preprocess/{preprocess_key}", class_names=[class_names[k] for k in summary["classes"]])
        sub = group.require_group(f"sae_inductive_{method}")
        sub.attrs.update({"summary": sae_store.json_safe(summary)})
        out[f"sae_inductive_{method}"] = summary
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
    folder = Path(f"{str(store).rstrip('/')}-reports")
    return folder / f"classify-{key}.md", folder / f"classify-{key}.png"


def submit_classification(
    store: str, preprocess_key: str, features: dict[str, str], config: ClassifyConfig
) -> tuple[str, bool, dict[str, dict[str, Any]]]:
    """Inside a flow: the classification of ``features``, as tasks of the flow's task runner.

    Reuses a complete ``results/<key>``; otherwise submits one
    ``classify-features`` task per feature set (and ``classify-inductive``),
    then writes the summaries and marks the group complete.

    Returns
    -------
    key, reused, summaries
    """
    for source in features.values():
        parse_source(source)
    key = results_key(preprocess_key, features, config)
    if sae_store.is_complete(store, STAGE, key):
        return key, True, dict(sae_store.stage_group(store, STAGE, key, mode="r").attrs["summaries"])
    record = {"preprocess_key": preprocess_key, "features": features, "classify": config.model_dump(mode="json")}
    sae_store.stage_group(store, STAGE, key, config=record, mode="w")
    futures = {
        name: classify_features_task.submit(store, preprocess_key, name, source, config, key)
        for name, source in features.items()
    }
    inductive = (
        classify_inductive_task.submit(store, preprocess_key, config, key) if config.protocol == "inductive" else None
    )
    summaries = {name: future.result() for name, future in futures.items()}
    if inductive is not None:
        summaries.update(inductive.result())
    root = sae_store.open_store(store, mode="r+")
    group = sae_store.stage_group(root, STAGE, key, mode="a")
    group.attrs.update({"summaries": sae_store.json_safe(summaries)})
    sources = {f"preprocess/{preprocess_key}"} | {"/".join(parse_source(source)[:2]) for source in features.values()}
    sae_store.mark_complete(group, inputs=[root[path] for path in sorted(sources)])
    return key, False, summaries


def publish_results(
    store: str, key: str, summaries: dict[str, dict[str, Any]], title: str
) -> tuple[Path, Path]:
    """Write the markdown and PNG of ``results/<key>`` beside the store; publish them as an artifact in a flow run."""
    markdown_path, png_path = report_paths(store, key)
    markdown = results_markdown(summaries, title=title)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown)
    plot_results(summaries, png_path)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown + f"\nFigure (accuracies, confusion matrices): `{png_path.resolve()}`\n",
            key=f"classify-{key}", description=f"Classification results/{key} of {store}",
        )
    return markdown_path, png_path


def brief(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The headline numbers of summaries: accuracy_mean, accuracy_std, chance, n_scores."""
    return {
        name: {k: summary[k] for k in ("accuracy_mean", "accuracy_std", "chance", "n_scores")}
        for name, summary in summaries.items()
    }


@flow(name="classify", task_runner=ThreadPoolTaskRunner(max_workers=2))
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
