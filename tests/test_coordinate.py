"""Coordinate-descent Z step against scikit-learn's sparse_encode, FISTA and closed forms."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import sparse_encode

from sae.blas import blas_threads as _blas_threads
from sae.config import ModelConfig
from sae.coordinate import coordinate_descent_codes
from sae.model import fit_sae, init_encoder, solve_codes


def objective(X, Z, C, lambda_d, lambda_z, E=None, lambda_e=0.0):
    value = lambda_d / 2 * np.sum((X - Z @ C) ** 2) + lambda_z * np.abs(Z).sum()
    if E is not None and lambda_e > 0:
        value += lambda_e / 2 * np.sum((Z - X @ E.T) ** 2)
    return float(value)


def coherent_problem(rng, n_samples=60, n_features=10, n_atoms=14):
    """Non-negative frames and atoms drawn from them: a coherent dictionary, as in practice."""
    sources = rng.random((5, n_features))
    X = (rng.random((n_samples, 5)) * (rng.random((n_samples, 5)) < 0.5)) @ sources
    X += 0.05 * rng.random(X.shape)
    C = X[rng.choice(n_samples, n_atoms, replace=False)]
    C = C / np.linalg.norm(C, axis=1, keepdims=True)
    return X, C


def cd(X, C, Z0=None, *, E=None, **kw):
    kw.setdefault("lambda_d", 10.0)
    kw.setdefault("lambda_z", 1.0)
    Z0 = np.zeros((len(X), len(C)), dtype=X.dtype) if Z0 is None else Z0
    return coordinate_descent_codes(X, C, E, Z0, **kw)


@pytest.mark.parametrize("lambda_e", [0.0, 2.0])
def test_matches_sklearn_sparse_encode_and_fista(rng, lambda_e):
    X, C = coherent_problem(rng)
    E = init_encoder(len(C), X.shape[1], rng=rng, dtype=np.float64) if lambda_e else None
    lambda_d, lambda_z = 10.0, 1.0
    # sparse_encode minimises 1/2 ||x_a - z D_a||^2 + alpha ||z||_1 per row; with
    # x_a = [sqrt(lambda_d) x, sqrt(lambda_e) E x], D_a = [sqrt(lambda_d) C, sqrt(lambda_e) I] and
    # alpha = lambda_z that is exactly our frame objective
    X_aug, D_aug = np.sqrt(lambda_d) * X, np.sqrt(lambda_d) * C
    if lambda_e:
        X_aug = np.hstack([X_aug, np.sqrt(lambda_e) * X @ E.T])
        D_aug = np.hstack([D_aug, np.sqrt(lambda_e) * np.eye(len(C))])
    reference = sparse_encode(X_aug, D_aug, algorithm="lasso_cd", alpha=lambda_z, max_iter=100_000)
    fista = solve_codes(X, C, E, None, np.zeros((len(X), len(C))), lambda_d=lambda_d, lambda_z=lambda_z,
                        lambda_e=lambda_e, rtol=1e-13, max_iter=50_000, method="fista").solution
    ours = cd(X, C, E=E, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, rtol=1e-10, n_threads=1)
    values = {name: objective(X, Z, C, lambda_d, lambda_z, E, lambda_e)
              for name, Z in (("sklearn", reference), ("fista", fista), ("cd", ours.solution))}
    assert values["cd"] == pytest.approx(values["sklearn"], rel=1e-4)
    assert values["cd"] == pytest.approx(values["fista"], rel=1e-4)
    assert values["cd"] <= min(values["sklearn"], values["fista"]) * (1 + 1e-9)  # the most accurate of the three
    assert ours.stop_reason == "rtol" and ours.objective[-1] == pytest.approx(values["cd"], rel=1e-10)
    assert 0 < np.count_nonzero(ours.solution) < ours.solution.size


def test_solution_satisfies_the_lasso_optimality_conditions(rng):
    X, C = coherent_problem(rng)
    lambda_d, lambda_z = 10.0, 1.0
    Z = cd(X, C, rtol=1e-12, n_threads=1).solution
    q = lambda_d * (X - Z @ C) @ C.T  # b - G z, row by row
    on = Z != 0
    np.testing.assert_allclose(q[on], lambda_z * np.sign(Z[on]), atol=1e-7)
    assert np.all(np.abs(q[~on]) <= lambda_z + 1e-7)


def test_objective_history_and_stop_reasons(rng):
    X, C = coherent_problem(rng)
    result = cd(X, C, rtol=1e-8)
    history = result.objective
    assert history.dtype == np.float64 and len(history) == result.n_iter + 1
    assert history[0] == pytest.approx(objective(X, np.zeros((len(X), len(C))), C, 10.0, 1.0), rel=1e-12)
    assert history[-1] == pytest.approx(objective(X, result.solution, C, 10.0, 1.0), rel=1e-10)
    assert np.all(np.diff(history) <= 1e-12 * history[0])
    capped = cd(X, C, rtol=1e-12, max_iter=1)
    assert capped.n_iter == 1 and capped.stop_reason == "max_iter"
    loose = cd(X, C, rtol=0.0, atol=1e3)
    assert loose.stop_reason == "atol" and loose.n_iter == 1


def test_float32_is_close_to_float64(rng):
    X, C = coherent_problem(rng)
    Z64 = cd(X, C, rtol=1e-9).solution
    result32 = cd(X.astype(np.float32), C.astype(np.float32), rtol=1e-6)
    Z32 = result32.solution
    assert Z32.dtype == np.float32 and result32.stop_reason == "rtol"
    F64, F32 = objective(X, Z64, C, 10.0, 1.0), objective(X, Z32.astype(np.float64), C, 10.0, 1.0)
    assert F32 == pytest.approx(F64, rel=1e-5)
    np.testing.assert_allclose(Z32 @ C, Z64 @ C, atol=1e-3)  # the reconstruction is unique, the codes may not be


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_frame_does_not_depend_on_the_batch_threads_or_order(rng, dtype):
    X, C = coherent_problem(rng, n_samples=90)
    X, C = X.astype(dtype), C.astype(dtype)
    full = cd(X, C).solution  # parallel over chunks of frames
    np.testing.assert_array_equal(cd(X[:7], C, n_threads=1).solution, full[:7])
    np.testing.assert_array_equal(cd(X[40:41], C).solution, full[40:41])
    order = rng.permutation(len(X))
    np.testing.assert_array_equal(cd(X[order], C, n_threads=1).solution, full[order])
    blocks = np.vstack([cd(X[a:b], C, n_threads=2).solution for a, b in ((0, 33), (33, 34), (34, 90))])
    np.testing.assert_array_equal(blocks, full)


def test_zero_codes_exactly_when_the_correlations_are_below_lambda_z(rng):
    # closed form: z = 0 is optimal iff ||b||_inf <= lambda_z, b = lambda_d C x
    X, C = coherent_problem(rng)
    X[3] = 0.0
    lambda_d = 10.0
    b_inf = np.abs(lambda_d * X @ C.T).max(axis=1)
    lambda_z = float(np.median(b_inf))
    Z = cd(X, C, lambda_d=lambda_d, lambda_z=lambda_z, n_threads=1).solution
    zero_rows = ~Z.any(axis=1)
    np.testing.assert_array_equal(zero_rows, b_inf <= lambda_z)
    assert zero_rows[3]
    huge = cd(X, C, lambda_d=lambda_d, lambda_z=1.01 * b_inf.max(), Z0=np.ones((len(X), len(C))), n_threads=1)
    assert not huge.solution.any() and huge.stop_reason == "rtol"


@pytest.mark.parametrize("lambda_e", [0.0, 1.5])
def test_one_atom_is_a_soft_threshold(rng, lambda_e):
    X = rng.standard_normal((25, 6))
    c = rng.standard_normal((1, 6))
    e = rng.standard_normal((1, 6))
    lambda_d, lambda_z = 3.0, 2.0
    Z = cd(X, c, E=e, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, n_threads=1).solution
    b = lambda_d * X @ c.T + lambda_e * X @ e.T
    expected = np.sign(b) * np.maximum(np.abs(b) - lambda_z, 0) / (lambda_d * np.sum(c**2) + lambda_e)
    np.testing.assert_allclose(Z, expected, rtol=1e-12, atol=1e-15)
    assert np.count_nonzero(expected) not in (0, expected.size)


def test_warm_start_from_the_optimum_stops_after_one_sweep(rng):
    X, C = coherent_problem(rng)
    optimum = cd(X, C, rtol=1e-12, n_threads=1).solution
    again = cd(X, C, optimum, rtol=1e-8, n_threads=1)
    assert again.n_iter == 1 and again.stop_reason == "rtol"
    np.testing.assert_allclose(again.solution, optimum, atol=1e-12)


def test_duplicated_and_zero_atoms(rng):
    # a duplicated atom makes the support's Gram block singular (coordinate sweeps replace the
    # Newton steps); a zero atom has G_jj = 0 and gets a zero code
    X, C = coherent_problem(rng)
    C = np.vstack([C, C[:2], np.zeros((1, C.shape[1]))])
    Z = cd(X, C, rtol=1e-10, Z0=np.ones((len(X), len(C))), n_threads=1).solution
    reference = sparse_encode(X, C, algorithm="lasso_cd", alpha=0.1, max_iter=100_000)
    assert objective(X, Z, C, 10.0, 1.0) == pytest.approx(objective(X, reference, C, 10.0, 1.0), rel=1e-6)
    assert not Z[:, -1].any()


def test_solve_codes_methods(rng):
    X, C = coherent_problem(rng, n_samples=20)
    Z0 = np.zeros((20, len(C)))
    kw = {"lambda_d": 10.0, "lambda_z": 1.0, "rtol": 1e-6}
    auto = solve_codes(X, C, None, None, Z0, **kw)
    np.testing.assert_array_equal(auto.solution, solve_codes(X, C, None, None, Z0, method="cd", **kw).solution)
    np.testing.assert_array_equal(auto.solution, cd(X, C, **kw).solution)
    L = sp.csr_array(np.eye(20) - np.full((20, 20), 1 / 20))
    graph = solve_codes(X, C, None, L, Z0, lambda_g=1.0, **kw)
    fista = solve_codes(X, C, None, L, Z0, lambda_g=1.0, method="fista", **kw)
    np.testing.assert_array_equal(graph.solution, fista.solution)
    with pytest.raises(ValueError, match="method='cd' needs lambda_g = 0.*got lambda_g=1.0"):
        solve_codes(X, C, None, L, Z0, lambda_g=1.0, method="cd", **kw)
    with pytest.raises(ValueError, match="method must be one of 'auto', 'fista', 'cd', 'lars', got 'spams'"):
        solve_codes(X, C, None, None, Z0, method="spams", **kw)


def test_invalid_arguments_name_the_parameter(rng):
    X, C = coherent_problem(rng, n_samples=20)
    with pytest.raises(ValueError, match=r"n_threads must be None or an integer in \[1, \d+\].*got 0"):
        cd(X, C, n_threads=0)
    with pytest.raises(ValueError, match=r"Z0 must have shape \(n_samples, n_atoms\) = \(20, 14\), got \(20, 3\)"):
        cd(X, C, np.zeros((20, 3)))
    with pytest.raises(ValueError, match="encoder is required when lambda_e > 0"):
        cd(X, C, lambda_e=1.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        cd(X, C, max_iter=0)
    with pytest.raises(ValueError, match="rtol must be >= 0, got -1"):
        cd(X, C, rtol=-1)


def test_fit_sae_with_either_z_solver_reaches_the_same_objective(rng):
    X, _ = coherent_problem(rng, n_samples=80)
    totals = {}
    for solver in ("cd", "fista"):
        config = ModelConfig(n_atoms=6, max_outer=15, inner_rtol=1e-9, max_inner=3000, z_solver=solver,
                             dtype="float64", random_state=0)
        fit = fit_sae(X, config)
        totals[solver] = fit.history[-1]["total"]
        assert fit.history[-1]["stop_codes"] == "rtol"
    assert totals["cd"] == pytest.approx(totals["fista"], rel=1e-3)
    with pytest.raises(ValueError, match="z_solver"):
        ModelConfig(z_solver="spams")
    with pytest.raises(ValueError, match="z_solver='cd' needs lambda_g = 0.*got lambda_g=1.0"):
        ModelConfig(z_solver="cd", lambda_g=1.0)
    assert ModelConfig(lambda_g=1.0).z_solver == "auto"


def test_concurrent_calls_from_threads_agree_with_sequential_ones(rng):
    # as in a Dask worker with several threads: serial kernels run side by side (no GIL), parallel ones
    # are serialised by a lock
    from concurrent.futures import ThreadPoolExecutor

    X, C = coherent_problem(rng, n_samples=80)
    expected = cd(X, C).solution
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda k=k: cd(X, C, n_threads=1 if k % 2 else None).solution) for k in range(8)]
        for future in futures:
            np.testing.assert_array_equal(future.result(), expected)


def test_one_blas_thread_inside_the_solvers_and_the_limit_is_lifted_after(rng):
    """The per-frame solvers run their products with BLAS on one thread (in the main thread: OpenBLAS ignores
    a count set from any other once the main thread has set one, so other threads leave the setting alone);
    nested uses share the limit, lifted when the outermost ends."""
    from concurrent.futures import ThreadPoolExecutor

    from sae import coordinate
    from sae.blas import one_blas_thread

    before = _blas_threads()
    if before == [1]:
        pytest.skip("BLAS runs on one thread in this process already (OPENBLAS_NUM_THREADS=1?)")
    seen = []

    def solve_and_look():
        inside = []
        original = coordinate.checked_frame_problem

        def look(*args, **kwargs):
            inside.append(_blas_threads())
            return original(*args, **kwargs)

        coordinate.checked_frame_problem = look
        try:
            cd(*coherent_problem(rng))
        finally:
            coordinate.checked_frame_problem = original
        return inside[0]

    with one_blas_thread():
        seen.append(_blas_threads())
        with one_blas_thread():
            seen.append(_blas_threads())
        seen.append(_blas_threads())
    assert seen == [[1]] * 3 and _blas_threads() == before
    assert solve_and_look() == [1] and _blas_threads() == before
    with ThreadPoolExecutor(1) as pool:  # another thread: no change (OpenBLAS keeps the main thread's count)
        assert pool.submit(solve_and_look).result() == before
    assert _blas_threads() == before
