"""Objective terms: gradients against finite differences, prox optimality, operator identities."""

import numpy as np
import pytest
import scipy.sparse as sp

from sae.terms import (
    CodeEncoderFit,
    CodeReconstruction,
    DictionaryFit,
    EncoderFit,
    GraphDirichlet,
    L1Norm,
    RowNormBall,
    inner,
    project_rows_to_ball,
    soft_threshold,
)

N, n, m = 12, 5, 7


def normalized_laplacian(rng, size, density=0.3):
    """L = I - D^-1/2 W D^-1/2 from a random symmetric non-negative W (dense numpy, then CSR)."""
    W = rng.random((size, size)) * (rng.random((size, size)) < density)
    W = np.maximum(W, W.T)
    np.fill_diagonal(W, 1.0)
    d = W.sum(axis=1)
    L = np.eye(size) - W / np.sqrt(np.outer(d, d))
    return sp.csr_array(L)


@pytest.fixture
def data(rng):
    X = rng.random((N, n))
    C = rng.standard_normal((m, n))
    E = rng.standard_normal((m, n))
    Z = rng.standard_normal((N, m))
    L = normalized_laplacian(rng, N)
    return X, C, E, Z, L


def all_terms(X, C, E, Z, L):
    """(term, variable at which to test) for every quadratic term, with its direct formula."""
    return [
        (CodeReconstruction(X, C, 3.0, use_gram=True), Z, lambda V: 1.5 * np.sum((X - V @ C) ** 2)),
        (CodeReconstruction(X, C, 3.0, use_gram=False), Z, lambda V: 1.5 * np.sum((X - V @ C) ** 2)),
        (CodeEncoderFit(X, E, 2.0), Z, lambda V: np.sum((V - X @ E.T) ** 2)),
        (GraphDirichlet(L, 4.0), Z, lambda V: 2.0 * np.trace(V.T @ L.toarray() @ V)),
        (
            DictionaryFit(Z.T @ Z, Z.T @ X, 3.0, data_sq_norm=np.sum(X**2)),
            C,
            lambda V: 1.5 * np.sum((X - Z @ V) ** 2),
        ),
        (
            EncoderFit(X.T @ X, Z.T @ X, 2.0, codes_sq_norm=np.sum(Z**2)),
            E,
            lambda V: np.sum((Z - X @ V.T) ** 2),
        ),
    ]


def test_values_match_direct_formulas(data):
    for term, V, direct in all_terms(*data):
        assert term.value(V) == pytest.approx(direct(V), rel=1e-10)
        # the generic quadratic form 1/2<V, A V> - <V, B> + c gives the same value
        quadratic = 0.5 * inner(V, term.apply(V)) + term.constant
        if term.linear is not None:
            quadratic -= inner(V, term.linear)
        assert quadratic == pytest.approx(direct(V), rel=1e-9)


def test_gradients_match_central_differences(data, rng):
    h = 1e-5
    for term, V, direct in all_terms(*data):
        grad = term.grad(V)
        assert grad.shape == V.shape
        for _ in range(3):
            D = rng.standard_normal(V.shape)
            numeric = (direct(V + h * D) - direct(V - h * D)) / (2 * h)
            assert inner(grad, D) == pytest.approx(numeric, rel=1e-6, abs=1e-6)


def test_operators_are_symmetric_psd(data, rng):
    for term, V, _ in all_terms(*data):
        U, W = rng.standard_normal(V.shape), rng.standard_normal(V.shape)
        assert inner(U, term.apply(W)) == pytest.approx(inner(term.apply(U), W), rel=1e-10)
        assert inner(U, term.apply(U)) >= -1e-10


def test_lipschitz_is_the_spectral_norm_of_the_operator(data):
    X, C, E, Z, L = data
    for term, V, _ in all_terms(*data):
        # dense matrix of the operator V -> A(V), from its action on the canonical basis
        size = V.size
        basis = np.eye(size).reshape((size,) + V.shape)
        A = np.stack([term.apply(b).ravel() for b in basis], axis=1)
        exact = np.linalg.eigvalsh((A + A.T) / 2).max()
        assert term.lipschitz() == pytest.approx(exact, rel=1e-6)


def test_gram_and_direct_products_agree(data):
    X, C, E, Z, L = data
    with_gram = CodeReconstruction(X, C, 2.0, use_gram=True).apply(Z)
    without = CodeReconstruction(X, C, 2.0, use_gram=False).apply(Z)
    np.testing.assert_allclose(with_gram, without, rtol=1e-12, atol=1e-12)
    # the default picks the Gram matrix only when m <= 2n
    assert CodeReconstruction(X, C).use_gram == (m <= 2 * n)
    assert not CodeReconstruction(X, np.ones((2 * n + 1, n))).use_gram


def test_float32_is_preserved(data):
    X, C, E, Z, L = (a.astype(np.float32) for a in data)
    for term, V, _ in all_terms(X, C, E, Z, L):
        assert term.apply(V).dtype == np.float32
        assert term.grad(V).dtype == np.float32
    assert L1Norm(0.5).prox(Z, 0.1).dtype == np.float32
    assert RowNormBall().prox(C, 0.1).dtype == np.float32


def test_soft_threshold_satisfies_subgradient_condition(rng):
    V = rng.standard_normal((30, 4)) * 2
    step, weight = 0.3, 1.7
    P = L1Norm(weight).prox(V, step)
    t = step * weight
    # 0 in (P - V) / step + weight * d||.||_1(P)
    nonzero = P != 0
    np.testing.assert_allclose((V - P)[nonzero], t * np.sign(P[nonzero]), rtol=1e-12)
    assert np.all(np.abs(V - P)[~nonzero] <= t + 1e-12)
    assert np.any(nonzero) and np.any(~nonzero)
    # it is also the minimiser: random perturbations never do better
    objective = lambda U: weight * np.abs(U).sum() + np.sum((U - V) ** 2) / (2 * step)  # noqa: E731
    for _ in range(20):
        assert objective(P) <= objective(P + 1e-3 * rng.standard_normal(P.shape)) + 1e-12


def test_ball_projection_closed_form_and_variational_inequality(rng):
    V = rng.standard_normal((25, 6)) * rng.choice([0.1, 3.0], size=(25, 1))
    P = RowNormBall(1.0).prox(V, 123.0)  # the step does not matter
    norms = np.linalg.norm(V, axis=1)
    assert np.all(np.linalg.norm(P, axis=1) <= 1 + 1e-12)
    inside = norms <= 1
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(P[inside], V[inside])  # ball, not sphere
    np.testing.assert_allclose(P[~inside], V[~inside] / norms[~inside, None], rtol=1e-12)
    # <v - P(v), u - P(v)> <= 0 for every u in the ball, row by row
    for _ in range(20):
        U = project_rows_to_ball(rng.standard_normal(V.shape))
        assert np.all(np.einsum("ij,ij->i", V - P, U - P) <= 1e-12)


def test_prox_values(rng):
    V = rng.standard_normal((4, 3))
    assert L1Norm(2.0).value(V) == pytest.approx(2 * np.abs(V).sum())
    assert L1Norm(0.0).prox(V, 1.0) is V
    assert RowNormBall().value(project_rows_to_ball(V * 10)) == 0.0
    assert RowNormBall().value(V * 10) == np.inf
    np.testing.assert_array_equal(soft_threshold(V, 0.0), V)


def test_inner_accumulates_float32_accurately(rng):
    a = rng.random((200_000, 4)).astype(np.float32)
    b = rng.random((200_000, 4)).astype(np.float32)
    exact = float(np.sum(a.astype(np.float64) * b.astype(np.float64)))
    assert inner(a, b) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: L1Norm(-1.0), "weight must be >= 0, got -1"),
        (lambda: RowNormBall(0.0), "radius must be > 0, got 0"),
        (lambda: CodeReconstruction(np.ones((3, 4)), np.ones((2, 5))), "4 features but components has 5"),
        (lambda: DictionaryFit(np.ones((3, 3)), np.ones((2, 4))), r"ZtZ must be \(m, m\)"),
        (lambda: EncoderFit(np.ones((3, 3)), np.ones((2, 4))), r"XtX must be \(n, n\)"),
        (lambda: GraphDirichlet(np.ones((3, 4))), "square"),
        (lambda: soft_threshold(np.ones(2), -1.0), "threshold must be >= 0"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_dense_product_equals_scipy(rng, dtype):
    from sae.terms import sparse_dense_product

    sparse = sp.random_array((300, 200), density=0.03, format="lil", rng=rng)
    sparse[np.arange(5), :] = 0  # empty rows too
    sparse = sp.csr_array(sparse)
    dense = rng.standard_normal((200, 64)).astype(dtype)
    product = sparse_dense_product(sp.csr_array(sparse), dense)
    assert product.dtype == dtype and product.shape == (300, 64)
    expected = sparse.astype(np.float64) @ dense.astype(np.float64)
    np.testing.assert_allclose(product, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    assert not product[:5].any()
    with pytest.raises(ValueError, match="do not align"):
        sparse_dense_product(sparse, dense[:10])
    # accumulation into out: the product is added, rows without non-zeros keep their values
    start = rng.standard_normal((300, 64)).astype(dtype)
    total = sparse_dense_product(sparse, dense, out=start.copy())
    np.testing.assert_allclose(total, start + expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    np.testing.assert_array_equal(total[:5], start[:5])
    with pytest.raises(ValueError, match="out must be"):
        sparse_dense_product(sparse, dense, out=start[:, :10])
