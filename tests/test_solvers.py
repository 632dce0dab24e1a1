"""FISTA and the power iteration against closed forms and dense references."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from sae.solvers import LIPSCHITZ_SAFETY, fista, spectral_norm
from sae.terms import CodeEncoderFit, CodeReconstruction, L1Norm, inner, soft_threshold


def orthonormal_rows(rng, m, n):
    """C (m, n), m <= n, with C C^T = I."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return Q.T


def psd_matrix(rng, size, rank=None, gap=1.0):
    B = rng.standard_normal((size, rank or size))
    return B @ B.T * gap


# ---------------------------------------------------------------- spectral norm


def test_spectral_norm_dense_sparse_operator_and_callable(rng):
    A = psd_matrix(rng, 30)
    exact = np.linalg.eigvalsh(A).max()
    assert spectral_norm(A) == pytest.approx(exact, rel=1e-6)
    assert spectral_norm(sp.csr_array(A)) == pytest.approx(exact, rel=1e-6)
    assert spectral_norm(spla.aslinearoperator(A)) == pytest.approx(exact, rel=1e-6)
    assert spectral_norm(lambda v: A @ v, size=30) == pytest.approx(exact, rel=1e-6)
    assert spectral_norm(A.astype(np.float32)) == pytest.approx(exact, rel=1e-5)


def test_spectral_norm_of_a_graph_laplacian_and_zero(rng):
    W = (rng.random((200, 200)) < 0.05).astype(float)
    W = np.maximum(W, W.T)
    np.fill_diagonal(W, 0)
    d = W.sum(axis=1) + 1e-12
    L = np.diag(d) - W  # combinatorial Laplacian: clustered top of spectrum
    exact = np.linalg.eigvalsh(L).max()
    estimate = spectral_norm(sp.csr_array(L))
    assert estimate <= exact * (1 + 1e-12)  # power iteration approaches from below
    assert LIPSCHITZ_SAFETY * estimate >= exact  # the safety factor covers the gap
    assert spectral_norm(np.zeros((4, 4))) == 0.0


def test_spectral_norm_errors():
    with pytest.raises(ValueError, match="size is required"):
        spectral_norm(lambda v: v)
    with pytest.raises(ValueError, match="square"):
        spectral_norm(np.ones((2, 3)))


# ---------------------------------------------------------------- FISTA: closed forms


def test_lasso_with_orthogonal_design_reaches_soft_threshold(rng):
    # lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1 with C C^T = I: Z* = h_{lambda_z/lambda_d}(X C^T)
    X = rng.standard_normal((20, 9))
    C = orthonormal_rows(rng, 6, 9)
    lambda_d, lambda_z = 3.0, 2.0
    result = fista([CodeReconstruction(X, C, lambda_d)], L1Norm(lambda_z), np.zeros((20, 6)), rtol=1e-14, max_iter=2000)
    expected = soft_threshold(X @ C.T, lambda_z / lambda_d)
    assert np.count_nonzero(expected) not in (0, expected.size)
    np.testing.assert_allclose(result.solution, expected, atol=1e-8)


def test_ridge_with_two_quadratic_terms_and_no_prox(rng):
    # lambda_d/2 ||X - Z C||^2 + lambda_e/2 ||Z - X E^T||^2: normal equations
    X = rng.standard_normal((15, 6))
    C, E = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    lambda_d, lambda_e = 2.0, 0.5
    terms = [CodeReconstruction(X, C, lambda_d), CodeEncoderFit(X, E, lambda_e)]
    result = fista(terms, None, np.zeros((15, 4)), rtol=1e-15, max_iter=5000)
    lhs = lambda_d * C @ C.T + lambda_e * np.eye(4)
    rhs = lambda_d * X @ C.T + lambda_e * X @ E.T
    np.testing.assert_allclose(result.solution, np.linalg.solve(lhs, rhs.T).T, rtol=1e-6, atol=1e-8)


def test_objective_history_is_the_objective_of_the_iterates(rng):
    X = rng.standard_normal((10, 5))
    C = rng.standard_normal((7, 5))
    term, prox = CodeReconstruction(X, C, 2.0), L1Norm(0.5)
    for max_iter in (1, 2, 13):
        result = fista([term], prox, np.zeros((10, 7)), rtol=0, max_iter=max_iter)
        assert len(result.objective) == max_iter + 1
        direct = np.sum((X - result.solution @ C) ** 2) + 0.5 * np.abs(result.solution).sum()
        assert result.objective[-1] == pytest.approx(direct, rel=1e-12)
    assert result.objective[0] == pytest.approx(np.sum(X**2))


def test_no_blow_up_on_ill_conditioned_problem(rng):
    # singular values spread over 4 decades: a step above 1/||A|| would diverge
    U, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    C = (U[:, :20] * np.logspace(0, 2, 20)).T  # (20, 40)
    X = rng.standard_normal((8, 40))
    result = fista([CodeReconstruction(X, C, 1.0)], L1Norm(0.1), np.zeros((8, 20)), rtol=0, max_iter=300)
    F = result.objective
    assert np.all(np.isfinite(F))
    assert F.max() <= F[0]
    # FISTA's known bound: F(x_k) - F* <= 2 L ||x0 - x*||^2 / (k + 1)^2
    reference = fista([CodeReconstruction(X, C, 1.0)], L1Norm(0.1), result.solution, rtol=0, max_iter=3000)
    F_star = reference.objective.min()
    x_star = reference.solution
    L = LIPSCHITZ_SAFETY * np.linalg.norm(C @ C.T, 2)
    k = np.arange(len(F))
    assert np.all(F - F_star <= 2 * L * np.sum(x_star**2) / (k + 1) ** 2 + 1e-9 * abs(F_star))


# ---------------------------------------------------------------- FISTA: stopping and state


def lasso_problem(rng):
    X = rng.standard_normal((12, 6))
    C = rng.standard_normal((9, 6))
    return [CodeReconstruction(X, C, 1.0)], L1Norm(0.3), np.zeros((12, 9))


def test_stop_reason_rtol(rng):
    terms, prox, x0 = lasso_problem(rng)
    result = fista(terms, prox, x0, rtol=1e-6, max_iter=10_000)
    F = result.objective
    assert result.stop_reason == "rtol"
    assert abs(F[-1] - F[-2]) <= 1e-6 * abs(F[-1])
    changes = np.abs(np.diff(F[:-1]))
    assert np.all(changes > 1e-6 * np.abs(F[1:-1]))  # it did not stop too late
    assert result.n_iter == len(F) - 1 < 10_000


def test_stop_reason_atol(rng):
    terms, prox, x0 = lasso_problem(rng)
    result = fista(terms, prox, x0, rtol=0, atol=1e-3, max_iter=10_000)
    F = result.objective
    assert result.stop_reason == "atol"
    assert abs(F[-1] - F[-2]) <= 1e-3
    assert np.all(np.abs(np.diff(F[:-1])) > 1e-3)


def test_stop_reason_max_iter(rng):
    terms, prox, x0 = lasso_problem(rng)
    result = fista(terms, prox, x0, rtol=0, atol=0, max_iter=7)
    assert (result.stop_reason, result.n_iter, len(result.objective)) == ("max_iter", 7, 8)


def test_calls_are_independent_and_warm_start_helps(rng):
    terms, prox, x0 = lasso_problem(rng)
    x0_copy = x0.copy()
    first = fista(terms, prox, x0, rtol=1e-8, max_iter=5000)
    second = fista(terms, prox, x0, rtol=1e-8, max_iter=5000)
    np.testing.assert_array_equal(first.solution, second.solution)  # no state kept between calls
    np.testing.assert_array_equal(x0, x0_copy)  # x0 not modified
    accurate = fista(terms, prox, x0, rtol=0, max_iter=3000).solution
    warm = fista(terms, prox, accurate, rtol=1e-8, max_iter=5000)
    assert warm.n_iter < first.n_iter / 4
    assert warm.objective[-1] <= first.objective[-1] * (1 + 1e-8)


def test_never_returns_worse_than_the_start(rng):
    terms, prox, x0 = lasso_problem(rng)
    optimum = fista(terms, prox, x0, rtol=1e-12, max_iter=5000).solution
    for max_iter in range(1, 8):
        result = fista(terms, prox, optimum, rtol=0, max_iter=max_iter)
        value = terms[0].value(result.solution) + prox.value(result.solution)
        assert value <= result.objective[0] * (1 + 1e-12)


def test_float32_stays_float32(rng):
    terms, prox, x0 = lasso_problem(rng)
    X = terms[0].data.astype(np.float32)
    C = terms[0].components.astype(np.float32)
    result = fista([CodeReconstruction(X, C, 1.0)], prox, x0.astype(np.float32), rtol=0, max_iter=300)
    assert result.solution.dtype == np.float32
    reference = fista(terms, prox, x0, rtol=0, max_iter=300)
    assert result.objective[-1] == pytest.approx(reference.objective[-1], rel=1e-5)
    np.testing.assert_allclose(result.solution, reference.solution, atol=1e-4)


def test_zero_operator_uses_a_unit_step(rng):
    # Z = 0 makes the D-step operator vanish: the solver must stay finite and stop at once
    X = rng.standard_normal((5, 3))
    result = fista([CodeReconstruction(X, np.zeros((2, 3)), 1.0)], L1Norm(1.0), np.zeros((5, 2)), rtol=1e-6)
    assert result.stop_reason == "rtol" and result.n_iter == 1
    np.testing.assert_array_equal(result.solution, 0)


def test_invalid_arguments(rng):
    terms, prox, x0 = lasso_problem(rng)
    with pytest.raises(ValueError, match="at least one term"):
        fista([], prox, x0)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        fista(terms, prox, x0, max_iter=0)
    with pytest.raises(ValueError, match="rtol=-1"):
        fista(terms, prox, x0, rtol=-1)
    assert inner(x0, x0) == 0.0


def _coherent_lasso(rng, n_samples=300, n_features=30, n_atoms=60):
    """A lasso whose atoms are drawn from dense non-negative data: coherent, ill-conditioned."""
    data = np.sqrt(rng.random((n_samples, n_features)))
    atoms = data[rng.choice(n_samples, n_atoms, replace=False)]
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    return [CodeReconstruction(data, atoms, 10.0)], L1Norm(1.0), np.zeros((n_samples, n_atoms))


def test_restart_reaches_the_same_minimum_as_plain_fista(rng):
    terms, l1, x0 = _coherent_lasso(rng)
    plain = fista(terms, l1, x0, rtol=0.0, max_iter=6000, restart=False)
    restarted = fista(terms, l1, x0, rtol=0.0, max_iter=6000, restart=True)
    assert restarted.objective[-1] == pytest.approx(plain.objective[-1], rel=1e-9)
    np.testing.assert_allclose(restarted.solution, plain.solution, atol=1e-3)


def test_restart_needs_fewer_iterations_on_a_coherent_dictionary(rng):
    terms, l1, x0 = _coherent_lasso(rng)
    best = fista(terms, l1, x0, rtol=0.0, atol=0.0, max_iter=6000).objective.min()

    def iterations_to(target, restart):
        history = fista(terms, l1, x0, rtol=0.0, atol=0.0, max_iter=6000, restart=restart).objective
        return int(np.flatnonzero(history <= target)[0])

    target = best * (1 + 1e-6)
    assert iterations_to(target, restart=True) < 0.8 * iterations_to(target, restart=False)
