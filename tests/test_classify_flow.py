"""The classification flow on a small store: results equal the in-memory pipeline, on threads
and on a Dask cluster; results are stored, reported and reused."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prefect_dask import DaskTaskRunner

from flows._dask import LOOPBACK
from flows.classify import run_classify
from sae import store
from sae.classify import cross_validate
from sae.config import ClassifyConfig, CQTConfig, ModelConfig, PreprocessConfig, TrainConfig
from sae.distributed import open_model, train_model
from sae.inductive import inductive_cross_validate
from sae.pooling import aggregate_clips
from sae.preprocess import open_preprocessed, run_preprocess
from sae.stages.results import classify_sources, results_current
from sae.store.keys import feature_key, parse_source, results_key

pytestmark = pytest.mark.usefixtures("prefect_harness")

CQT = CQTConfig(clip_samples=22050)  # 42 frames per clip
GENRES = ("blues", "disco", "rock")
CLIPS_PER_GENRE = 6


def fill_store(path, rng):
    """A store of separable synthetic 'CQT' frames: each genre its own mean spectrum; one clip in error."""
    clips = [(f"{g}/{g}.{i}", f"{g}.{i}.wav", g) for g in GENRES for i in range(CLIPS_PER_GENRE)]
    group = store.create_store(path, CQT, clips, chunk_clips=4)
    n_frames = store.store_frames_per_clip(group)
    spectra = rng.random((len(GENRES), CQT.n_bins))
    labels = store.clip_table(group)["label_index"]
    records = []
    for chunk in range(store.n_chunks(group)):
        indices = list(store.chunk_clips_range(group, chunk))
        frames = np.concatenate(
            [np.abs(spectra[labels[i]] + rng.normal(0, 1.0, (n_frames, CQT.n_bins))) for i in indices]
        )
        store.write_chunk_frames(group, chunk, frames.astype(np.float32))
        records += [{"index": i, "status": "ok", "n_frames": n_frames} for i in indices]
    records[-1] = {"index": records[-1]["index"], "status": "error", "error_kind": "corrupt", "error": "test"}
    store.update_clips(group, records)
    return group


def train_codes(path, preprocess_key, model_config):
    """Train with the training stage on an in-process cluster; its key and the stored codes."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, **LOOPBACK) as cluster:
        with Client(cluster) as client:
            key = train_model(path, preprocess_key, TrainConfig(model=model_config, block_size=200), client=client)["key"]
    return key, open_model(path, key)["codes"][:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("classify") / "toy.zarr")
    fill_store(path, np.random.default_rng(0))
    preprocess_key = run_preprocess(path, PreprocessConfig(frames_per_clip=26))["key"]
    model_key, codes = train_codes(path, preprocess_key, ModelConfig(n_atoms=16, max_outer=4, random_state=0))
    return path, preprocess_key, model_key, codes


def test_parse_source_errors():
    with pytest.raises(ValueError, match="a feature source must read"):
        parse_source("model")


@pytest.mark.slow
def test_flow_equals_in_memory_pipeline_and_is_reused(prepared):
    path, preprocess_key, model_key, codes = prepared
    features = {"baseline": f"preprocess/{preprocess_key}", "sae": f"model/{model_key}"}
    config = ClassifyConfig(n_windows=2, n_splits=3, n_repeats=2, voting=True)
    out = run_classify(path, preprocess_key, features, config)

    # Independent in-memory pipeline: rows, clips and labels from the arrays themselves.
    group = open_preprocessed(path, preprocess_key)
    row_clips = group["clip_index"][:]
    assert np.unique(row_clips).size == len(GENRES) * CLIPS_PER_GENRE - 1  # the clip in error is left out
    labels = store.clip_table(store.open_store(path))["label_index"]
    expected = {}
    for name, X in (("baseline", group["X"][:]), ("sae", codes)):
        aggregated = aggregate_clips(X, row_clips, clip_labels=labels, n_windows=2)
        expected[name] = cross_validate(aggregated, config)
        assert out["results"][name]["accuracy_mean"] == expected[name]["accuracy_mean"]
        assert out["results"][name]["accuracy_std"] == expected[name]["accuracy_std"]
        assert out["results"][name]["accuracy_mean"] > out["results"][name]["chance"] + 0.3

    # Stored in results/<key>, reported, then reused.
    key = results_key(preprocess_key, features, config)
    assert out["key"] == key and not out["reused"]
    stored = store.stage_group(path, "results", key, mode="r")
    assert stored.attrs["complete"] is True
    assert stored.attrs["summaries"]["sae"]["confusion"] == expected["sae"]["confusion"]
    assert stored.attrs["summaries"]["sae"]["class_names"] == list(GENRES)
    assert stored.attrs["summaries"]["sae"]["grouping"] == "clip"
    per_feature = store.stage_group(path, "results", feature_key(preprocess_key, features["sae"], config), mode="r")
    np.testing.assert_array_equal(per_feature["scores"][:], expected["sae"]["scores"])
    text = open(out["markdown"]).read()
    assert f"{100 * expected['sae']['accuracy_mean']:.1f} ±" in text and "| disco |" in text
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
    again = run_classify(path, preprocess_key, features, config)
    assert again["reused"] and again["results"] == out["results"]

    # The baseline of a preprocessing is classified once: beside another feature set it is reused.
    baseline = store.stage_group(path, "results", feature_key(preprocess_key, features["baseline"], config), mode="r")
    version = baseline.attrs["version"]
    alone = run_classify(path, preprocess_key, {"baseline": features["baseline"]}, config)
    assert alone["reused"] and alone["results"]["baseline"] == out["results"]["baseline"]
    assert store.stage_group(path, "results", baseline.basename, mode="r").attrs["version"] == version

    # Regrouped clips (pairs of clips as recordings) make the results stale: the folds change.
    root = store.open_store(path, mode="r+")
    table = store.clip_table(root)
    store.update_groups(root, [f"recording {i // 2}" for i in range(len(table["clip_id"]))])
    try:
        grouped = run_classify(path, preprocess_key, features, config)
        assert not grouped["reused"]
        summaries = store.stage_group(path, "results", key, mode="r").attrs["summaries"]
        assert summaries["sae"]["grouping"] == "group" and summaries["sae"]["n_groups"] < np.unique(row_clips).size
    finally:
        store.update_groups(root, table["group"])  # the store is shared with the next tests


@pytest.mark.slow
def test_classify_sources_runs_in_process_without_a_flow(prepared):
    """The plain stage function, its feature sets computed here (no Prefect task): the in-memory results."""
    path, preprocess_key, model_key, codes = prepared
    features = {"baseline": f"preprocess/{preprocess_key}", "sae": f"model/{model_key}"}
    config = ClassifyConfig(n_windows=3, n_splits=2, n_repeats=1)
    key, reused, summaries = classify_sources(path, preprocess_key, features, config)
    assert key == results_key(preprocess_key, features, config) and not reused and results_current(path, key)
    group = open_preprocessed(path, preprocess_key)
    labels = store.clip_table(store.open_store(path))["label_index"]
    for name, X in (("baseline", group["X"][:]), ("sae", codes)):
        aggregated = aggregate_clips(X, group["clip_index"][:], clip_labels=labels, n_windows=3)
        assert summaries[name]["accuracy_mean"] == cross_validate(aggregated, config)["accuracy_mean"]
    assert classify_sources(path, preprocess_key, features, config) == (key, True, summaries)


def test_a_label_with_one_group_is_refused_before_any_work(prepared, tmp_path):
    """Grouped folds could never train on a label held by one group: a clear message naming it, nothing written."""
    import shutil

    path, preprocess_key, model_key, _ = prepared
    copy = str(tmp_path / "one-group.zarr")
    shutil.copytree(path, copy)
    root = store.open_store(copy, mode="r+")
    table = store.clip_table(root)
    first = store.store_labels(root)[0]
    groups = ["one" if label == 0 else clip for clip, label in zip(table["clip_id"], table["label_index"])]
    store.update_groups(root, groups)
    features = {"baseline": f"preprocess/{preprocess_key}", "sae": f"model/{model_key}"}
    config = ClassifyConfig(n_windows=3, n_splits=2, n_repeats=1)
    before = store.stages(copy).get("results", [])  # other tests may have classified the shared store
    with pytest.raises(ValueError, match=f"label '{first}' has only 1"):
        classify_sources(copy, preprocess_key, features, config)
    assert store.stages(copy).get("results", []) == before
    # The thesis's protocol splits vectors, not groups: it runs.
    key, _, summaries = classify_sources(copy, preprocess_key, features, config.model_copy(update={"protocol": "thesis"}))
    assert set(summaries) == {"baseline", "sae"}


@pytest.mark.slow
def test_flow_on_dask_cluster_with_inductive_protocol(prepared):
    path, preprocess_key, _, _ = prepared
    config = ClassifyConfig(
        protocol="inductive", n_windows=2, n_splits=2, n_repeats=1,
        model=ModelConfig(n_atoms=8, max_outer=2, max_inner=50, lambda_e=1.0, random_state=0),
        encode_methods=("exact", "encoder"),
    )
    runner = DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": False, **LOOPBACK},
    )
    out = run_classify(path, preprocess_key, None, config, task_runner=runner)
    assert set(out["results"]) == {"baseline", "sae_inductive_exact", "sae_inductive_encoder"}

    group = open_preprocessed(path, preprocess_key)
    labels = store.clip_table(store.open_store(path))["label_index"]
    serial = inductive_cross_validate(group["X"][:], group["clip_index"][:], labels, config)
    for method in ("exact", "encoder"):
        assert out["results"][f"sae_inductive_{method}"]["accuracy_mean"] == serial[method]["accuracy_mean"]
    aggregated = aggregate_clips(group["X"][:], group["clip_index"][:], clip_labels=labels, n_windows=2)
    assert out["results"]["baseline"]["accuracy_mean"] == cross_validate(aggregated, config)["accuracy_mean"]


@pytest.mark.slow
def test_noise_experiment_flow_builds_the_table_from_the_stages(prepared):
    from flows.experiments import noise_experiment_flow
    from sae.config import GraphConfig

    path = prepared[0]
    kwargs = dict(
        noise_stds=(0.0, 0.2), lambda_g=1.0,
        preprocess=PreprocessConfig(frames_per_clip=26),
        graph=GraphConfig(method="exact", n_neighbors=5, recall_sample=0),
        train=TrainConfig(model=ModelConfig(n_atoms=8, max_outer=2, max_inner=50, random_state=0), block_size=200),
        classify=ClassifyConfig(n_windows=2, n_splits=3, n_repeats=1),
    )
    out = noise_experiment_flow(path, **kwargs)
    assert set(out["table"]) == {0.0, 0.2}
    for noise_std, row in out["table"].items():
        assert set(row) == {"baseline", "lambda_g_off", "lambda_g_on"}
        keys = out["keys"][noise_std]
        assert len({keys["lambda_g_off"], keys["lambda_g_on"]}) == 2
        # The baseline column is the classification of that noise level's preprocessed frames.
        group = open_preprocessed(path, keys["preprocess"])
        labels = store.clip_table(store.open_store(path))["label_index"]
        aggregated = aggregate_clips(group["X"][:], group["clip_index"][:], clip_labels=labels, n_windows=2)
        expected = cross_validate(aggregated, kwargs["classify"])["accuracy_mean"]
        assert row["baseline"]["accuracy_mean"] == expected
    assert out["keys"][0.0]["preprocess"] == prepared[1]  # the noiseless frames already there are reused
    assert out["keys"][0.0]["preprocess"] != out["keys"][0.2]["preprocess"]
    text = open(out["markdown"]).read()
    # Grouped folds: the thesis's GTZAN figures (its leaky protocol) are not set beside these numbers.
    assert "| 0.2 |" in text and "grouped protocol" in text and "(46.9)" not in text
    # what the graph adds, split by split (3 splits)
    assert "lambda_g_on - lambda_g_off, paired (splits won)" in text
    assert all(re.search(r"\| [+-]\d+\.\d ± \d+\.\d \([0-3] of 3\) \|$", line)
               for line in text.splitlines() if line.startswith("| 0"))
    thesis = noise_experiment_flow(path, **{**kwargs, "classify": kwargs["classify"].model_copy(
        update={"protocol": "thesis"})})
    assert "(46.9)" in open(thesis["markdown"]).read()
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
    again = noise_experiment_flow(path, **kwargs)
    assert again["table"] == out["table"]
