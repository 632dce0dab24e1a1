"""Encoding of unseen frames: each method against an independent computation, and the inductive graph term."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from sklearn.decomposition import sparse_encode

from sae.config import GraphConfig, ModelConfig
from sae.graph import adjacency_matrix, degree_vector, laplacian_matrix
from sae.inference import NeighbourGraph, TrainingGraph, available_methods, encode_frames
from sae.model import code_terms, init_dictionary, init_encoder
from sae.solvers import fista
from sae.terms import L1Norm

N_TRAIN, N_NEW, N_FEATURES, N_ATOMS, K = 40, 7, 5, 4, 3
TIGHT = dict(rtol=1e-12, inner_rtol=1e-12, max_inner=20000, dtype="float64")


@pytest.fixture
def problem(rng):
    """Training frames with codes and a kNN graph (through sae.graph), new frames, C and E."""
    X_train = rng.random((N_TRAIN, N_FEATURES))
    Z_train = np.maximum(rng.normal(size=(N_TRAIN, N_ATOMS)), 0)
    X_new = rng.random((N_NEW, N_FEATURES))
    C = init_dictionary(N_ATOMS, N_FEATURES, rng=rng, dtype=np.float64)
    E = init_encoder(N_ATOMS, N_FEATURES, rng=rng, dtype=np.float64)
    D2 = ((X_train[:, None] - X_train[None]) ** 2).sum(-1)
    np.fill_diagonal(D2, np.inf)
    indices = np.argsort(D2, axis=1)[:, :K]
    distances = np.sqrt(np.take_along_axis(D2, indices, axis=1))
    W = adjacency_matrix(indices, distances, dtype=np.float64)
    sigma = float(distances[:, -1].mean())
    return {"X_train": X_train, "Z_train": Z_train, "X_new": X_new, "C": C, "E": E, "W": W, "sigma": sigma}


def graph_of(problem, laplacian="normalized") -> TrainingGraph:
    config = GraphConfig(n_neighbors=K, laplacian=laplacian, method="exact")
    return TrainingGraph(problem["X_train"], problem["Z_train"], degree_vector(problem["W"]), problem["sigma"], config)


def brute_neighbours(problem):
    """K nearest training frames of every new frame, and exp(-d / sigma) weights, by plain numpy."""
    D = np.sqrt(((problem["X_new"][:, None] - problem["X_train"][None]) ** 2).sum(-1))
    indices = np.argsort(D, axis=1)[:, :K]
    return indices, np.exp(-np.take_along_axis(D, indices, axis=1) / problem["sigma"])


def graph_value(problem, Z, lambda_g, laplacian):
    """g(Z) written out: lambda_g/2 sum_u sum_j w_uj ||a_u z_u - b_j z_j||^2."""
    indices, weights = brute_neighbours(problem)
    degrees = np.asarray(problem["W"].sum(axis=1)).ravel()
    total = 0.0
    for u in range(Z.shape[0]):
        a = 1 / np.sqrt(weights[u].sum() + 1) if laplacian == "normalized" else 1.0
        for j, w in zip(indices[u], weights[u]):
            b = 1 / np.sqrt(degrees[j]) if laplacian == "normalized" else 1.0
            total += w * np.sum((a * Z[u] - b * problem["Z_train"][j]) ** 2)
    return 0.5 * lambda_g * total


def test_available_methods_follow_the_weights():
    assert available_methods(ModelConfig(lambda_e=2.0), has_graph=False) == ("encoder", "exact")
    assert available_methods(ModelConfig(lambda_g=1.0), has_graph=False) == ("exact",)
    with pytest.raises(ValueError, match="needs an encoder"):
        encode_frames(np.zeros((2, 3)), np.eye(3), None, ModelConfig(n_atoms=3), "encoder")
    with pytest.raises(ValueError, match="needs lambda_g > 0"):
        encode_frames(np.zeros((2, 3)), np.eye(3), None, ModelConfig(n_atoms=3), "exact_graph")


def test_encoder_is_the_soft_threshold_of_x_e(problem):
    config = ModelConfig(n_atoms=N_ATOMS, lambda_z=0.3, lambda_e=2.0, dtype="float64")
    codes = encode_frames(problem["X_new"], problem["C"], problem["E"], config, "encoder")
    projected = problem["X_new"] @ problem["E"].T
    np.testing.assert_allclose(codes, np.sign(projected) * np.maximum(np.abs(projected) - 0.15, 0))


@pytest.mark.parametrize("lambda_e", [0.0, 3.0])
def test_exact_is_the_lasso_of_scikit_learn(problem, lambda_e):
    """lambda_d/2 ||x - z C||^2 + lambda_e/2 ||z - x E^T||^2 + lambda_z ||z||_1 is a lasso on the stacked
    dictionary [sqrt(lambda_d) C, sqrt(lambda_e) I] and signal [sqrt(lambda_d) x, sqrt(lambda_e) x E^T]."""
    lambda_d, lambda_z = 10.0, 0.5
    config = ModelConfig(n_atoms=N_ATOMS, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, **TIGHT)
    X, C, E = problem["X_new"], problem["C"], problem["E"]
    codes = encode_frames(X, C, E if lambda_e else None, config, "exact")
    dictionary = np.hstack([np.sqrt(lambda_d) * C, np.sqrt(lambda_e) * np.eye(N_ATOMS)])
    signal = np.hstack([np.sqrt(lambda_d) * X, np.sqrt(lambda_e) * X @ E.T])
    reference = sparse_encode(signal, dictionary, algorithm="lasso_cd", alpha=lambda_z, max_iter=100000)
    np.testing.assert_allclose(codes, reference, atol=1e-6)


def test_exact_solves_as_the_training_z_step_did(problem):
    """A model trained with the graph term (its Z step FISTA, stopped on the relative change) encodes new frames
    by FISTA with that rule, the graph term left out, as its classifier saw the training codes: at a loose
    tolerance these codes are not the lasso's solution, which a model trained without the graph term gives."""
    lambda_d, lambda_z = 10.0, 0.02
    config = ModelConfig(n_atoms=N_ATOMS, lambda_d=lambda_d, lambda_z=lambda_z, lambda_g=100.0, rtol=1e-2,
                         dtype="float64")
    X, C = problem["X_new"], problem["C"]
    codes = encode_frames(X, C, None, config, "exact")
    reference = fista(code_terms(X, C, None, lambda_d, 0.0), L1Norm(lambda_z), np.zeros((N_NEW, N_ATOMS)),
                      rtol=1e-2, max_iter=config.max_inner, restart=config.fista_restart, stop="change")
    np.testing.assert_allclose(codes, reference.solution, rtol=1e-12, atol=1e-12)
    lasso = encode_frames(X, C, None, config.model_copy(update={"lambda_g": 0.0}), "exact")
    assert np.abs(codes - lasso).max() > 1e-2


def test_neighbour_term_is_the_change_of_the_combinatorial_graph_term(problem, rng):
    """g(Z) = lambda_g/2 (tr(Z_all^T L_all Z_all) - tr(Z_T^T L_T Z_T)): the training graph plus the new edges,
    with the Laplacian of sae.graph."""
    graph, lambda_g = graph_of(problem, "combinatorial"), 7.0
    term = graph.term(problem["X_new"], lambda_g)
    indices, weights = brute_neighbours(problem)
    n_all = N_TRAIN + N_NEW
    rows = np.repeat(np.arange(N_TRAIN, n_all), K)
    new_edges = sp.csr_array((weights.ravel(), (rows, indices.ravel())), shape=(n_all, n_all))
    W_all = sp.block_diag([problem["W"], sp.csr_array((N_NEW, N_NEW))], format="csr") + new_edges + new_edges.T
    L_all = laplacian_matrix(W_all, laplacian="combinatorial", dtype=np.float64)
    L_train = laplacian_matrix(problem["W"], laplacian="combinatorial", dtype=np.float64)
    Z = rng.normal(size=(N_NEW, N_ATOMS))
    Z_all = np.vstack([problem["Z_train"], Z])
    expected = 0.5 * lambda_g * (np.sum(Z_all * (L_all @ Z_all)) - np.sum(problem["Z_train"] * (L_train @ problem["Z_train"])))
    assert term.value(Z) == pytest.approx(expected, rel=1e-6)
    assert term.value(Z) == pytest.approx(graph_value(problem, Z, lambda_g, "combinatorial"), rel=1e-6)


@pytest.mark.parametrize("laplacian", ["normalized", "combinatorial"])
def test_neighbour_term_value_and_gradient(problem, rng, laplacian):
    term = graph_of(problem, laplacian).term(problem["X_new"], 5.0)
    Z, V = rng.normal(size=(N_NEW, N_ATOMS)), rng.normal(size=(N_NEW, N_ATOMS))
    assert term.value(Z) == pytest.approx(graph_value(problem, Z, 5.0, laplacian), rel=1e-6)
    step = 1e-6
    numeric = (term.value(Z + step * V) - term.value(Z - step * V)) / (2 * step)
    assert np.sum(term.grad(Z) * V) == pytest.approx(numeric, rel=1e-6)
    assert term.lipschitz() == pytest.approx(np.max(np.abs(term.apply(np.ones_like(Z)))))


@pytest.mark.parametrize("laplacian", ["normalized", "combinatorial"])
def test_exact_graph_without_sparsity_is_the_closed_form(problem, laplacian):
    """lambda_z = 0: z_u (lambda_d C C^T + (lambda_e + lambda_g s_u) I) = lambda_d x_u C^T + lambda_e x_u E^T + B_u."""
    lambda_d, lambda_e, lambda_g = 10.0, 2.0, 30.0
    config = ModelConfig(n_atoms=N_ATOMS, lambda_d=lambda_d, lambda_z=0.0, lambda_e=lambda_e, lambda_g=lambda_g, **TIGHT)
    X, C, E = problem["X_new"], problem["C"], problem["E"]
    codes = encode_frames(X, C, E, config, "exact_graph", graph_of(problem, laplacian))
    indices, weights = brute_neighbours(problem)
    degrees = np.asarray(problem["W"].sum(axis=1)).ravel()
    for u in range(N_NEW):
        a = 1 / np.sqrt(weights[u].sum() + 1) if laplacian == "normalized" else 1.0
        b = 1 / np.sqrt(degrees[indices[u]]) if laplacian == "normalized" else np.ones(K)
        pull = lambda_g * a * (weights[u] * b) @ problem["Z_train"][indices[u]]
        s = a**2 * weights[u].sum()
        A = lambda_d * C @ C.T + (lambda_e + lambda_g * s) * np.eye(N_ATOMS)
        expected = np.linalg.solve(A, lambda_d * C @ X[u] + lambda_e * E @ X[u] + pull)
        np.testing.assert_allclose(codes[u], expected, rtol=1e-5, atol=1e-6)


def test_exact_graph_with_sparsity_minimises_the_objective(problem):
    """Against L-BFGS-B on z = p - q, p, q >= 0 (a smooth problem with the same minimum)."""
    lambda_d, lambda_z, lambda_e, lambda_g = 10.0, 3.0, 1.0, 20.0
    config = ModelConfig(n_atoms=N_ATOMS, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, lambda_g=lambda_g,
                         **TIGHT)
    X, C, E = problem["X_new"], problem["C"], problem["E"]
    codes = encode_frames(X, C, E, config, "exact_graph", graph_of(problem))

    indices, weights = brute_neighbours(problem)
    degrees = np.asarray(problem["W"].sum(axis=1)).ravel()
    a = 1 / np.sqrt(weights.sum(axis=1) + 1)  # (N',)
    pulled = problem["Z_train"][indices] / np.sqrt(degrees[indices])[..., None]  # b_j z_j, (N', K, m)

    def objective(Z):
        return (lambda_d / 2 * np.sum((X - Z @ C) ** 2) + lambda_z * np.abs(Z).sum()
                + lambda_e / 2 * np.sum((Z - X @ E.T) ** 2) + graph_value(problem, Z, lambda_g, "normalized"))

    def smooth_gradient(Z):
        graph = lambda_g * np.einsum("uk,ukm->um", weights, a[:, None, None] * (a[:, None, None] * Z[:, None] - pulled))
        return lambda_d * (Z @ C - X) @ C.T + lambda_e * (Z - X @ E.T) + graph

    def split(v):
        p, q = v.reshape(2, N_NEW, N_ATOMS)
        return p - q

    def value_and_gradient(v):
        gradient = smooth_gradient(split(v)).ravel()
        return objective(split(v)), np.concatenate([gradient + lambda_z, -gradient + lambda_z])

    size = N_NEW * N_ATOMS
    found = scipy.optimize.minimize(value_and_gradient, np.zeros(2 * size), jac=True, method="L-BFGS-B",
                                    bounds=[(0, None)] * (2 * size),
                                    options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
    assert objective(codes) <= found.fun + 1e-9 * abs(found.fun)
    np.testing.assert_allclose(codes, split(found.x), atol=1e-5)
    assert np.count_nonzero(codes == 0) > 0  # the l1 term acts


def test_exact_graph_codes_of_a_clip_do_not_depend_on_the_batch(problem):
    config = ModelConfig(n_atoms=N_ATOMS, lambda_d=10.0, lambda_z=0.3, lambda_g=20.0, dtype="float64")
    graph = graph_of(problem)
    X = problem["X_new"]
    alone = encode_frames(X[:3], problem["C"], None, config, "exact_graph", graph)
    np.testing.assert_allclose(encode_frames(X[:3], problem["C"], None, config, "exact_graph", graph), alone)
    # The term separates over frames: the first frames' part of the gradient ignores the others.
    term_all, term_first = graph.term(X, 20.0), graph.term(X[:3], 20.0)
    np.testing.assert_allclose(term_all.linear[:3], term_first.linear)
    np.testing.assert_allclose(term_all.diagonal[:3], term_first.diagonal)


def test_neighbour_term_checks_its_shapes():
    with pytest.raises(ValueError, match=r"neighbour_codes must be \(N', K, m\)"):
        NeighbourGraph(np.zeros((2, 3)), np.ones((2, 3)), np.ones(2), 1.0)
    with pytest.raises(ValueError, match="scale must be"):
        NeighbourGraph(np.zeros((2, 3, 4)), np.ones((2, 3)), np.ones(3), 1.0)
