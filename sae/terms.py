"""Objective terms of the structured auto-encoder: values, gradients and proximal maps.

Terms know their data (given to the constructor), their value, their gradient
or their proximal operator, and nothing else: the solvers in :mod:`sae.solvers`
own the iteration and the stopping rules.

Two kinds of terms:

* **quadratic terms** ``f(V) = 1/2 <V, A(V)> - <V, B> + c`` with ``A`` linear,
  symmetric and positive semi-definite.  They expose ``apply(V) = A(V)``,
  ``linear = B`` (``None`` when ``B = 0``), ``constant = c``, ``value(V)``,
  ``grad(V) = A(V) - B`` and ``lipschitz()`` (the spectral norm of ``A``, an
  estimate of the Lipschitz constant of the gradient);
* **proximal terms** ``g(V)`` exposing ``value(V)`` and
  ``prox(V, step) = argmin_U g(U) + ||U - V||_F^2 / (2 step)``.

Orientation (see :mod:`sae`): ``X`` (N, n) data, ``Z`` (N, m) codes,
``C`` (m, n) components (the thesis's ``D = C^T``), ``E`` (m, n) encoder,
``L`` (N, N) graph Laplacian.

Every array keeps the dtype it is given (float32 or float64); only scalar
reductions (inner products, objective values) are accumulated in float64.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X, C = rng.random((5, 3)), rng.random((4, 3))
>>> term = CodeReconstruction(X, C, weight=2.0)
>>> Z = rng.random((5, 4))
>>> bool(np.isclose(term.value(Z), np.sum((X - Z @ C) ** 2)))
True
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import scipy.sparse as sp
from numba import njit

__all__ = [
    "QuadraticTerm",
    "CodeReconstruction",
    "CodeEncoderFit",
    "GraphDirichlet",
    "DictionaryFit",
    "EncoderFit",
    "L1Norm",
    "RowNormBall",
    "inner",
    "soft_threshold",
    "project_rows_to_ball",
    "sparse_dense_product",
]


def inner(a: Any, b: Any) -> float:
    """Frobenius inner product ``<a, b> = sum_ij a_ij b_ij``, accumulated in float64.

    Row-wise products are computed in the arrays' own dtype; only the sum of
    the per-row results is accumulated in float64, so no float64 copy of a
    float32 array is ever made.

    >>> inner(np.ones((3, 2), dtype=np.float32), np.full((3, 2), 2, dtype=np.float32))
    12.0
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim == 0:
        return float(a) * float(b)
    a2 = a.reshape(a.shape[0], -1)
    b2 = b.reshape(b.shape[0], -1)
    return float(np.einsum("ij,ij->i", a2, b2).sum(dtype=np.float64))


def soft_threshold(values: np.ndarray, threshold: float) -> np.ndarray:
    """Entry-wise soft-thresholding ``h_t(v) = sign(v) max(|v| - t, 0)``.

    It is the proximal operator of ``t ||.||_1``.  The result has the shape and
    the dtype of ``values``.

    >>> soft_threshold(np.array([-3.0, -0.5, 0.2, 2.0]), 1.0)
    array([-2.,  0.,  0.,  1.])
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    values = np.asarray(values)
    # h_t(v) = v - clip(v, -t, t): two passes over the array, exact zeros inside [-t, t].
    t = values.dtype.type(threshold) if values.dtype.kind == "f" else threshold
    out = np.clip(values, -t, t)
    np.subtract(values, out, out=out)
    return out


def project_rows_to_ball(values: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Project every row of ``values`` (k, d) onto the l2 ball of radius ``radius``.

    ``P(v) = v / max(1, ||v||_2 / radius)``: rows inside the ball are unchanged,
    rows outside are rescaled onto the sphere (the ball, not the sphere: short
    rows are never inflated).  Shape and dtype are preserved.

    >>> project_rows_to_ball(np.array([[3.0, 4.0], [0.3, 0.4]]))
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    values = np.asarray(values)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    scale = np.maximum(norms / values.dtype.type(radius), values.dtype.type(1))
    return values / scale


class QuadraticTerm(abc.ABC):
    """A quadratic term ``f(V) = 1/2 <V, A(V)> - <V, B> + c``, ``A`` symmetric PSD.

    Subclasses define :meth:`apply` and :meth:`_operator_norm`, and set
    ``self._linear`` (``B``, default None) and ``self._constant`` (``c``,
    default 0) in their constructor; the gradient ``A(V) - B`` and the value follow.
    """

    def __init__(self, weight: float) -> None:
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.weight = float(weight)
        self._lipschitz: float | None = None
        self._linear: np.ndarray | None = None
        self._constant = 0.0

    @abc.abstractmethod
    def apply(self, V: np.ndarray) -> np.ndarray:
        """The linear operator ``A(V)``, same shape and dtype as ``V``."""

    @property
    def linear(self) -> np.ndarray | None:
        """The linear part ``B`` (same shape as the variable), ``None`` if zero."""
        return self._linear

    @property
    def constant(self) -> float:
        """The constant ``c`` (makes ``value`` the term itself, not up to a constant)."""
        return self._constant

    def value(self, V: np.ndarray) -> float:
        """``1/2 <V, A(V)> - <V, B> + c``."""
        out = 0.5 * inner(V, self.apply(V)) + self.constant
        if self.linear is not None:
            out -= inner(V, self.linear)
        return out

    def grad(self, V: np.ndarray) -> np.ndarray:
        """``A(V) - B``, same shape and dtype as ``V``."""
        AV = self.apply(V)
        return AV if self.linear is None else AV - self.linear

    def lipschitz(self) -> float:
        """Lipschitz constant of the gradient: ``||A||_2`` (cached)."""
        if self._lipschitz is None:
            self._lipschitz = float(self._operator_norm()) if self.weight > 0 else 0.0
        return self._lipschitz

    @abc.abstractmethod
    def _operator_norm(self) -> float:
        """The spectral norm of ``A`` (weight included)."""


def _check_2d(name: str, array: Any) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}")
    return array


class CodeReconstruction(QuadraticTerm):
    """Reconstruction term as a function of the codes: ``w/2 ||X - Z C||_F^2``.

    Shapes: ``X`` (N, n), ``Z`` (N, m), ``C`` (m, n).

    ``A(Z) = w Z (C C^T)`` (N, m), ``B = w X C^T`` (N, m), ``c = w/2 ||X||_F^2``,
    Lipschitz constant ``w ||C C^T||_2``.

    ``A`` is applied with the Gram matrix ``G = C C^T`` (m, m) when ``m <= 2 n``
    (``N m^2`` multiply-adds) and as ``(Z C) C^T`` otherwise (``2 N m n``):
    the same operator, the cheaper product.  ``use_gram`` forces either.
    """

    def __init__(
        self,
        data: np.ndarray,
        components: np.ndarray,
        weight: float = 1.0,
        *,
        use_gram: bool | None = None,
    ) -> None:
        super().__init__(weight)
        self.data = _check_2d("data", data)
        self.components = _check_2d("components", components)
        if self.data.shape[1] != self.components.shape[1]:
            raise ValueError(
                f"data has {self.data.shape[1]} features but components has {self.components.shape[1]}"
            )
        m, n = self.components.shape
        self.use_gram = (m <= 2 * n) if use_gram is None else bool(use_gram)
        w = self.data.dtype.type(self.weight)
        self._gram = w * (self.components @ self.components.T) if self.use_gram else None
        self._linear = w * (self.data @ self.components.T)
        self._constant = 0.5 * self.weight * inner(self.data, self.data)

    def apply(self, V: np.ndarray) -> np.ndarray:
        if self._gram is not None:
            return V @ self._gram
        w = V.dtype.type(self.weight)
        return w * ((V @ self.components) @ self.components.T)

    def value(self, V: np.ndarray) -> float:
        R = self.data - V @ self.components
        return 0.5 * self.weight * inner(R, R)

    def _operator_norm(self) -> float:
        from sae.solvers import spectral_norm

        m, n = self.components.shape
        small = self.components @ self.components.T if m <= n else self.components.T @ self.components
        return self.weight * spectral_norm(small)


class CodeEncoderFit(QuadraticTerm):
    """Encoder term as a function of the codes: ``w/2 ||Z - X E^T||_F^2``.

    Shapes: ``X`` (N, n), ``Z`` (N, m), ``E`` (m, n).

    ``A(Z) = w Z``, ``B = w X E^T`` (N, m), ``c = w/2 ||X E^T||_F^2``, Lipschitz
    constant ``w``.
    """

    def __init__(self, data: np.ndarray, encoder: np.ndarray, weight: float = 1.0) -> None:
        super().__init__(weight)
        data = _check_2d("data", data)
        encoder = _check_2d("encoder", encoder)
        if data.shape[1] != encoder.shape[1]:
            raise ValueError(f"data has {data.shape[1]} features but encoder has {encoder.shape[1]}")
        self.target = data @ encoder.T
        self._linear = data.dtype.type(self.weight) * self.target
        self._constant = 0.5 * self.weight * inner(self.target, self.target)

    def apply(self, V: np.ndarray) -> np.ndarray:
        return V.dtype.type(self.weight) * V

    def value(self, V: np.ndarray) -> float:
        R = V - self.target
        return 0.5 * self.weight * inner(R, R)

    def _operator_norm(self) -> float:
        return self.weight


@njit(cache=True, nogil=True)
def _csr_dense_product(indptr, indices, data, dense, out, accumulate):  # pragma: no cover - compiled
    n_cols = dense.shape[1]
    for i in range(indptr.size - 1):
        row = out[i]
        if not accumulate:
            row[:] = 0
        for p in range(indptr[i], indptr[i + 1]):
            weight = data[p]
            source = dense[indices[p]]
            for j in range(n_cols):
                row[j] += weight * source[j]


def sparse_dense_product(sparse: Any, dense: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``sparse @ dense`` (N, m) for a sparse (N, K) matrix and a dense (K, m) array, in ``dense``'s dtype.

    One thread, compiled (numba): each row of the result is accumulated over the
    row's non-zeros in order, the inner loop running along the contiguous rows
    of ``dense`` (a few times faster than scipy's product for m in the hundreds).
    The weights are cast to ``dense``'s dtype; ``dense`` is made C-contiguous.
    With ``out`` (N, m), C-contiguous, of ``dense``'s dtype, the product is
    added to it in place (rows without non-zeros are not touched) and ``out``
    is returned.

    >>> L = sp.csr_array(np.array([[2.0, -1.0], [-1.0, 2.0]]))
    >>> sparse_dense_product(L, np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    array([[ 2., -1.],
           [-1.,  2.]], dtype=float32)
    """
    matrix = sp.csr_array(sparse)
    dense = np.ascontiguousarray(dense)
    if dense.ndim != 2 or matrix.shape[1] != dense.shape[0]:
        raise ValueError(f"shapes {matrix.shape} and {dense.shape} do not align for a product")
    accumulate = out is not None
    if out is None:
        out = np.empty((matrix.shape[0], dense.shape[1]), dtype=dense.dtype)
    elif out.shape != (matrix.shape[0], dense.shape[1]) or out.dtype != dense.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dense.dtype} array of shape "
                         f"{(matrix.shape[0], dense.shape[1])}, got {out.dtype} {out.shape}")
    _csr_dense_product(matrix.indptr, matrix.indices, matrix.data.astype(dense.dtype, copy=False), dense, out,
                       accumulate)
    return out


class GraphDirichlet(QuadraticTerm):
    """Graph smoothness (Dirichlet energy) of the codes: ``w/2 tr(Z^T L Z)``.

    Shapes: ``L`` (N, N) symmetric PSD (sparse or dense), ``Z`` (N, m).

    ``A(Z) = w L Z`` (N, m), ``B = 0``, ``c = 0``, Lipschitz constant
    ``w ||L||_2``.  ``laplacian_norm`` gives ``||L||_2`` (or an upper bound,
    e.g. 2 for the normalised Laplacian) instead of estimating it by power
    iteration; pass it to reuse one estimate across many solves.
    """

    def __init__(
        self,
        laplacian: Any,
        weight: float = 1.0,
        *,
        laplacian_norm: float | None = None,
    ) -> None:
        super().__init__(weight)
        if laplacian.ndim != 2 or laplacian.shape[0] != laplacian.shape[1]:
            raise ValueError(f"laplacian must be a square matrix, got shape {laplacian.shape}")
        self.laplacian = laplacian
        self.laplacian_norm = laplacian_norm

    def apply(self, V: np.ndarray) -> np.ndarray:
        if sp.issparse(self.laplacian) and not sp.issparse(V):
            LV = sparse_dense_product(self.laplacian, V)
        else:
            LV = self.laplacian @ V
            if sp.issparse(LV):  # pragma: no cover - only with a sparse V
                LV = LV.toarray()
            LV = np.asarray(LV, dtype=V.dtype)
        LV *= V.dtype.type(self.weight)
        return LV

    def _operator_norm(self) -> float:
        from sae.solvers import spectral_norm

        norm = self.laplacian_norm if self.laplacian_norm is not None else spectral_norm(self.laplacian)
        return self.weight * float(norm)


class _StatisticsFit(QuadraticTerm):
    """A least-squares term in a parameter ``V`` (m, n), given by sufficient statistics.

    ``A(V) = w gram V`` or ``w V gram`` (the subclass says which side),
    ``B = w cross``, ``c = w/2 sq_norm``, Lipschitz constant ``w ||gram||_2``.
    """

    def __init__(self, gram: np.ndarray, cross: np.ndarray, weight: float, sq_norm: float) -> None:
        super().__init__(weight)
        self.gram = gram
        self._linear = cross.dtype.type(self.weight) * cross
        self._constant = 0.5 * self.weight * float(sq_norm)

    def _operator_norm(self) -> float:
        from sae.solvers import spectral_norm

        return self.weight * spectral_norm(self.gram)


class DictionaryFit(_StatisticsFit):
    """Reconstruction term as a function of the components, from sufficient statistics.

    ``w/2 ||X - Z C||_F^2 = w/2 tr(C^T (Z^T Z) C) - w <C, Z^T X> + w/2 ||X||_F^2``

    with ``ZtZ = Z^T Z`` (m, m), ``ZtX = Z^T X`` (m, n), ``C`` (m, n).  These
    statistics are sums over samples, so they can be reduced over blocks.

    ``A(C) = w ZtZ C``, ``B = w ZtX``, ``c = w/2 ||X||_F^2`` (``data_sq_norm``
    is ``||X||_F^2``; leave it 0 to get the value up to that constant),
    Lipschitz constant ``w ||ZtZ||_2``.
    """

    def __init__(
        self,
        codes_gram: np.ndarray,
        codes_data: np.ndarray,
        weight: float = 1.0,
        *,
        data_sq_norm: float = 0.0,
    ) -> None:
        codes_gram = _check_2d("ZtZ", codes_gram)
        codes_data = _check_2d("ZtX", codes_data)
        if codes_gram.shape != (codes_data.shape[0],) * 2:
            raise ValueError(
                f"ZtZ must be (m, m) with m = ZtX.shape[0] = {codes_data.shape[0]}, got {codes_gram.shape}"
            )
        super().__init__(codes_gram, codes_data, weight, data_sq_norm)
        self.codes_gram = codes_gram

    def apply(self, V: np.ndarray) -> np.ndarray:
        return V.dtype.type(self.weight) * (self.codes_gram @ V)


class EncoderFit(_StatisticsFit):
    """Encoder term as a function of the encoder, from sufficient statistics.

    ``w/2 ||Z - X E^T||_F^2 = w/2 tr(E (X^T X) E^T) - w <E, Z^T X> + w/2 ||Z||_F^2``

    with ``XtX = X^T X`` (n, n), ``ZtX = Z^T X`` (m, n), ``E`` (m, n).

    ``A(E) = w E XtX``, ``B = w ZtX``, ``c = w/2 ||Z||_F^2`` (``codes_sq_norm``),
    gradient ``w (E X^T X - Z^T X)``, Lipschitz constant ``w ||XtX||_2``.
    """

    def __init__(
        self,
        data_gram: np.ndarray,
        codes_data: np.ndarray,
        weight: float = 1.0,
        *,
        codes_sq_norm: float = 0.0,
    ) -> None:
        data_gram = _check_2d("XtX", data_gram)
        codes_data = _check_2d("ZtX", codes_data)
        if data_gram.shape != (codes_data.shape[1],) * 2:
            raise ValueError(
                f"XtX must be (n, n) with n = ZtX.shape[1] = {codes_data.shape[1]}, got {data_gram.shape}"
            )
        super().__init__(data_gram, codes_data, weight, codes_sq_norm)
        self.data_gram = data_gram

    def apply(self, V: np.ndarray) -> np.ndarray:
        return V.dtype.type(self.weight) * (V @ self.data_gram)


class L1Norm:
    """``g(V) = w ||V||_1 = w sum_ij |v_ij|``; prox: soft-thresholding at ``step w``.

    >>> L1Norm(2.0).prox(np.array([[3.0, -1.0]]), step=0.5)
    array([[2., 0.]])
    """

    def __init__(self, weight: float = 1.0) -> None:
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def value(self, V: np.ndarray) -> float:
        if self.weight == 0:
            return 0.0
        V = np.asarray(V)
        row_sums = np.abs(V).reshape(V.shape[0], -1).sum(axis=1) if V.ndim else np.abs(V)
        return self.weight * float(np.sum(row_sums, dtype=np.float64))

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        return soft_threshold(V, step * self.weight) if self.weight > 0 else V


class RowNormBall:
    """Indicator of ``{V : ||v_i||_2 <= radius for every row i}``; prox: row-wise projection.

    ``value`` is 0 on the set and ``inf`` outside; rows are accepted up to a
    relative slack of ``100 eps`` of their dtype (rounding of the projection).

    >>> RowNormBall().value(np.array([[0.6, 0.8]]))
    0.0
    """

    def __init__(self, radius: float = 1.0) -> None:
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        self.radius = float(radius)

    def value(self, V: np.ndarray) -> float:
        V = np.asarray(V)
        slack = 100 * np.finfo(V.dtype).eps if V.dtype.kind == "f" else 0.0
        norms = np.linalg.norm(V, axis=1)
        return 0.0 if np.all(norms <= self.radius * (1 + slack)) else float("inf")

    def prox(self, V: np.ndarray, step: float) -> np.ndarray:
        return project_rows_to_ball(V, self.radius)
