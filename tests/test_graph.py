"""Identities of the kNN graph and its Laplacians (sae.graph)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import laplacian as csgraph_laplacian
from sklearn.neighbors import NearestNeighbors

from sae.config import GraphConfig
from sae.graph import (
    adjacency_matrix,
    graph_options,
    kernel_sigma,
    kernel_weights,
    laplacian_from_neighbors,
    laplacian_matrix,
    laplacian_norm_bound,
)


def _neighbors(X, k):
    """Exact kNN lists with self excluded, from scikit-learn."""
    distances, indices = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X).kneighbors()
    return indices, distances


@pytest.fixture
def knn(rng):
    X = rng.random((60, 4))
    return _neighbors(X, 6)


OPTIONS = [
    dict(kernel=kernel, self_loops=self_loops, sigma_factor=factor)
    for kernel in ("exp", "gaussian")
    for self_loops in (True, False)
    for factor in (1.0, 0.5)
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("kind", ["normalized", "combinatorial"])
def test_symmetric_and_csr(knn, options, kind):
    W = adjacency_matrix(*knn, **options)
    L = laplacian_from_neighbors(*knn, laplacian=kind, **options)
    for M in (W, L):
        assert isinstance(M, sp.csr_array)
        assert M.dtype == np.float32
        assert abs(M - M.T).max() == 0
    assert W.min() >= 0
    # every listed neighbour is an edge
    rows = np.repeat(np.arange(knn[0].shape[0]), knn[0].shape[1])
    assert np.all(W[rows, knn[0].ravel()] > 0)


@pytest.mark.parametrize("options", OPTIONS)
def test_combinatorial_rows_sum_to_zero(knn, options):
    L = laplacian_from_neighbors(*knn, laplacian="combinatorial", dtype=np.float64, **options)
    np.testing.assert_allclose(L.sum(axis=1), 0, atol=1e-12)
    assert np.all(L.diagonal() > 0)


@pytest.mark.parametrize("options", OPTIONS)
def test_normalized_spectrum_in_0_2(knn, options):
    L = laplacian_from_neighbors(*knn, laplacian="normalized", dtype=np.float64, **options)
    eigenvalues = np.linalg.eigvalsh(L.toarray())
    assert eigenvalues.min() > -1e-10
    assert eigenvalues.max() < 2 + 1e-10
    # the smallest eigenvalue is 0 (eigenvector D^1/2 1)
    assert abs(eigenvalues.min()) < 1e-10


def random_weights(rng, size):
    """A symmetric non-negative weight matrix of a random graph: random density, heavy-tailed weights, random
    self-loops, a few isolated nodes, so that neighbouring degrees differ widely."""
    density = rng.uniform(0.02, 0.6)
    W = rng.lognormal(sigma=rng.uniform(0, 3), size=(size, size)) * (rng.random((size, size)) < density)
    W = np.triu(W, 1)
    W = W + W.T
    np.fill_diagonal(W, rng.lognormal(size=size) * (rng.random(size) < rng.uniform(0, 1)))
    isolated = rng.random(size) < 0.05
    W[isolated] = 0
    W[:, isolated] = 0
    return sp.csr_array(W)


def test_the_norm_bound_never_exceeds_2_for_a_normalised_laplacian():
    """Property over random graphs: the bound is >= ||L||_2, and <= 2 for a normalised L (Gershgorin alone is not)."""
    above_2 = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        W = random_weights(rng, int(rng.integers(2, 40)))
        for kind in ("normalized", "combinatorial"):
            L = laplacian_matrix(W, laplacian=kind, dtype=np.float64)
            gershgorin = float(abs(L).sum(axis=1).max(initial=0.0))
            bound = laplacian_norm_bound(gershgorin, kind)
            norm = float(np.abs(np.linalg.eigvalsh(L.toarray())).max())
            assert norm <= bound * (1 + 1e-12) + 1e-12, (seed, kind)
            if kind == "normalized":
                assert bound <= 2.0
                above_2 += gershgorin > 2.0
            else:
                assert bound == gershgorin
    assert above_2 > 20  # the cap is what keeps it at 2
    assert laplacian_norm_bound(3.0, None) == 3.0  # unknown kind: Gershgorin's


@pytest.mark.parametrize("self_loops", [True, False])
def test_normalized_matches_scipy_csgraph(knn, self_loops):
    W = adjacency_matrix(*knn, self_loops=self_loops, dtype=np.float64)
    L = laplacian_matrix(W, laplacian="normalized", dtype=np.float64).toarray()
    if self_loops:
        # I - D^-1/2 W D^-1/2 with the self-loops in W and D
        d = np.asarray(W.sum(axis=1)).ravel()
        expected = np.eye(len(d)) - W.toarray() / np.sqrt(np.outer(d, d))
    else:
        expected = csgraph_laplacian(W.toarray(), normed=True)
    np.testing.assert_allclose(L, expected, atol=1e-12)
    C = laplacian_matrix(W, laplacian="combinatorial", dtype=np.float64).toarray()
    W_no_loops = W.toarray() - np.diag(W.diagonal())
    np.testing.assert_allclose(C, csgraph_laplacian(W_no_loops), atol=1e-12)


@pytest.mark.parametrize("self_loops", [True, False])
def test_dirichlet_energy_pairwise_form(knn, rng, self_loops):
    W = adjacency_matrix(*knn, self_loops=self_loops, dtype=np.float64)
    Wd = W.toarray()
    d = Wd.sum(axis=1)
    Z = rng.standard_normal((Wd.shape[0], 3))  # storage orientation: (N, m)
    diff = Z[:, None, :] - Z[None, :, :]
    pairwise = 0.5 * np.sum(Wd * np.sum(diff**2, axis=-1))
    C = laplacian_matrix(W, laplacian="combinatorial", dtype=np.float64)
    np.testing.assert_allclose(np.trace(Z.T @ (C @ Z)), pairwise, rtol=1e-10)
    Zn = Z / np.sqrt(d)[:, None]
    diff = Zn[:, None, :] - Zn[None, :, :]
    pairwise = 0.5 * np.sum(Wd * np.sum(diff**2, axis=-1))
    N = laplacian_matrix(W, laplacian="normalized", dtype=np.float64)
    np.testing.assert_allclose(np.trace(Z.T @ (N @ Z)), pairwise, rtol=1e-10)


def test_incidence_factorisation(knn):
    W = adjacency_matrix(*knn, dtype=np.float64)
    Wd = W.toarray()
    i, j = np.nonzero(np.triu(Wd, k=1))
    B = np.zeros((Wd.shape[0], len(i)))  # (N, n_edges)
    B[i, np.arange(len(i))] = np.sqrt(Wd[i, j])
    B[j, np.arange(len(i))] = -np.sqrt(Wd[i, j])
    C = laplacian_matrix(W, laplacian="combinatorial", dtype=np.float64).toarray()
    np.testing.assert_allclose(C, B @ B.T, atol=1e-12)
    d = Wd.sum(axis=1)
    Bn = B / np.sqrt(d)[:, None]
    N = laplacian_matrix(W, laplacian="normalized", dtype=np.float64).toarray()
    np.testing.assert_allclose(N, Bn @ Bn.T, atol=1e-12)


@pytest.mark.parametrize("kernel", ["exp", "gaussian"])
@pytest.mark.parametrize("sigma_factor", [1.0, 0.7])
def test_weights_by_hand(kernel, sigma_factor):
    points = [0.0, 1.0, 3.0, 7.0, 7.5]
    k = 2
    n = len(points)
    lists = []
    for a in range(n):
        others = sorted((abs(points[a] - points[b]), b) for b in range(n) if b != a)
        lists.append(others[:k])
    sigma = sigma_factor * sum(row[-1][0] for row in lists) / n

    def weight(dist):
        if kernel == "exp":
            return math.exp(-dist / sigma)
        return math.exp(-dist * dist / (2 * sigma * sigma))

    expected = [[0.0] * n for _ in range(n)]
    for a, row in enumerate(lists):
        for dist, b in row:
            w = weight(dist)
            expected[a][b] = max(expected[a][b], w)
            expected[b][a] = max(expected[b][a], w)
    indices = np.array([[b for _, b in row] for row in lists])
    distances = np.array([[dist for dist, _ in row] for row in lists])

    assert kernel_sigma(distances, sigma_factor=sigma_factor) == pytest.approx(sigma)
    W = adjacency_matrix(
        indices, distances, kernel=kernel, sigma_factor=sigma_factor, self_loops=False, dtype=np.float64
    )
    np.testing.assert_allclose(W.toarray(), np.array(expected), rtol=1e-12)
    W1 = adjacency_matrix(
        indices, distances, kernel=kernel, sigma_factor=sigma_factor, self_loops=True, dtype=np.float64
    )
    np.testing.assert_allclose(W1.toarray(), np.array(expected) + np.eye(n), rtol=1e-12)


def test_self_loops_change_normalized_only(knn):
    on = adjacency_matrix(*knn, self_loops=True)
    off = adjacency_matrix(*knn, self_loops=False)
    assert np.all(on.diagonal() == 1)
    assert np.all(off.diagonal() == 0)
    assert abs(on - off - sp.eye_array(on.shape[0])).max() == 0
    c_on = laplacian_matrix(on, laplacian="combinatorial")
    c_off = laplacian_matrix(off, laplacian="combinatorial")
    assert abs(c_on - c_off).max() == 0
    n_on = laplacian_matrix(on, laplacian="normalized")
    n_off = laplacian_matrix(off, laplacian="normalized")
    assert abs(n_on - n_off).max() > 1e-3
    np.testing.assert_allclose(n_off.diagonal(), 1, atol=1e-6)
    assert np.all(n_on.diagonal() < 1)


def test_self_entries_and_missing_neighbours_are_ignored(knn):
    indices, distances = knn
    n = indices.shape[0]
    with_self = np.hstack([np.arange(n)[:, None], indices])
    with_missing = np.hstack([indices, -np.ones((n, 1), dtype=indices.dtype)])
    # the K-th distance sets sigma: keep it the last column in both variants
    W = adjacency_matrix(indices, distances)
    W_self = adjacency_matrix(with_self, np.hstack([np.zeros((n, 1)), distances]))
    assert abs(W - W_self).max() == 0
    W_missing = adjacency_matrix(with_missing, np.hstack([distances, np.full((n, 1), np.inf)]))
    assert abs(W - W_missing).max() == 0


def test_isolated_node_has_zero_row():
    indices = np.array([[1], [0], [-1]])
    distances = np.array([[1.0], [1.0], [np.inf]])
    for kind in ("normalized", "combinatorial"):
        L = laplacian_from_neighbors(indices, distances, self_loops=False, laplacian=kind, dtype=np.float64)
        assert np.all(L.toarray()[2] == 0) and np.all(L.toarray()[:, 2] == 0)
        assert np.all(np.isfinite(L.data))
    L = laplacian_from_neighbors(indices, distances, self_loops=False, laplacian="normalized").toarray()
    np.testing.assert_allclose(L[:2, :2], [[1, -1], [-1, 1]], atol=1e-6)


def test_duplicate_frames_zero_sigma():
    indices = np.array([[1], [0]])
    distances = np.zeros((2, 1))
    W = adjacency_matrix(indices, distances, self_loops=False, dtype=np.float64).toarray()
    np.testing.assert_array_equal(W, [[0, 1], [1, 0]])
    assert np.all(kernel_weights(np.array([0.0, 2.0]), 0.0) == [1.0, 0.0])


def test_graph_options_from_config(knn):
    config = GraphConfig(kernel="gaussian", sigma_factor=2.0, self_loops=False, laplacian="combinatorial")
    L = laplacian_from_neighbors(*knn, **graph_options(config))
    expected = laplacian_from_neighbors(
        *knn, kernel="gaussian", sigma_factor=2.0, self_loops=False, laplacian="combinatorial"
    )
    assert abs(L - expected).max() == 0


def test_errors_name_the_parameter(knn):
    indices, distances = knn
    with pytest.raises(ValueError, match="kernel must be one of"):
        adjacency_matrix(indices, distances, kernel="cauchy")
    with pytest.raises(ValueError, match="laplacian must be one of"):
        laplacian_from_neighbors(indices, distances, laplacian="random-walk")
    with pytest.raises(ValueError, match="sigma_factor must be > 0"):
        adjacency_matrix(indices, distances, sigma_factor=0)
    with pytest.raises(ValueError, match="distances must have the shape"):
        adjacency_matrix(indices, distances[:, :2])
    with pytest.raises(ValueError, match="indices must be < n_samples"):
        adjacency_matrix(indices + 100, distances)
