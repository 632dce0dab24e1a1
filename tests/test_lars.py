"""The homotopy (LARS-lasso) Z step against scikit-learn's LARS and coordinate descent, coordinate descent
certified to a tight gap, the lasso's optimality conditions and closed forms."""

import numpy as np
import pytest
from sklearn.decomposition import sparse_encode

from sae.config import ModelConfig
from sae.coordinate import coordinate_descent_codes
from sae.lars import lars_codes
from sae.model import fit_sae, init_encoder, solve_codes
from tests.test_coordinate import coherent_problem, objective


def lars(X, C, Z0=None, *, E=None, **kw):
    kw.setdefault("lambda_d", 10.0)
    kw.setdefault("lambda_z", 1.0)
    Z0 = np.zeros((len(X), len(C)), dtype=X.dtype) if Z0 is None else Z0
    return lars_codes(X, C, E, Z0, **kw)


def augmented(X, C, E, lambda_d, lambda_e):
    """sparse_encode's problem (1/2 ||x_a - z D_a||^2 + alpha ||z||_1 per row) equal to our frame objective."""
    X_aug, D_aug = np.sqrt(lambda_d) * X, np.sqrt(lambda_d) * C
    if lambda_e:
        X_aug = np.hstack([X_aug, np.sqrt(lambda_e) * X @ E.T])
        D_aug = np.hstack([D_aug, np.sqrt(lambda_e) * np.eye(len(C))])
    return X_aug, D_aug


@pytest.mark.parametrize("lambda_e", [0.0, 2.0])
@pytest.mark.parametrize("lambda_z", [1.0, 0.03])
def test_matches_sklearn_lasso_lars_and_coordinate_descent(rng, lambda_e, lambda_z):
    X, C = coherent_problem(rng)
    E = init_encoder(len(C), X.shape[1], rng=rng, dtype=np.float64) if lambda_e else None
    lambda_d = 10.0
    X_aug, D_aug = augmented(X, C, E, lambda_d, lambda_e)
    reference = sparse_encode(X_aug, D_aug, algorithm="lasso_lars", alpha=lambda_z)
    exact = coordinate_descent_codes(X, C, E, np.zeros((len(X), len(C))), lambda_d=lambda_d, lambda_z=lambda_z,
                                     lambda_e=lambda_e, rtol=1e-13, max_iter=100_000, n_threads=1).solution
    ours = lars(X, C, E=E, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, rtol=1e-10)
    values = {name: objective(X, Z, C, lambda_d, lambda_z, E, lambda_e)
              for name, Z in (("sklearn", reference), ("cd", exact), ("lars", ours.solution))}
    assert values["lars"] == pytest.approx(values["sklearn"], rel=1e-6)
    assert values["lars"] == pytest.approx(values["cd"], rel=1e-9)
    assert ours.stop_reason == "rtol" and ours.objective[-1] == pytest.approx(values["lars"], rel=1e-10)
    at_zero = objective(X, np.zeros_like(exact), C, lambda_d, lambda_z, E, lambda_e)
    assert ours.objective[0] == pytest.approx(at_zero, rel=1e-12)
    if lambda_e:  # strictly convex: one solution
        np.testing.assert_allclose(ours.solution, exact, atol=1e-8)
    assert 0 < np.count_nonzero(ours.solution) < ours.solution.size


def test_overcomplete_dictionary_at_a_small_lambda_z(rng):
    # m = 48 atoms on n = 12 bins and lambda_e = 0: G is singular and the solutions have up to n non-zeros,
    # the case where coordinate descent is slow; the path must give the certified minimum
    X = rng.random((40, 12))
    C = rng.random((48, 12))
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    kw = {"lambda_d": 10.0, "lambda_z": 0.01}
    ours = lars(X, C, rtol=1e-9, **kw)
    reference = coordinate_descent_codes(X, C, None, np.zeros((40, 48)), rtol=1e-12, max_iter=200_000,
                                         n_threads=1, **kw)
    assert ours.stop_reason == "rtol"
    F = objective(X, ours.solution, C, **kw)
    assert F == pytest.approx(objective(X, reference.solution, C, **kw), rel=1e-8)
    assert np.count_nonzero(ours.solution, axis=1).max() <= 12
    q = kw["lambda_d"] * (X - ours.solution @ C) @ C.T  # optimality: q = lambda_z sign(z) on, |q| <= lambda_z off
    on = ours.solution != 0
    np.testing.assert_allclose(q[on], kw["lambda_z"] * np.sign(ours.solution[on]), atol=1e-6)
    assert np.all(np.abs(q[~on]) <= kw["lambda_z"] * (1 + 1e-6))


def test_a_frame_does_not_depend_on_the_batch_threads_or_order(rng):
    X, C = coherent_problem(rng, n_samples=90)
    X, C = X.astype(np.float32), C.astype(np.float32)
    full = lars(X, C).solution
    assert full.dtype == np.float32
    np.testing.assert_array_equal(lars(X[:7], C, n_threads=1).solution, full[:7])
    order = rng.permutation(len(X))
    np.testing.assert_array_equal(lars(X[order], C, n_threads=2).solution, full[order])


def test_closed_forms_zero_codes_and_one_atom(rng):
    X, C = coherent_problem(rng)
    X[3] = 0.0
    lambda_d = 10.0
    b_inf = np.abs(lambda_d * X @ C.T).max(axis=1)
    lambda_z = float(np.median(b_inf))
    Z = lars(X, C, lambda_z=lambda_z).solution
    np.testing.assert_array_equal(~Z.any(axis=1), b_inf <= lambda_z)
    # one atom: the soft threshold of b over G
    c, e = rng.standard_normal((1, 6)), rng.standard_normal((1, 6))
    Y = rng.standard_normal((25, 6))
    Z1 = lars(Y, c, E=e, lambda_d=3.0, lambda_z=2.0, lambda_e=1.5).solution
    b = 3.0 * Y @ c.T + 1.5 * Y @ e.T
    np.testing.assert_allclose(Z1, np.sign(b) * np.maximum(np.abs(b) - 2.0, 0) / (3.0 * np.sum(c**2) + 1.5),
                               rtol=1e-12, atol=1e-15)


def test_duplicated_and_zero_atoms_are_finished_and_certified(rng):
    X, C = coherent_problem(rng)
    C = np.vstack([C, C[:2], np.zeros((1, C.shape[1]))])
    result = lars(X, C, rtol=1e-10)
    reference = sparse_encode(X, C, algorithm="lasso_cd", alpha=0.1, max_iter=100_000)
    F = objective(X, result.solution, C, 10.0, 1.0)
    assert F == pytest.approx(objective(X, reference, C, 10.0, 1.0), rel=1e-6)
    assert result.stop_reason == "rtol" and not result.solution[:, -1].any()


def test_through_solve_codes_config_and_fit(rng):
    X, C = coherent_problem(rng, n_samples=30)
    kw = {"lambda_d": 10.0, "lambda_z": 0.3, "rtol": 1e-9}
    Z0 = np.zeros((30, len(C)))
    via = solve_codes(X, C, None, None, Z0, method="lars", **kw).solution
    np.testing.assert_array_equal(via, lars(X, C, **kw).solution)
    with pytest.raises(ValueError, match="needs lambda_g = 0"):
        solve_codes(X, C, None, np.eye(30), Z0, lambda_g=1.0, method="lars", **kw)
    with pytest.raises(ValueError, match="z_solver='lars' needs lambda_g = 0"):
        ModelConfig(lambda_g=1.0, z_solver="lars")
    totals = {}
    for solver in ("cd", "lars"):
        config = ModelConfig(n_atoms=6, lambda_z=0.3, max_outer=10, inner_rtol=1e-9, max_inner=3000, z_solver=solver,
                             dtype="float64", random_state=0)
        fit = fit_sae(X, config)
        totals[solver] = fit.history[-1]["total"]
        assert fit.history[-1]["stop_codes"] == "rtol"
    assert totals["lars"] == pytest.approx(totals["cd"], rel=1e-6)


def test_invalid_arguments_name_the_parameter(rng):
    X, C = coherent_problem(rng, n_samples=20)
    with pytest.raises(ValueError, match="lambda_z must be >= 0"):
        lars(X, C, lambda_z=-1.0)
    with pytest.raises(ValueError, match="Z0 must have shape"):
        lars(X, C, np.zeros((4, len(C))))
    with pytest.raises(ValueError, match="encoder is required"):
        lars(X, C, lambda_e=1.0)
    empty = lars(X[:0], C)
    assert empty.solution.shape == (0, len(C)) and empty.stop_reason == "rtol" and empty.n_iter == 0
