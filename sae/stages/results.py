"""The classify stage: cross-validated classification of feature sets, in ``results/<key>`` groups.

Every feature set (the baseline's scaled CQT frames, a model's codes, the
inductive protocol's models fitted per fold) has its own ``results/<key>``
(`sae.store.keys.feature_key`), so the baseline of a preprocessing is classified
once whatever the models shown beside it; the combined ``results/<key>``
(`sae.store.keys.results_key`) records the table of all of them.

Freshness: `results_current` (complete, its inputs unchanged, computed with the
clip groups the store holds now).  Feature sources are ``"<stage>/<key>"`` or
``"<stage>/<key>/<array>"`` (`sae.store.keys.parse_source`); their rows must be
the rows of ``preprocess/<preprocess_key>``, whose ``clip_index`` maps rows to clips.

`classify_sources` computes what is not current; the classification of a
feature set (`classify_features`, `classify_inductive`) is handed to ``submit``
callables, so that a flow runs them as tasks (by default they run here, one
after the other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sae import store as sae_store
from sae.config import ClassifyConfig, PipelineConfig
from sae.progress import Interrupt, ProgressCallback, go_on
from sae.stages.inputs import require
from sae.stages.train import require_model
from sae.store.keys import (
    INDUCTIVE_SOURCE,
    MODEL,
    PREPROCESS,
    RESULTS,
    feature_keys,
    feature_sources,
    group_name,
    parse_source,
    report_paths,
    results_key,
    source_group,
    stage_keys,
)

logger = logging.getLogger("sae.stages")

HEADLINE = ("accuracy_mean", "accuracy_std", "chance", "n_scores")
"""The headline numbers of a summary (`brief`)."""


def results_current(store: str, key: str) -> bool:
    """Whether ``results/<key>`` is complete and was computed with the clip groups the store holds now.

    Groups (the manifest's ``group`` column) decide the grouped folds; a store
    whose groups changed since (a resumed ingestion of an edited manifest)
    needs the classification again.
    """
    if not sae_store.is_complete(store, RESULTS, key):
        return False
    recorded = sae_store.stage_group(store, RESULTS, key, mode="r").attrs.get("groups")
    return recorded == sae_store.groups_digest(sae_store.open_store(store))


def read_summaries(store: str, key: str) -> dict[str, dict[str, Any]]:
    """The summaries (feature set -> summary) of a complete ``results/<key>``."""
    return dict(sae_store.stage_group(store, RESULTS, key, mode="r").attrs["summaries"])


def brief(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The headline numbers of summaries: accuracy_mean, accuracy_std, chance, n_scores."""
    return {name: {k: summary[k] for k in HEADLINE} for name, summary in summaries.items()}


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
    if stage == MODEL and array == "codes":
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


def _new_results_group(store: str, key: str, record: dict[str, Any], interrupt: Interrupt = go_on) -> Any:
    interrupt(f"results {key}, before it writes")
    root = sae_store.open_store(store, mode="r+")
    group = sae_store.stage_group(root, RESULTS, key, config=record, mode="w")
    group.attrs["groups"] = sae_store.groups_digest(root)
    return group


def _complete(store: str, group: Any, summaries: dict[str, dict[str, Any]], sources: list[str],
              interrupt: Interrupt = go_on) -> None:
    interrupt(f"results {group.basename}, before it is marked complete")
    root = sae_store.open_store(store, mode="r+")
    group.attrs.update({"summaries": sae_store.json_safe(summaries)})
    sae_store.mark_complete(group, inputs=[root[path] for path in sorted(set(sources))])


def check_folds(store: str, config: ClassifyConfig) -> None:
    """Refuse grouped folds that could not train and test every label of the store's ok clips (named).

    Run by the pipeline as soon as the clips are ingested (before hours of
    training) and by `classify_sources`; `sae.classify.cv_splits` refuses them
    too, by label index, once the vectors are built.
    """
    from sae.classify import check_groups_per_label

    if config.protocol == "thesis":
        return
    root = sae_store.open_store(store)
    clips = sae_store.ok_clips(root)
    check_groups_per_label(sae_store.clip_table(root)["label_index"][clips], sae_store.clip_group_index(root)[clips],
                           names=sae_store.store_labels(root))


def classify_features(
    store: str, preprocess_key: str, name: str, source: str, config: ClassifyConfig, key: str, *,
    client: Any = None, progress: ProgressCallback | None = None, interrupt: Interrupt = go_on,
) -> dict[str, Any]:
    """Aggregate one feature source and cross-validate it; writes and completes ``results/<key>``.

    ``client``: a Dask client to run the splits on (None: one after the other
    here); ``progress``: called with the splits done; ``interrupt``
    (`sae.progress.Interrupt`): before the group is replaced, before its
    arrays and before it is marked complete.
    """
    from sae.classify import cross_validate
    from sae.pooling import aggregate_clips, aggregate_options

    row_clips, clip_labels, class_names, clip_groups = open_rows(store, preprocess_key)
    array = open_source(store, source)
    if array.shape[0] != row_clips.shape[0]:
        raise ValueError(
            f"feature source {source!r} has {array.shape[0]} rows, but preprocess/{preprocess_key} "
            f"has {row_clips.shape[0]}: the features must be computed from those frames"
        )
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "source": source,
                                            "classify": config.model_dump(mode="json")}, interrupt)
    features = aggregate_clips(array, row_clips, clip_labels=clip_labels, **aggregate_options(config))
    summary = cross_validate(features, config, client=client, clip_groups=clip_groups, progress=progress)
    summary.update(source=source, class_names=[class_names[k] for k in summary["classes"]])
    interrupt(f"results {key}, before its arrays")
    _write_feature_results(group, features, summary)
    _complete(store, group, {name: summary}, [group_name(PREPROCESS, preprocess_key),
                                              source_group(preprocess_key, source)], interrupt)
    return summary


def classify_inductive(
    store: str, preprocess_key: str, config: ClassifyConfig, key: str, *,
    client: Any = None, progress: ProgressCallback | None = None, interrupt: Interrupt = go_on,
) -> dict[str, dict]:
    """The inductive protocol on ``preprocess/<preprocess_key>``'s frames; one summary per encoding method
    (``interrupt``: as `classify_features`)."""
    from sae.inductive import inductive_cross_validate
    from sae.preprocess import open_preprocessed

    row_clips, clip_labels, class_names, clip_groups = open_rows(store, preprocess_key)
    frames = open_preprocessed(store, preprocess_key)["X"]
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "source": INDUCTIVE_SOURCE,
                                            "classify": config.model_dump(mode="json")}, interrupt)
    results = inductive_cross_validate(frames, row_clips, clip_labels, config, client=client,
                                       clip_groups=clip_groups, progress=progress)
    out = {}
    source = group_name(PREPROCESS, preprocess_key)
    for method, summary in results.items():
        summary.update(source=source, class_names=[class_names[k] for k in summary["classes"]])
        out[f"sae_inductive_{method}"] = summary
    _complete(store, group, out, [source], interrupt)
    return out


class _Done:
    """The result of a call made at once, with the ``result()`` of a future."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _at_once(function: Callable[..., Any]) -> Callable[..., _Done]:
    return lambda *args: _Done(function(*args))


def classify_sources(
    store: str,
    preprocess_key: str,
    features: Mapping[str, str],
    config: ClassifyConfig,
    *,
    submit_features: Callable[..., Any] | None = None,
    submit_inductive: Callable[..., Any] | None = None,
) -> tuple[str, bool, dict[str, dict[str, Any]]]:
    """The classification of ``features``: the feature sets not current, then the combined ``results/<key>``.

    Every feature set's ``results/<key>`` is reused when current
    (`results_current`); the others are computed by
    ``submit_features(store, preprocess_key, name, source, config, key)`` (and
    ``submit_inductive(store, preprocess_key, config, key)`` for the inductive
    protocol), which return futures (``result()``: the summary; in a flow, the
    ``submit`` of its tasks); by default `classify_features` and
    `classify_inductive` run here.  Then the combined ``results/<key>``
    records the table.

    Returns
    -------
    key, reused, summaries
        The combined key, whether every feature set was reused, feature set -> summary.
    """
    submit_features = submit_features or _at_once(classify_features)
    submit_inductive = submit_inductive or _at_once(classify_inductive)
    for source in features.values():
        parse_source(source)
    key = results_key(preprocess_key, features, config)
    if results_current(store, key):
        return key, True, read_summaries(store, key)
    check_folds(store, config)
    keys = feature_keys(preprocess_key, features, config)
    summaries: dict[str, dict[str, Any]] = {}
    futures = {}
    for name, feature in keys.items():
        if results_current(store, feature):
            found = read_summaries(store, feature)
            summaries.update(found if name == INDUCTIVE_SOURCE else {name: next(iter(found.values()))})
        elif name == INDUCTIVE_SOURCE:
            futures[name] = submit_inductive(store, preprocess_key, config, feature)
        else:
            futures[name] = submit_features(store, preprocess_key, name, features[name], config, feature)
    for name, future in futures.items():
        result = future.result()
        summaries.update(result if name == INDUCTIVE_SOURCE else {name: result})
    ordered = {name: summaries[name] for name in features} | {k: v for k, v in summaries.items() if k not in features}
    group = _new_results_group(store, key, {"preprocess_key": preprocess_key, "features": keys,
                                            "classify": config.model_dump(mode="json")})
    # The sources too, not only the per-feature groups: a source that changed (a model trained further) makes
    # the table stale even before its own results group is looked at again.
    sources = [group_name(PREPROCESS, preprocess_key),
               *(source_group(preprocess_key, source) for source in features.values())]
    _complete(store, group, ordered, [*(group_name(RESULTS, feature) for feature in keys.values()), *sources])
    return key, not futures, ordered


def classify_stage(config: PipelineConfig, run: Callable[..., dict[str, Any]], *, log: Any = logger) -> dict[str, Any]:
    """Classification of the baseline and the codes, skipped when ``results/<key>`` is current and its report exists.

    Results are current when their inputs are unchanged: a model trained
    further under the same key (a larger ``max_outer``) makes them stale, and
    they are computed again.  ``run(store=, preprocess_key=, features=, config=)``
    classifies and writes the report (``flows.classify.classify_flow`` in a flow).

    Returns
    -------
    dict
        ``skipped``, ``key``, ``results`` (feature set -> accuracy_mean,
        accuracy_std, chance, n_scores), ``markdown`` and ``png`` (paths).
    """
    store, keys = config.ingest.store, stage_keys(config)
    with sae_store.store_lock(store):
        require(store, PREPROCESS, keys["preprocess"], "graph")
        require_model(store, keys["model"], config.train.model.max_outer)
        markdown, png = report_paths(store, keys["results"])
        if results_current(store, keys["results"]) and markdown.exists() and png.exists():
            summaries = read_summaries(store, keys["results"])
            log.info("classify: results/%s is complete: skipped", keys["results"])
            return {"skipped": True, "store": store, "key": keys["results"], "results": brief(summaries),
                    "markdown": str(markdown), "png": str(png)}
        out = run(store=store, preprocess_key=keys["preprocess"],
                  features=feature_sources(keys["preprocess"], keys["model"]), config=config.classify)
    return {**out, "skipped": False}
