"""FISTA and the power iteration against closed forms and dense references."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.optimize import minimize
from sklearn.linear_model import Lasso

from sae.model import solve_codes
from sae.solvers import GAP_EVERY, LIPSCHITZ_SAFETY, duality_gap, fista, spectral_norm
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


# ---------------------------------------------------------------- the duality gap of the Z step


class CodeStep:
    """A tiny Z step in float64, written out densely: f(Z) = lambda_d/2 ||X - Z C||^2 + lambda_e/2 ||Z - X E^T||^2
    + lambda_g/2 tr(Z^T L Z), P(Z) = f(Z) + lambda_z ||Z||_1."""

    def __init__(self, rng, n_samples=8, n_atoms=3, n_features=4, lambda_g=2.0, lambda_e=1.5):
        self.X = rng.random((n_samples, n_features))
        self.C = rng.random((n_atoms, n_features))
        self.E = rng.random((n_atoms, n_features))
        W = rng.random((n_samples, n_samples)) * (rng.random((n_samples, n_samples)) < 0.5)
        W = np.triu(W, 1) + np.triu(W, 1).T + np.eye(n_samples)
        d = W.sum(axis=1)
        self.L = np.eye(n_samples) - W / np.sqrt(np.outer(d, d))
        self.lambda_d, self.lambda_z, self.lambda_g, self.lambda_e = 3.0, 2.0, lambda_g, lambda_e
        self.shape = (n_samples, n_atoms)

    def smooth(self, Z):
        R, S = self.X - Z @ self.C, Z - self.X @ self.E.T
        return (self.lambda_d * np.sum(R**2) + self.lambda_e * np.sum(S**2) + self.lambda_g * np.trace(Z.T @ self.L @ Z)) / 2

    def gradient(self, Z):
        return (self.lambda_d * (Z @ self.C - self.X) @ self.C.T + self.lambda_e * (Z - self.X @ self.E.T)
                + self.lambda_g * self.L @ Z)

    def objective(self, Z):
        return self.smooth(Z) + self.lambda_z * np.abs(Z).sum()

    def gap(self, Z, W=None):
        """The duality gap of Z with the dual point of W (default Z), by sae.solvers.duality_gap."""
        W = Z if W is None else W
        G = self.gradient(W)
        return duality_gap(self.smooth(W), np.abs(W).sum(), float(np.sum(W * G)), np.abs(G).max(), self.lambda_z,
                           self.objective(Z))

    def minimiser(self):
        """The minimiser by an independent solver: L-BFGS-B on Z = U - V, U, V >= 0 (a smooth problem)."""
        size = np.prod(self.shape)

        def fun(uv):
            Z = (uv[:size] - uv[size:]).reshape(self.shape)
            G = self.gradient(Z).ravel()
            return self.smooth(Z) + self.lambda_z * uv.sum(), np.concatenate([G + self.lambda_z, -G + self.lambda_z])

        result = minimize(fun, np.zeros(2 * size), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * size),
                          options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 100_000, "maxcor": 50})
        Z = (result.x[:size] - result.x[size:]).ravel()
        # polished to working precision: f is quadratic, f(z) = 1/2 z^T H z - b^T z + c in vec(Z), so on the
        # support S with signs s the minimiser solves H_SS z_S = b_S - lambda_z s (an exact active-set step)
        b = -self.gradient(np.zeros(self.shape)).ravel()
        H = np.column_stack([self.gradient(e.reshape(self.shape)).ravel() + b for e in np.eye(size)])
        support = np.abs(Z) > 1e-8
        signs = np.sign(Z[support])
        Z[:] = 0
        Z[support] = np.linalg.solve(H[np.ix_(support, support)], b[support] - self.lambda_z * signs)
        assert np.array_equal(np.sign(Z[support]), signs)  # same orthant, and the other coordinates stay at 0:
        assert np.abs(H[~support] @ Z - b[~support]).max(initial=0.0) <= self.lambda_z
        return Z.reshape(self.shape)

    def solve(self, **kw):
        return solve_codes(self.X, self.C, self.E if self.lambda_e else None, sp.csr_array(self.L) if self.lambda_g
                           else None, np.zeros(self.shape), lambda_d=self.lambda_d, lambda_z=self.lambda_z,
                           lambda_g=self.lambda_g, lambda_e=self.lambda_e, method="fista", **kw)


@pytest.mark.parametrize("lambda_g, lambda_e", [(2.0, 1.5), (2.0, 0.0), (0.0, 1.5)])
def test_the_duality_gap_bounds_the_suboptimality_and_equals_it_with_the_optimal_dual_point(rng, lambda_g, lambda_e):
    problem = CodeStep(rng, lambda_g=lambda_g, lambda_e=lambda_e)
    Z_star = problem.minimiser()
    P_star = problem.objective(Z_star)
    assert 0 < np.count_nonzero(np.abs(Z_star) > 1e-9) < Z_star.size  # a sparse optimum: the l1 term is active
    assert problem.gap(Z_star) <= 1e-9 * P_star  # 0 at the optimum
    for scale in (1.0, 0.1, 0.01, 1e-4):
        Z = Z_star + scale * rng.standard_normal(Z_star.shape)
        suboptimality = problem.objective(Z) - P_star
        assert suboptimality >= -1e-12 * P_star
        assert problem.gap(Z) >= suboptimality - 1e-12 * P_star  # an upper bound, from Z's own dual point
        assert problem.gap(Z, Z_star) == pytest.approx(suboptimality, rel=1e-6, abs=1e-10 * P_star)  # and exact
        assert problem.gap(Z, Z + scale * rng.standard_normal(Z.shape)) >= suboptimality - 1e-12 * P_star


def test_the_duality_gap_against_scikit_learn_lasso_without_graph(rng):
    # no graph, no encoder: the Z step is a lasso per frame; sklearn's Lasso minimises
    # 1/(2 n) ||x - C^T z||^2 + alpha ||z||_1, our lambda_d/2 ||x - C^T z||^2 + lambda_z ||z||_1 / (lambda_d n)
    problem = CodeStep(rng, n_samples=10, n_atoms=5, lambda_g=0.0, lambda_e=0.0)
    n = problem.X.shape[1]
    lasso = Lasso(alpha=problem.lambda_z / (problem.lambda_d * n), fit_intercept=False, tol=1e-14, max_iter=100_000)
    Z_star = np.array([lasso.fit(problem.C.T, x).coef_ for x in problem.X])
    P_star = problem.objective(Z_star)
    assert problem.gap(Z_star) <= 1e-9 * P_star
    Z = Z_star + 0.05 * rng.standard_normal(Z_star.shape)
    assert problem.gap(Z, Z_star) == pytest.approx(problem.objective(Z) - P_star, rel=1e-6)
    result = problem.solve(rtol=1e-8, max_iter=100_000, stop="gap")
    assert result.stop_reason == "rtol"
    assert 0 <= problem.objective(result.solution) - P_star <= result.gap <= 1e-8 * result.objective[-1]


def test_fista_stops_on_a_certified_gap(rng):
    problem = CodeStep(rng)
    P_star = problem.objective(problem.minimiser())
    for rtol in (1e-3, 1e-6, 1e-9):
        result = problem.solve(rtol=rtol, max_iter=100_000, stop="gap")
        F = problem.objective(result.solution)
        assert result.stop_reason == "rtol" and result.n_iter % GAP_EVERY == 0
        assert F == pytest.approx(result.objective[-1], rel=1e-12)
        assert F - P_star <= result.gap <= rtol * F  # certified: within rtol of the minimum
    # the change rule stops far earlier, where the objective is not yet within rtol of the minimum
    change = problem.solve(rtol=1e-3, max_iter=100_000, stop="change")
    assert change.n_iter < result.n_iter and np.isnan(change.gap)

