"""Automatic balancing of the weights (``balance_lambdas``): the rule, the in-memory fit, the distributed fit."""

from __future__ import annotations

import numpy as np
import pytest

from flows._dask import LOOPBACK
from sae.audio import clip_frames
from sae.config import BuiltinDatasetConfig, CQTConfig, ModelConfig
from sae.datasets import make_builtin_dataset
from sae.graph import laplacian_from_neighbors
from sae.knn import exact_neighbors
from sae.model import TERM_WEIGHTS, balanced_weights, fit_sae, objective_terms

WEIGHTED = ("reconstruction_weighted", "sparsity_weighted", "graph_weighted")


@pytest.fixture(scope="module")
def builtin_frames(tmp_path_factory):
    """Min-max scaled CQT frames of a small built-in dataset (3 genres x 4 clips of 2 s) and their Laplacian."""
    root = tmp_path_factory.mktemp("builtin")
    clips = make_builtin_dataset(root, BuiltinDatasetConfig(n_genres=3, clips_per_genre=4, duration=2.0))
    X = np.concatenate([clip_frames(clip.path, CQTConfig(clip_samples=44100)) for clip in clips])
    X = (X - X.min(0)) / (X.max(0) - X.min(0))
    indices, distances = exact_neighbors(X, 10)
    return X.astype(np.float32), laplacian_from_neighbors(indices, distances)


def spread(record: dict) -> float:
    """Largest over smallest of the active weighted terms."""
    values = [record[name] for name in WEIGHTED if record[name] > 0]
    return max(values) / min(values)


def test_balanced_weights_equalise_the_terms_at_the_point_they_are_computed(rng):
    record = {"reconstruction": rng.uniform(10, 100), "sparsity": rng.uniform(1, 10),
              "graph": rng.uniform(0.1, 1), "encoder": rng.uniform(1, 5)}
    config = ModelConfig(lambda_d=10.0, lambda_z=2.0, lambda_g=100.0, lambda_e=3.0)
    balanced = config.model_copy(update=balanced_weights(record, config))
    for name, (weight_name, factor) in TERM_WEIGHTS.items():
        weighted = factor * getattr(balanced, weight_name) * record[name]
        assert weighted == pytest.approx(config.lambda_z * record["sparsity"], rel=1e-12), name
    assert balanced.lambda_z == config.lambda_z


def test_balanced_weights_leave_switched_off_and_zero_terms_alone():
    record = {"reconstruction": 8.0, "sparsity": 2.0, "graph": 0.0, "encoder": float("nan")}
    assert balanced_weights(record, ModelConfig(lambda_g=5.0)) == {"lambda_d": 0.5}  # graph 0: kept
    assert balanced_weights(record, ModelConfig(lambda_d=0.0)) == {}
    assert balanced_weights({**record, "sparsity": 0.0}, ModelConfig()) == {}  # all-zero codes: no scale


@pytest.mark.parametrize("lambda_g", [1.0, 100.0])
def test_balancing_brings_the_weighted_terms_within_10x_on_the_builtin_data(builtin_frames, lambda_g):
    X, laplacian = builtin_frames
    config = ModelConfig(n_atoms=32, lambda_g=lambda_g, max_outer=2, rtol=1e-9, max_inner=100, random_state=0)
    plain = fit_sae(X, config, laplacian)
    balanced = fit_sae(X, config.model_copy(update={"balance_lambdas": True}), laplacian)
    # The thesis's weights leave the terms far apart after the first outer iteration (else this test
    # proves nothing) ...
    assert spread(plain.history[1]) > 10
    # ... the rescaled ones bring them together: exactly where they were computed, and within 10x at
    # the first outer iteration trained with them.
    assert balanced.history[1]["balanced"] and spread(balanced.history[1]) == pytest.approx(1.0)
    assert spread(balanced.history[2]) < 10
    trained = balanced.config
    assert trained.lambda_z == config.lambda_z and trained.lambda_d != config.lambda_d
    for record in balanced.history:  # the whole history measures the objective trained with
        assert (record["lambda_d"], record["lambda_g"]) == (trained.lambda_d, trained.lambda_g)
    # The recorded total is that objective's value at the returned point.
    terms = objective_terms(X, balanced.codes, balanced.components, None, laplacian, trained)
    assert balanced.history[-1]["total"] == pytest.approx(terms["total"], rel=1e-5)


def test_estimator_encodes_with_the_balanced_weights(builtin_frames):
    from sae.estimator import StructuredAutoEncoder

    X, _ = builtin_frames
    model = StructuredAutoEncoder(n_atoms=16, max_outer=2, rtol=1e-9, max_inner=50, random_state=0,
                                  balance_lambdas=True).fit(X)
    assert model.config_.lambda_d == model.objective_[-1]["lambda_d"] != model.lambda_d
    assert model.get_params()["lambda_d"] == 10.0  # the parameter itself is untouched


@pytest.mark.slow
def test_distributed_fit_balances_as_the_in_memory_fit_and_resumes_with_the_balanced_weights(
    builtin_frames, tmp_path
):
    import zarr
    from distributed import Client, LocalCluster

    from sae.distributed import fit_distributed

    X, laplacian = builtin_frames
    config = ModelConfig(n_atoms=16, lambda_g=100.0, max_outer=3, rtol=1e-9, max_inner=60, random_state=0,
                         balance_lambdas=True, dtype="float64")
    reference = fit_sae(X, config, laplacian)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, **LOOPBACK) as cluster, \
            Client(cluster) as client:
        group = zarr.open_group(str(tmp_path / "model.zarr"), mode="w")
        first = fit_distributed(X, config.model_copy(update={"max_outer": 2}), client=client, laplacian=laplacian,
                                block_size=400, checkpoint=group)
        resumed = fit_distributed(X, config, client=client, laplacian=laplacian, block_size=400, checkpoint=group)
    assert first.history[1]["balanced"] and resumed.resumed_from == 2
    for name in ("lambda_d", "lambda_g"):
        assert resumed.history[-1][name] == pytest.approx(reference.history[-1][name], rel=1e-6)
    assert resumed.history[-1]["total"] == pytest.approx(reference.history[-1]["total"], rel=5e-3)
