"""The training stage in a real store: `sae.distributed.train_model` and the Prefect flow."""

from __future__ import annotations


import numpy as np
import pytest
from distributed import Client, LocalCluster

from flows._dask import LOOPBACK
from sae import store
from sae.config import CQTConfig, ModelConfig, TrainConfig
from sae.distributed import open_model, train_model
from sae.blas import blas_threads
from sae.model import fit_sae
from sae.store.keys import model_key
from tests.test_distributed import make_data


@pytest.fixture
def training_store(tmp_path):
    """A store with a preprocessed X (400 x 12) and its Laplacian, written through sae.store."""
    X, L = make_data(400)
    path = str(tmp_path / "tiny.zarr")
    root = store.create_store(path, CQTConfig(clip_samples=22050), [("a/x", "x.wav", "a")], chunk_clips=1)
    pre = store.stage_group(root, "preprocess", "pre", config={"test": 1}, mode="w")
    store.create_array(pre, "X", shape=X.shape, chunks=(128, X.shape[1]), dtype="float32", data=X)
    store.mark_complete(pre)
    graph = store.stage_group(root, "graph", "pre-g", config={"test": 1}, mode="w")
    store.write_sparse(graph, "laplacian", L)
    store.mark_complete(graph)
    return path, X, L


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **LOOPBACK) as cluster, \
            Client(cluster) as client:
        yield client


def test_train_model_resumes_and_skips(training_store, client):
    path, X, L = training_store
    train = TrainConfig(model=ModelConfig(n_atoms=8, lambda_g=3.0, max_outer=2, max_inner=10, random_state=0),
                        block_size=128)
    first = train_model(path, "pre", train, client=client, graph_key="pre-g")
    assert first["n_iter"] == 2 and not first["skipped"]
    again = train_model(path, "pre", train, client=client, graph_key="pre-g")
    assert again["skipped"] and again["objective"] == first["objective"]

    longer = train.model_copy(update={"model": train.model.model_copy(update={"max_outer": 3})})
    assert model_key(longer, "pre", "pre-g") == first["key"]
    resumed = train_model(path, "pre", longer, client=client, graph_key="pre-g")
    assert resumed["resumed_from"] == 2 and resumed["n_iter"] == 3
    reference = fit_sae(X, longer.model, L)
    assert abs(resumed["objective"] - reference.history[-1]["total"]) <= 5e-3 * reference.history[-1]["total"]
    model = open_model(path, first["key"])
    assert model["complete"] and model["codes"].shape == (400, 8) and model["codes"].chunks == (128, 8)
    assert len(model["history"]) == 4
    with pytest.raises(ValueError, match="graph_key is required when lambda_g > 0"):
        train_model(path, "pre", train, client=client)


def test_an_online_model_is_complete_for_its_epochs_and_a_longer_one_starts_again(training_store, client):
    """fit_method='online' in the training stage: its key differs from the alternating model's, it is complete
    for as many epochs as it ran (its last record, the codes of every frame, is numbered after the epochs),
    and a run with more epochs trains again from the start (no statistics are kept)."""
    from sae.stages.train import model_complete

    path, X, _ = training_store
    online = ModelConfig(n_atoms=8, max_outer=3, random_state=0, fit_method="online", batch_size=50,
                         z_solver="lars")
    train = TrainConfig(model=online, block_size=128)
    assert model_key(train, "pre") != model_key(TrainConfig(model=online.model_copy(
        update={"fit_method": "alternating"}), block_size=128), "pre")
    first = train_model(path, "pre", train, client=client)
    assert first["n_iter"] == 3 and not first["skipped"]
    assert model_complete(path, first["key"], 3) and not model_complete(path, first["key"], 4)
    again = train_model(path, "pre", train, client=client)
    assert again["skipped"] and again["n_iter"] == 3 and again["objective"] == first["objective"]
    longer = train.model_copy(update={"model": online.model_copy(update={"max_outer": 4})})
    assert model_key(longer, "pre") == first["key"]
    trained = train_model(path, "pre", longer, client=client)
    assert not trained["skipped"] and trained["resumed_from"] == 0 and trained["n_iter"] == 4
    reference = fit_sae(X, longer.model)
    assert trained["objective"] == pytest.approx(reference.history[-1]["total"], rel=1e-5)
    model = open_model(path, first["key"])
    assert model["complete"] and [r.get("online") for r in model["history"]] == [False] + [True] * 4 + [False]


def test_a_model_marked_complete_on_a_checkpoint_in_block_order_is_not_complete_and_training_makes_it_final(
        training_store, client):
    """A store left by an earlier version: a training stopped after its checkpoint of outer iteration 1 (codes in
    the blocks' k-means order), then marked complete by a run asked for max_outer = 1.  Its codes cannot be read
    (None): it is not a complete model for the classification, the export or the pipeline; training it again
    writes the final checkpoint without training more, and it is then the model a straight run gives."""
    from sae.artifact import model_keys
    from sae.distributed import checkpoint_arrays
    from sae.stages.train import model_complete

    path, X, L = training_store
    model = ModelConfig(n_atoms=8, lambda_g=3.0, max_outer=1, max_inner=10, random_state=0)
    train = TrainConfig(model=model, block_size=128)

    class Gone(RuntimeError):
        pass

    def interrupt(where):
        if where == "outer iteration 2, before its checkpoint":
            raise Gone

    longer = TrainConfig(model=model.model_copy(update={"max_outer": 3}), block_size=128)
    with pytest.raises(Gone):
        train_model(path, "pre", longer, client=client, graph_key="pre-g", interrupt=interrupt)
    key = model_key(train, "pre", "pre-g")
    group = store.stage_group(path, "model", key, mode="a")
    store.mark_complete(group, arrays=checkpoint_arrays(group))  # what the earlier version did
    state = open_model(path, key)
    assert state["codes"] is None and not state["complete"]
    assert not model_complete(path, key, 1) and key not in model_keys(path)

    out = train_model(path, "pre", train, client=client, graph_key="pre-g")
    assert not out["skipped"] and out["resumed_from"] == 1 and out["n_iter"] == 1
    state = open_model(path, key)
    assert state["complete"] and state["stop_reason"] == "max_outer"
    assert model_complete(path, key, 1) and key in model_keys(path)
    reference = fit_sae(X, model, L)  # the same first outer iteration, in memory
    np.testing.assert_allclose(state["codes"][:], reference.codes, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_free_training_writes_its_final_codes_and_nothing_else(training_store, client):
    path, X, L = training_store
    model = ModelConfig(n_atoms=8, lambda_g=3.0, max_outer=3, max_inner=10, random_state=0)
    with_checkpoints = train_model(path, "pre", TrainConfig(model=model, block_size=128), client=client,
                                   graph_key="pre-g")
    final_only = TrainConfig(model=model.model_copy(update={"lambda_z": 1.5}), block_size=128, checkpoint=False)
    out = train_model(path, "pre", final_only, client=client, graph_key="pre-g")
    group = store.stage_group(path, "model", out["key"], mode="r")
    assert [name for name, _ in group.groups()] == ["checkpoint_1"]  # only the last outer iteration's slot
    assert store.is_complete(path, "model", out["key"])
    state = open_model(path, out["key"])
    assert state["complete"] and state["iteration"] == 3 and np.isfinite(state["codes"][:]).all()
    reference = fit_sae(X, final_only.model, L)
    assert abs(out["objective"] - reference.history[-1]["total"]) <= 5e-3 * reference.history[-1]["total"]
    assert with_checkpoints["key"] != out["key"]


def test_a_damaged_checkpoint_is_trained_again_from_the_start(training_store, client, tmp_path):
    import pathlib

    path, X, L = training_store
    train = TrainConfig(model=ModelConfig(n_atoms=8, lambda_g=3.0, max_outer=2, max_inner=10, random_state=0),
                        block_size=128)
    first = train_model(path, "pre", train, client=client, graph_key="pre-g")
    codes = pathlib.Path(path) / "model" / first["key"] / "checkpoint_0" / "codes" / "c" / "1" / "0"
    codes.unlink()
    assert not store.is_complete(path, "model", first["key"])
    with pytest.raises(store.StoreDamaged, match="checkpoint of outer iteration 2 is damaged"):
        open_model(path, first["key"])
    again = train_model(path, "pre", train, client=client, graph_key="pre-g")
    assert not again["skipped"] and again["resumed_from"] == 0 and again["objective"] == first["objective"]
    assert store.is_complete(path, "model", first["key"])


@pytest.mark.slow
def test_train_flow_logs_and_matches_reference(training_store, task_run_messages):
    from flows.train import train_flow

    path, X, _ = training_store
    train = TrainConfig(model=ModelConfig(n_atoms=8, lambda_e=1.0, max_outer=3, max_inner=50, random_state=0),
                        block_size=150)
    blas_before = blas_threads()
    out = train_flow(store=path, preprocess_key="pre", train=train)
    printed = "\n".join(task_run_messages)
    reference = fit_sae(X, train.model)
    assert abs(out["objective"] - reference.history[-1]["total"]) <= 5e-3 * reference.history[-1]["total"]
    assert out["n_iter"] == reference.n_iter
    # one line per outer iteration from the task's run logger (the only one that writes "relative change")
    for outer in range(1, out["n_iter"] + 1):
        assert f"outer {outer}: objective" in printed
    # 3 blocks on the in-process cluster's 2 threads: BLAS on one thread per product (flows.train.blas_for_training)
    assert "(1 workers; BLAS on 1 thread(s) per product)" in printed or blas_threads() == [1]
    assert blas_threads() == blas_before
    assert printed.count("relative change") >= out["n_iter"]
    model = open_model(path, out["key"])
    np.testing.assert_allclose(model["components"].shape, (8, X.shape[1]))
