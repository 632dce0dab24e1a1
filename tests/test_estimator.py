"""The scikit-learn estimator: API conformance, validation messages, methods."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from sae.config import ModelConfig
from sae.estimator import StructuredAutoEncoder, expected_failed_checks
from sae.model import solve_codes
from sae.terms import soft_threshold

# Small, well-posed instances to keep the checks fast: n_atoms <= n_features or lambda_e > 0 make
# the Z step strongly convex, and a tight inner tolerance makes transform (cold start) and
# fit_transform (warm start) agree to the checks' tolerance (atol 1e-2).  A relative change of the
# objective of 1e-5 (the default) leaves codes off by ~1e-2 on these tiny problems.
CHECKED = [  # the first with the FISTA Z step, the others with coordinate descent (the default without graph)
    StructuredAutoEncoder(n_atoms=2, max_outer=5, max_inner=300, inner_rtol=1e-8, random_state=0, z_solver="fista"),
    StructuredAutoEncoder(n_atoms=2, max_outer=5, max_inner=300, inner_rtol=1e-8, dtype="float64", random_state=0),
    StructuredAutoEncoder(n_atoms=3, lambda_e=1.0, max_outer=5, max_inner=300, inner_rtol=1e-8, dtype="float64",
                          random_state=0),
]


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def laplacian_of(rng, size):
    W = rng.random((size, size)) * (rng.random((size, size)) < 0.3)
    W = np.maximum(W, W.T)
    np.fill_diagonal(W, 1)
    d = W.sum(axis=1)
    return sp.csr_array(np.eye(size) - W / np.sqrt(np.outer(d, d)))


@pytest.fixture
def X(rng):
    return rng.random((30, 6))


def test_params_are_exactly_the_model_config_fields():
    params = StructuredAutoEncoder().get_params()
    assert set(params) == set(ModelConfig.model_fields)
    assert params == {name: field.default for name, field in ModelConfig.model_fields.items()}


@pytest.mark.parametrize(
    "params, match",
    [
        ({"lambda_z": -1.0}, r"'lambda_z' parameter .* greater than or equal to 0; got -1\.0"),
        ({"n_atoms": 0}, r"'n_atoms' parameter .* greater than or equal to 1; got 0"),
        ({"rtol": 2.0}, r"'rtol' parameter .* less than 1; got 2\.0"),
        ({"dtype": "float16"}, r"'dtype' parameter .* 'float32' or 'float64'; got 'float16'"),
        ({"random_state": -3}, r"'random_state' parameter .* greater than or equal to 0; got -3"),
        ({"max_inner": 1.5}, r"'max_inner' parameter .*; got 1\.5"),
    ],
)
def test_invalid_params_raise_value_error_naming_them(X, params, match):
    estimator = StructuredAutoEncoder(**params)  # __init__ does not validate
    with pytest.raises(ValueError, match=match):
        estimator.fit(X)


def test_transform_exact_is_the_code_step(X):
    est = StructuredAutoEncoder(n_atoms=4, max_outer=4, dtype="float64", inner_rtol=1e-10, max_inner=5000,
                                random_state=0).fit(X)
    expected = solve_codes(X, est.components_, None, None, np.zeros((30, 4)), lambda_d=10.0, lambda_z=1.0,
                           rtol=1e-10, max_iter=5000).solution
    np.testing.assert_array_equal(est.transform(X), expected)
    Z = est.fit_transform(X)
    np.testing.assert_allclose(Z, est.transform(X), atol=1e-3)  # warm vs cold start, correlated atoms
    np.testing.assert_allclose(est.inverse_transform(Z), Z @ est.components_, rtol=1e-12)


def test_transform_encoder_is_soft_thresholded_projection(X):
    est = StructuredAutoEncoder(n_atoms=4, lambda_e=4.0, lambda_z=2.0, max_outer=3, random_state=0).fit(X)
    Z = est.transform(X, method="encoder")
    assert Z.dtype == np.float32 and est.encoder_.shape == (4, 6)
    expected = soft_threshold(X.astype(np.float32) @ est.encoder_.T, 0.5)
    np.testing.assert_allclose(Z, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="method must be one of 'exact', 'encoder', got 'magic'"):
        est.transform(X, method="magic")


def test_encoder_method_requires_lambda_e(X):
    est = StructuredAutoEncoder(n_atoms=3, max_outer=2, random_state=0).fit(X)
    assert est.encoder_ is None
    with pytest.raises(ValueError, match="requires an encoder.*lambda_e=0.0"):
        est.transform(X, method="encoder")


def test_graph_term_needs_a_laplacian_of_the_right_shape(X, rng):
    est = StructuredAutoEncoder(n_atoms=3, lambda_g=10.0, max_outer=3, random_state=0)
    with pytest.raises(ValueError, match="laplacian is required when lambda_g > 0"):
        est.fit(X)
    with pytest.raises(ValueError, match=r"\(30, 30\), got \(29, 29\)"):
        est.fit(X, laplacian=laplacian_of(rng, 29))
    L = laplacian_of(rng, 30)
    Z = est.fit_transform(X, laplacian=L)
    assert Z.shape == (30, 3)
    np.testing.assert_allclose(est.transform(X, laplacian=L), Z, atol=1e-2)
    with pytest.raises(ValueError, match="laplacian is required"):
        est.transform(X)


def test_random_state_reproducibility(X):
    a = StructuredAutoEncoder(n_atoms=4, max_outer=3, random_state=5).fit(X)
    b = clone(a).fit(X)
    c = StructuredAutoEncoder(n_atoms=4, max_outer=3, random_state=6).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    assert not np.allclose(a.components_, c.components_)
    d = StructuredAutoEncoder(n_atoms=4, max_outer=3, random_state=np.random.RandomState(1)).fit(X)
    e = StructuredAutoEncoder(n_atoms=4, max_outer=3, random_state=np.random.RandomState(1)).fit(X)
    np.testing.assert_array_equal(d.components_, e.components_)


def test_fitted_attributes_and_dtype(X):
    est = StructuredAutoEncoder(n_atoms=5, max_outer=3, random_state=0)
    Z = est.fit_transform(X)
    assert Z.dtype == est.components_.dtype == np.float32
    assert est.n_features_in_ == 6 and est.n_iter_ == len(est.objective_) - 1 <= 3
    assert est.stop_reason_ in ("rtol", "max_outer")
    assert list(est.get_feature_names_out()) == [f"structuredautoencoder{i}" for i in range(5)]
    assert est.transform(X).dtype == np.float32
    with pytest.raises(ValueError, match="Z has 4 columns but the model has n_atoms=5"):
        est.inverse_transform(np.ones((2, 4)))
