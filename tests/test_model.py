"""The alternating fit and its sub-problems, against scikit-learn and closed forms."""

import logging
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import DictionaryLearning, sparse_encode
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import NearestNeighbors

from sae.config import ModelConfig
from sae.model import (
    encode_direct,
    fit_sae,
    init_dictionary,
    init_encoder,
    objective_terms,
    sample_dictionary,
    solve_codes,
    solve_dictionary,
    solve_encoder,
)
from sae.terms import project_rows_to_ball, soft_threshold


def our_objective(X, Z, C, lambda_d, lambda_z):
    return lambda_d / 2 * np.sum((X - Z @ C) ** 2) + lambda_z * np.abs(Z).sum()


def knn_laplacian(X, k):
    """Normalised Laplacian of a symmetrised kNN graph with Gaussian weights (dense -> CSR)."""
    distances, indices = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    sigma = distances[:, -1].mean()
    W = np.zeros((len(X), len(X)))
    rows = np.repeat(np.arange(len(X)), k + 1)
    W[rows, indices.ravel()] = np.exp(-distances.ravel() ** 2 / (2 * sigma**2))
    W = np.maximum(W, W.T)
    d = W.sum(axis=1)
    return sp.csr_array(np.eye(len(X)) - W / np.sqrt(np.outer(d, d)))


def random_laplacian(rng, size):
    W = rng.random((size, size)) * (rng.random((size, size)) < 0.2)
    W = np.maximum(W, W.T)
    np.fill_diagonal(W, 1)
    d = W.sum(axis=1)
    return sp.csr_array(np.eye(size) - W / np.sqrt(np.outer(d, d)))


# ---------------------------------------------------------------- Z step


def test_code_step_matches_sklearn_sparse_encode(rng):
    # sparse_encode's lasso_cd minimises 1/(2 n_features) ||x - C^T z||^2 + (alpha / n_features) ||z||_1
    # per sample (it divides alpha by n_features), i.e. 1/2 ||X - Z C||^2 + alpha ||Z||_1:
    # our lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1 divided by lambda_d gives alpha = lambda_z / lambda_d.
    X = rng.random((40, 8))
    C = init_dictionary(12, 8, rng=rng, dtype=np.float64)
    lambda_d, lambda_z = 10.0, 1.0
    reference = sparse_encode(X, C, algorithm="lasso_cd", alpha=lambda_z / lambda_d, max_iter=10_000)
    ours = solve_codes(X, C, None, None, np.zeros((40, 12)), lambda_d=lambda_d, lambda_z=lambda_z,
                       rtol=1e-12, max_iter=20_000).solution
    F_ref = our_objective(X, reference, C, lambda_d, lambda_z)
    F_ours = our_objective(X, ours, C, lambda_d, lambda_z)
    assert F_ours == pytest.approx(F_ref, rel=1e-4)
    assert 0 < np.count_nonzero(ours) < ours.size


def test_code_step_with_all_terms_is_optimal(rng):
    # first-order optimality of the full Z step: Z = h_{lz/beta}(Z - grad/beta) at the fixed point
    X = rng.random((20, 5))
    C, E = init_dictionary(6, 5, rng=rng, dtype=np.float64), init_encoder(6, 5, rng=rng, dtype=np.float64)
    L = random_laplacian(rng, 20)
    kw = dict(lambda_d=3.0, lambda_z=0.5, lambda_g=2.0, lambda_e=1.5)
    Z = solve_codes(X, C, E, L, np.zeros((20, 6)), rtol=0, max_iter=5000, **kw).solution
    grad = kw["lambda_d"] * (Z @ C - X) @ C.T + kw["lambda_e"] * (Z - X @ E.T) + kw["lambda_g"] * (L @ Z)
    step = 0.01
    np.testing.assert_allclose(soft_threshold(Z - step * grad, step * kw["lambda_z"]), Z, atol=1e-9)


def test_encode_direct_is_the_code_step_without_reconstruction(rng):
    X = rng.random((15, 5))
    E = init_encoder(7, 5, rng=rng, dtype=np.float64)
    direct = encode_direct(X, E, lambda_z=0.4, lambda_e=2.0)
    solved = solve_codes(X, np.zeros((7, 5)), E, None, np.zeros((15, 7)), lambda_d=0.0, lambda_z=0.4,
                         lambda_e=2.0, rtol=0, max_iter=50).solution
    np.testing.assert_allclose(direct, solved, atol=1e-12)
    with pytest.raises(ValueError, match="lambda_e must be > 0.*got 0"):
        encode_direct(X, E, lambda_z=1.0, lambda_e=0.0)


# ---------------------------------------------------------------- D and E steps from statistics


def test_dictionary_step_closed_form_with_orthonormal_codes(rng):
    # Z^T Z = I: lambda_d/2 ||C||^2 - lambda_d <C, Z^T X> + const, minimised on the balls by P(Z^T X)
    Z, _ = np.linalg.qr(rng.standard_normal((50, 6)))
    X = rng.standard_normal((50, 4)) * 3
    result = solve_dictionary(Z.T @ Z, Z.T @ X, np.zeros((6, 4)), lambda_d=2.0, rtol=0, max_iter=100)
    np.testing.assert_allclose(result.solution, project_rows_to_ball(Z.T @ X), atol=1e-10)


def test_dictionary_step_objective_is_the_term_and_blocks_reduce(rng):
    X = rng.random((60, 5))
    Z = rng.random((60, 7)) * (rng.random((60, 7)) < 0.5)
    C0 = init_dictionary(7, 5, rng=rng, dtype=np.float64)
    # statistics reduced over two blocks of frames equal the full ones
    ZtZ = Z[:25].T @ Z[:25] + Z[25:].T @ Z[25:]
    ZtX = Z[:25].T @ X[:25] + Z[25:].T @ X[25:]
    result = solve_dictionary(ZtZ, ZtX, C0, lambda_d=4.0, rtol=1e-12, max_iter=3000, data_sq_norm=np.sum(X**2))
    C = result.solution
    assert result.objective[-1] == pytest.approx(2.0 * np.sum((X - Z @ C) ** 2), rel=1e-10)
    assert np.all(np.linalg.norm(C, axis=1) <= 1 + 1e-12)
    # optimality on the balls: C = P(C - step grad)
    grad = 4.0 * (Z.T @ Z @ C - Z.T @ X)
    np.testing.assert_allclose(project_rows_to_ball(C - 1e-3 * grad), C, atol=1e-7)


def test_encoder_step_closed_form_with_orthonormal_data(rng):
    X, _ = np.linalg.qr(rng.standard_normal((40, 5)))
    Z = rng.standard_normal((40, 8))
    result = solve_encoder(X.T @ X, Z.T @ X, np.zeros((8, 5)), lambda_e=3.0, rtol=0, max_iter=100,
                           codes_sq_norm=np.sum(Z**2))
    np.testing.assert_allclose(result.solution, project_rows_to_ball(Z.T @ X), atol=1e-10)
    assert result.objective[-1] == pytest.approx(1.5 * np.sum((Z - X @ result.solution.T) ** 2), rel=1e-10)


# ---------------------------------------------------------------- objective bookkeeping


def test_objective_terms_against_direct_formulas(rng):
    X = rng.random((10, 4))
    Z = rng.standard_normal((10, 3))
    C, E = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    L = random_laplacian(rng, 10)
    config = ModelConfig(n_atoms=3, lambda_d=2, lambda_z=3, lambda_g=4, lambda_e=5)
    terms = objective_terms(X, Z, C, E, L, config)
    direct = {
        "reconstruction": np.sum((X - Z @ C) ** 2),
        "sparsity": np.abs(Z).sum(),
        "graph": np.trace(Z.T @ L.toarray() @ Z),
        "encoder": np.sum((Z - X @ E.T) ** 2),
    }
    weights = {"reconstruction": 1.0, "sparsity": 3.0, "graph": 2.0, "encoder": 2.5}
    for name, value in direct.items():
        assert terms[name] == pytest.approx(value, rel=1e-12)
        assert terms[f"{name}_weighted"] == pytest.approx(weights[name] * value, rel=1e-12)
    assert terms["total"] == pytest.approx(sum(weights[k] * v for k, v in direct.items()), rel=1e-12)
    off = objective_terms(X, Z, C, None, None, ModelConfig(n_atoms=3))
    assert np.isnan(off["graph"]) and off["graph_weighted"] == 0 and off["encoder_weighted"] == 0


# ---------------------------------------------------------------- the alternating fit


@pytest.mark.slow
def test_full_fit_no_worse_than_sklearn_dictionary_learning(rng):
    # DictionaryLearning minimises 1/2 ||X - U V||^2 + alpha ||U||_1 s.t. ||V_k|| <= 1 (projection in
    # _update_dict): our problem divided by lambda_d, alpha = lambda_z / lambda_d.
    X = rng.random((60, 8))
    m, lambda_d, lambda_z = 12, 10.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        dl = DictionaryLearning(n_components=m, alpha=lambda_z / lambda_d, fit_algorithm="cd",
                                transform_algorithm="lasso_cd", positive_code=False, max_iter=300,
                                tol=1e-7, random_state=0)
        code = dl.fit_transform(X)
    assert np.all(np.linalg.norm(dl.components_, axis=1) <= 1 + 1e-9)
    F_ref = our_objective(X, code, dl.components_, lambda_d, lambda_z)
    config = ModelConfig(n_atoms=m, lambda_d=lambda_d, lambda_z=lambda_z, dtype="float64", rtol=1e-7,
                         max_outer=150, max_inner=1000, random_state=0)
    fit = fit_sae(X, config)
    F_ours = our_objective(X, fit.codes, fit.components, lambda_d, lambda_z)
    assert F_ours == pytest.approx(fit.history[-1]["total"], rel=1e-10)
    assert F_ours <= 1.01 * F_ref


@pytest.mark.parametrize("lambda_g, lambda_e", [(0.0, 0.0), (5.0, 0.0), (0.0, 2.0), (5.0, 2.0)])
def test_objective_never_increases_and_constraints_hold(rng, lambda_g, lambda_e):
    X = rng.random((40, 6))
    L = random_laplacian(rng, 40) if lambda_g else None
    config = ModelConfig(n_atoms=8, lambda_g=lambda_g, lambda_e=lambda_e, dtype="float64", rtol=1e-9,
                         max_outer=12, max_inner=100, random_state=1)
    states = []

    def callback(state):
        states.append(state.iteration)
        assert np.all(np.linalg.norm(state.components, axis=1) <= 1 + 1e-12)
        if lambda_e:
            assert np.all(np.linalg.norm(state.encoder, axis=1) <= 1 + 1e-12)
        else:
            assert state.encoder is None
        assert state.record["iteration"] == state.iteration

    fit = fit_sae(X, config, L, callback=callback)
    totals = np.array([record["total"] for record in fit.history])
    assert np.all(np.diff(totals) <= 1e-10 * totals[1:])
    assert totals[-1] < totals[0]
    assert states == list(range(1, fit.n_iter + 1)) and len(fit.history) == fit.n_iter + 1
    last = fit.history[-1]
    assert last["inner_codes"] >= 1 and last["inner_dictionary"] >= 1
    assert (last["inner_encoder"] >= 1) == bool(lambda_e)
    assert last["sparsity_percent"] == pytest.approx(100 * np.count_nonzero(fit.codes) / fit.codes.size)
    recomputed = objective_terms(X, fit.codes, fit.components, fit.encoder, L, config)
    assert last["total"] == pytest.approx(recomputed["total"])


def test_stops_on_rtol_and_logs_one_line_per_iteration(rng, caplog):
    X = rng.random((30, 5))
    config = ModelConfig(n_atoms=6, rtol=1e-3, max_outer=50, random_state=0)
    with caplog.at_level(logging.INFO, logger="sae.model"):
        fit = fit_sae(X, config)
    assert fit.stop_reason == "rtol" and fit.n_iter < 50
    assert fit.history[-1]["relative_change"] <= 1e-3
    assert all(r["relative_change"] > 1e-3 for r in fit.history[1:-1])
    lines = [r for r in caplog.records if r.name == "sae.model"]
    assert len(lines) == fit.n_iter


def test_float32_throughout_and_agrees_with_float64(rng):
    X64 = rng.random((50, 6))
    L64 = random_laplacian(rng, 50)
    common = dict(n_atoms=8, lambda_g=3.0, lambda_e=1.0, rtol=1e-12, max_outer=8, inner_rtol=1e-7,
                  max_inner=300, random_state=3)
    dtypes = []

    def callback(state):
        dtypes.append({state.codes.dtype, state.components.dtype, state.encoder.dtype})

    fit32 = fit_sae(X64, ModelConfig(dtype="float32", **common), L64, callback=callback)
    fit64 = fit_sae(X64, ModelConfig(dtype="float64", **common), L64)
    assert all(d == {np.dtype(np.float32)} for d in dtypes)
    assert fit32.codes.dtype == fit32.components.dtype == fit32.encoder.dtype == np.float32
    assert fit64.codes.dtype == np.float64
    # invariants (the minimiser is not unique): final objective and ||Z C||_F, to 0.1 %
    assert fit32.history[-1]["total"] == pytest.approx(fit64.history[-1]["total"], rel=1e-3)
    recon32 = np.linalg.norm(fit32.codes @ fit32.components)
    recon64 = np.linalg.norm(fit64.codes @ fit64.components)
    assert recon32 == pytest.approx(recon64, rel=1e-3)


def test_graph_term_lowers_dirichlet_energy_on_a_noisy_circle(rng):
    t = np.sort(rng.uniform(0, 2 * np.pi, 120))
    circle = np.c_[np.cos(t), np.sin(t)]
    mixing = rng.random((2, 10))
    X = (circle @ mixing) + 0.15 * rng.standard_normal((120, 10))
    X = (X - X.min(axis=0)) / (X.max(axis=0) - X.min(axis=0))
    L = knn_laplacian(circle + 0.02 * rng.standard_normal(circle.shape), k=6)

    def energy(lambda_g):
        config = ModelConfig(n_atoms=12, lambda_g=lambda_g, dtype="float64", max_outer=10, max_inner=200,
                             random_state=0)
        Z = fit_sae(X, config, L).codes
        return np.trace(Z.T @ (L @ Z)) / np.sum(Z**2)

    assert energy(50.0) < 0.5 * energy(0.0)


def test_the_d_and_e_steps_stop_on_their_own_tolerance_and_the_z_step_on_the_inner_one(rng):
    """dictionary_rtol: the D and E steps (cheap: FISTA on the statistics) solved to their minimiser given the
    codes, while the Z step keeps the loose inner tolerance; with the loose one for all, they are not."""
    # nearly dense codes on 12 atoms for 6 features: ZtZ ill-conditioned, the D step's objective changes little
    # per iteration long before its minimiser (as on real music at lambda_z = 0.03)
    X = rng.random((80, 6)) @ rng.random((6, 6))
    loose = ModelConfig(n_atoms=12, lambda_z=0.03, lambda_e=1.0, dtype="float64", rtol=1e-12, max_outer=3,
                        inner_rtol=1e-2, max_inner=20000, random_state=0)
    fits = {name: fit_sae(X, config) for name, config in
            (("loose", loose), ("tight", loose.model_copy(update={"dictionary_rtol": 1e-14})))}
    # the first Z step starts from the same point with the same tolerance: the same iterations
    assert fits["loose"].history[1]["inner_codes"] == fits["tight"].history[1]["inner_codes"]

    def residuals(fit):
        """Distance to a fixed point of the projected gradient step, for C then E, given the last codes."""
        Z, C, E = fit.codes, fit.components, fit.encoder
        grad_C = loose.lambda_d * (Z.T @ Z @ C - Z.T @ X)
        grad_E = loose.lambda_e * (E @ X.T @ X - Z.T @ X)
        step_C = 1.0 / (loose.lambda_d * np.linalg.norm(Z.T @ Z, 2))
        step_E = 1.0 / (loose.lambda_e * np.linalg.norm(X.T @ X, 2))
        return (np.abs(project_rows_to_ball(C - step_C * grad_C) - C).max(),
                np.abs(project_rows_to_ball(E - step_E * grad_E) - E).max())

    assert max(residuals(fits["tight"])) < 1e-8
    assert min(residuals(fits["loose"])) > 1e-5
    steps = {name: [record["inner_dictionary"] for record in fit.history[1:]] for name, fit in fits.items()}
    assert min(steps["tight"]) > 10 * max(steps["loose"]), steps


def test_weights_switch_terms_off(rng):
    # lambda_d = 0: components stay at their initialisation and the Z step is the direct encoder
    X = rng.random((20, 4))
    config = ModelConfig(n_atoms=5, lambda_d=0.0, lambda_e=1.0, lambda_z=0.2, max_outer=3, random_state=7)
    encoders = []
    fit = fit_sae(X, config, callback=lambda state: encoders.append(state.encoder.copy()))
    rng7 = np.random.default_rng(7)
    np.testing.assert_array_equal(fit.components, init_dictionary(5, 4, rng=rng7))
    assert fit.history[-1]["inner_dictionary"] == 0 and fit.history[-1]["stop_dictionary"] == ""
    expected = encode_direct(X.astype(np.float32), encoders[-2], lambda_z=0.2, lambda_e=1.0)
    np.testing.assert_allclose(fit.codes, expected, atol=1e-4)  # FISTA, step 1/(1.01 lambda_e): geometric
    assert 0 < np.count_nonzero(expected) < expected.size


def test_reproducible_and_resumable(rng):
    X = rng.random((25, 4))
    config = ModelConfig(n_atoms=5, max_outer=4, random_state=11, dtype="float64")
    a, b = fit_sae(X, config), fit_sae(X, config)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.components, b.components)
    other = fit_sae(X, config.model_copy(update={"random_state": 12}))
    assert not np.allclose(other.components, a.components)
    # 2 + 2 iterations with a resume equal 4 in one go
    half = fit_sae(X, config.model_copy(update={"max_outer": 2}))
    resumed = fit_sae(X, config.model_copy(update={"max_outer": 2}),
                      init={"components": half.components, "codes": half.codes})
    np.testing.assert_allclose(resumed.components, a.components, rtol=1e-12, atol=1e-14)


def test_invalid_inputs(rng):
    X = rng.random((10, 3))
    with pytest.raises(ValueError, match="laplacian is required when lambda_g > 0"):
        fit_sae(X, ModelConfig(n_atoms=2, lambda_g=1.0))
    with pytest.raises(ValueError, match=r"shape \(n_samples, n_samples\) = \(10, 10\), got \(9, 9\)"):
        fit_sae(X, ModelConfig(n_atoms=2, lambda_g=1.0), sp.eye_array(9, format="csr"))
    with pytest.raises(ValueError, match="2-D"):
        fit_sae(X[0], ModelConfig(n_atoms=2))
    with pytest.raises(ValueError, match=r"init\['components'\] must have shape \(2, 3\)"):
        fit_sae(X, ModelConfig(n_atoms=2), init={"components": np.ones((3, 3))})
    with pytest.raises(ValueError, match="encoder is required when lambda_e > 0"):
        solve_codes(X, np.ones((2, 3)), None, None, np.zeros((10, 2)), lambda_d=1, lambda_z=1, lambda_e=1)


def test_sampled_dictionary_is_the_first_non_zero_frames_of_the_permutation_scaled(tmp_path):
    """init='frames' against a direct numpy computation, from memory and from a Zarr array."""
    import zarr

    X = np.random.default_rng(3).standard_normal((50, 4)).astype(np.float32)
    X[[2, 7, 11, 30]] = 0  # silent frames are never atoms
    permutation = np.random.default_rng(9).permutation(len(X))
    chosen = [r for r in permutation if np.any(X[r])][:6]
    expected = X[chosen] / np.linalg.norm(X[chosen].astype(np.float64), axis=1, keepdims=True)
    stored = zarr.open_array(str(tmp_path / "X.zarr"), mode="w", shape=X.shape, chunks=(7, 4), dtype=X.dtype)
    stored[:] = X
    for source in (X, stored):
        C = sample_dictionary(source, 6, rng=9)  # batches of 12 rows: the zeros fall in several batches
        assert C.dtype == np.float32
        np.testing.assert_allclose(C, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="needs n_atoms = 47 non-zero frames, the data has 46"):
        sample_dictionary(X, 47, rng=0)


def test_a_fit_with_init_frames_starts_from_the_sampled_frames():
    X = np.abs(np.random.default_rng(0).standard_normal((80, 6))).astype(np.float32)
    config = ModelConfig(n_atoms=5, init="frames", lambda_d=0.0, max_outer=1, random_state=2)  # D not learned
    np.testing.assert_array_equal(fit_sae(X, config).components, sample_dictionary(X, 5, rng=2))
    uniform = fit_sae(X, config.model_copy(update={"init": "uniform"})).components
    np.testing.assert_array_equal(uniform, init_dictionary(5, 6, rng=2))
