"""The end-to-end pipeline on a tiny built-in dataset: every stage, then a re-run that skips them all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import dask_address, pipeline_flow, resolve_paths, run_ingest_stage
from flows.sweep import sweep_flow
from sae import load_model
from sae import store as sae_store
from sae.classify import fit_classifier
from sae.config import PipelineConfig
from sae.distributed import open_model
from sae.graph import degree_vector
from sae.pooling import aggregate_config
from sae.preprocess import open_preprocessed
from sae.stages import ingest_complete
from sae.store.keys import stage_keys

N_GENRES, CLIPS_PER_GENRE = 3, 4


def tiny_config(store: Path, **changes) -> PipelineConfig:
    """12 clips of 2 s (86 frames each), 8 atoms, 3 outer iterations, 2 folds."""
    values = {
        "ingest": {
            "store": str(store),
            "dataset": {"n_genres": N_GENRES, "clips_per_genre": CLIPS_PER_GENRE, "duration": 2.0},
            "cqt": {"clip_samples": 44100},
            "chunk_clips": 5,
        },
        "preprocess": {"frames_per_clip": None},
        "graph": {"n_neighbors": 5, "block_size": 256},
        "train": {"model": {"n_atoms": 8, "max_outer": 3, "max_inner": 30, "rtol": 1e-9}, "block_size": 256},
        "classify": {"n_windows": 2, "n_splits": 2, "n_repeats": 1, "classifier": "ridge"},
        "cluster": "local",
    }
    values.update(changes)
    return PipelineConfig(**values)


STAGE_GROUPS = (("ingest", "ingest"), ("preprocess", "preprocess"), ("graph", "graph"), ("model", "model"),
                ("results", "results"))


def completion_stamps(store: str, keys: dict[str, str]) -> dict[str, str]:
    """When each stage group of the run was marked complete."""
    return {stage: sae_store.stage_group(store, stage, keys[key], mode="r").attrs["completed"]
            for stage, key in STAGE_GROUPS}


@pytest.mark.slow
def test_pipeline_end_to_end_then_skips_every_stage(prefect_harness, tmp_path):
    config = tiny_config(tmp_path / "tiny.zarr")
    first = pipeline_flow(config)

    store = str((tmp_path / "tiny.zarr").resolve())
    keys = stage_keys(resolve_paths(config))
    assert first["store"] == store and first["keys"] == keys
    assert first["skipped"] == {"ingest": False, "graph": False, "train": False, "classify": False, "export": False}
    assert first["cluster"] is None

    # The store holds every stage's complete result, consistent with each other.
    root = sae_store.open_store(store)
    assert len(sae_store.ok_clips(root)) == N_GENRES * CLIPS_PER_GENRE
    for stage, key in STAGE_GROUPS:
        assert sae_store.is_complete(store, stage, keys[key]), stage
    n_rows = open_preprocessed(store, keys["preprocess"])["X"].shape[0]
    assert n_rows == N_GENRES * CLIPS_PER_GENRE * sae_store.store_frames_per_clip(root)
    model = open_model(store, keys["model"])
    assert model["complete"] and model["codes"].shape == (n_rows, 8)
    assert model["iteration"] == 3
    assert set(first["results"]) == {"baseline", "sae"}
    for row in first["results"].values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0
        assert row["chance"] == pytest.approx(1 / N_GENRES)
    assert Path(first["markdown"]).is_file() and Path(first["png"]).is_file()
    assert "| baseline |" in first["table"] and "| sae |" in first["table"]

    # The trained model is exported beside the store, with its training graph (lambda_g > 0).
    exported = load_model(first["model"])
    assert Path(first["model"]) == Path(f"{store}-models") / keys["model"]
    assert exported.methods == ("exact", "exact_graph") and exported.method == "exact"
    assert np.array_equal(exported.graph.codes, model["codes"][:])  # copied by blocks of rows
    assert np.array_equal(exported.graph.frames, open_preprocessed(store, keys["preprocess"])["X"][:])
    adjacency = sae_store.read_sparse(sae_store.stage_group(store, "graph", keys["graph"], mode="r"), "adjacency")
    assert np.array_equal(exported.graph.degrees, degree_vector(adjacency))
    assert exported.info["source"]["results_key"] == keys["results"]
    first_clip = sae_store.frames_array(root)[: sae_store.store_frames_per_clip(root)]
    assert set(exported.predict(first_clip, method="exact_graph")) <= set(exported.classes_)
    # Each method's classifier is fitted on the training clips coded as that method codes new music: "exact"
    # on every clip encoded alone (FISTA without the graph term), "exact_graph" on the training codes.
    X, row_clips = open_preprocessed(store, keys["preprocess"])["X"][:], open_preprocessed(
        store, keys["preprocess"])["clip_index"][:]
    alone = np.concatenate([exported.encode(X[row_clips == clip], "exact") for clip in dict.fromkeys(row_clips)])
    clip_labels, groups = sae_store.clip_table(root)["label_index"], sae_store.clip_group_index(root)
    for method, codes in (("exact", alone), ("exact_graph", model["codes"][:])):
        features = aggregate_config(codes, row_clips, exported.classify, clip_labels=clip_labels)
        refit = fit_classifier(features, exported.classify, groups=groups[features.groups])
        np.testing.assert_allclose(exported.classifiers_[method].decision_function(features.vectors),
                                   refit.decision_function(features.vectors), rtol=1e-6, atol=1e-8)
    vectors = aggregate_config(alone, row_clips, exported.classify).vectors
    assert not np.allclose(exported.classifiers_["exact"].decision_function(vectors),
                           exported.classifiers_["exact_graph"].decision_function(vectors), atol=1e-3)

    # A second run: nothing is recomputed, the same results are returned.
    stamps = completion_stamps(store, keys)
    second = pipeline_flow(config)
    assert second["skipped"] == {"ingest": True, "graph": True, "train": True, "classify": True, "export": True}
    assert completion_stamps(store, keys) == stamps
    assert second["results"] == first["results"] and second["markdown"] == first["markdown"]

    # A longer training run resumes the same model and re-classifies; earlier stages are reused.
    # (rtol is too small to stop it: every run goes to max_outer.)
    longer = tiny_config(tmp_path / "tiny.zarr", train={
        "model": {"n_atoms": 8, "max_outer": 4, "max_inner": 30, "rtol": 1e-9}, "block_size": 256})
    third = pipeline_flow(longer)
    assert third["skipped"] == {"ingest": True, "graph": True, "train": False, "classify": False, "export": False}
    assert third["keys"]["model"] == keys["model"] and third["keys"]["results"] == keys["results"]
    assert open_model(store, keys["model"])["iteration"] == 4

    # force: the store is created anew, so every later stage is gone and must be recomputed.
    forced = run_ingest_stage(resolve_paths(config.model_copy(update={"force": True})))
    assert forced["skipped"] is False and forced["counts"]["ok"] == N_GENRES * CLIPS_PER_GENRE
    assert ingest_complete(resolve_paths(config).ingest)
    assert not sae_store.is_complete(store, "model", keys["model"])


def test_stage_keys_follow_the_configuration(tmp_path):
    base = tiny_config(tmp_path / "a.zarr")
    keys = stage_keys(base)
    # The store path is not part of any key: a moved store is reused.
    assert stage_keys(tiny_config(tmp_path / "elsewhere.zarr")) == keys
    # A change invalidates its stage and the later ones only.
    changed = stage_keys(tiny_config(tmp_path / "a.zarr", graph={"n_neighbors": 6, "block_size": 256}))
    assert changed["ingest"] == keys["ingest"] and changed["preprocess"] == keys["preprocess"]
    assert changed["graph"] != keys["graph"] and changed["model"] != keys["model"]
    assert changed["results"] != keys["results"]
    # Without the graph term the model does not depend on the graph.
    no_graph = {"model": {"n_atoms": 8, "lambda_g": 0.0}}
    a = stage_keys(tiny_config(tmp_path / "a.zarr", train=no_graph))
    b = stage_keys(tiny_config(tmp_path / "a.zarr", train=no_graph, graph={"n_neighbors": 6}))
    assert a["model"] == b["model"] and a["graph"] != b["graph"]


def test_dask_address_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_DASK_ADDRESS", "tcp://127.0.0.1:9999")
    assert dask_address(tiny_config(tmp_path / "a.zarr", cluster=None)) == "tcp://127.0.0.1:9999"
    assert dask_address(tiny_config(tmp_path / "a.zarr", cluster="local")) is None
    assert dask_address(tiny_config(tmp_path / "a.zarr", cluster="tcp://127.0.0.1:1")) == "tcp://127.0.0.1:1"
    monkeypatch.delenv("SAE_DASK_ADDRESS")
    assert dask_address(tiny_config(tmp_path / "a.zarr", cluster=None)) is None


def test_resolve_paths_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "music").mkdir()
    config = resolve_paths(tiny_config(Path("rel.zarr")))
    assert config.ingest.store == str(tmp_path / "rel.zarr")
    with_data = PipelineConfig(ingest={"data": "music", "store": "x.zarr"})
    assert resolve_paths(with_data).ingest.data == str(tmp_path / "music")


def test_a_label_held_by_one_clip_is_refused_before_training(prefect_harness, tmp_path):
    """Grouped folds could not train on a genre of one clip: refused once the clips are in, before any training."""
    config = tiny_config(tmp_path / "lonely.zarr")
    config = config.model_copy(update={"ingest": config.ingest.model_copy(
        update={"dataset": config.ingest.dataset.model_copy(update={"clips_per_genre": 1})})})
    with pytest.raises(ValueError, match="label 'blues', 'classical', 'country' has only 1"):
        pipeline_flow(config)
    store = str((tmp_path / "lonely.zarr").resolve())
    assert sorted(sae_store.stages(store)) == ["ingest"]  # the ingestion is kept; nothing was trained
    with pytest.raises(ValueError, match="has only 1"):  # a sweep too, whatever its points
        sweep_flow(config, {"lambda_g": [0.0, 100.0]})
    assert sorted(sae_store.stages(store)) == ["ingest"]
