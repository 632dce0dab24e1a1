"""The structured auto-encoder: objective, sub-problems and the alternating fit.

Orientation (see :mod:`sae`): ``X`` (N, n) data, ``Z`` (N, m) codes,
``C`` (m, n) components (the thesis's ``D = C^T``), ``E`` (m, n) encoder,
``L`` (N, N) graph Laplacian.  The objective is

    F(Z, C, E) = lambda_d/2 ||X - Z C||_F^2 + lambda_z ||Z||_1
                 + lambda_g/2 tr(Z^T L Z) + lambda_e/2 ||Z - X E^T||_F^2

subject to every row of ``C`` and of ``E`` having an l2 norm ``<= 1`` (unit
ball).  A weight of 0 removes its term: ``lambda_e = 0`` learns no encoder
(``encoder`` is ``None``), ``lambda_g = 0`` needs no Laplacian,
``lambda_d = 0`` keeps the components at their initialisation.

:func:`fit_sae` alternates a Z step (:func:`solve_codes`), a D step
(:func:`solve_dictionary`) and an E step (:func:`solve_encoder`), each a
warm-started FISTA solve (the Z step by coordinate descent per frame when
``lambda_g = 0``, see ``ModelConfig.z_solver``).  The D and E steps only see
the sufficient statistics ``Z^T Z``, ``Z^T X`` and ``X^T X``, so a distributed
trainer can reduce them over blocks of frames and call the same functions.

>>> import numpy as np
>>> from sae.config import ModelConfig
>>> X = np.random.default_rng(0).random((40, 6))
>>> fit = fit_sae(X, ModelConfig(n_atoms=8, max_outer=5, random_state=0))
>>> fit.codes.shape, fit.components.shape, fit.encoder is None, fit.codes.dtype
((40, 8), (8, 6), True, dtype('float32'))
>>> totals = [record["total"] for record in fit.history]
>>> all(b <= a * (1 + 1e-6) for a, b in zip(totals, totals[1:]))
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from sae.config import ModelConfig
from sae.coordinate import coordinate_descent_codes
from sae.solvers import SolverResult, fista, spectral_norm
from sae.terms import (
    CodeEncoderFit,
    CodeReconstruction,
    DictionaryFit,
    EncoderFit,
    GraphDirichlet,
    L1Norm,
    RowNormBall,
    inner,
    soft_threshold,
)

__all__ = [
    "FitResult",
    "FitState",
    "fit_sae",
    "objective_terms",
    "init_dictionary",
    "init_encoder",
    "solve_codes",
    "solve_dictionary",
    "solve_encoder",
    "encode_direct",
    "TERM_NAMES",
    "TERM_WEIGHTS",
    "weigh_terms",
    "balanced_weights",
    "relative_change",
]

logger = logging.getLogger("sae.model")

#: Names of the objective terms, in the order of the objective.
TERM_NAMES = ("reconstruction", "sparsity", "graph", "encoder")

RandomLike = int | np.random.Generator | None


def _unit_rows_uniform(n_rows: int, n_cols: int, rng: RandomLike, dtype: Any) -> np.ndarray:
    # Drawn and normalised in float64 then rounded, so that float32 and float64
    # fits with one seed start from the same point (up to rounding).
    rng = np.random.default_rng(rng)
    values = rng.random((n_rows, n_cols))
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return (values / norms).astype(dtype)


def init_dictionary(
    n_atoms: int, n_features: int, *, rng: RandomLike = None, dtype: Any = np.float32
) -> np.ndarray:
    """Initial components (m, n): uniform on [0, 1), every row scaled to unit norm (the thesis's init).

    ``rng`` is a ``numpy.random.Generator`` (its state advances) or a seed for
    ``np.random.default_rng``.

    >>> C = init_dictionary(4, 3, rng=0)
    >>> C.shape, C.dtype, bool(np.allclose(np.linalg.norm(C, axis=1), 1))
    ((4, 3), dtype('float32'), True)
    """
    return _unit_rows_uniform(n_atoms, n_features, rng, dtype)


def init_encoder(n_atoms: int, n_features: int, *, rng: RandomLike = None, dtype: Any = np.float32) -> np.ndarray:
    """Initial encoder (m, n): uniform on [0, 1), rows scaled to unit norm.

    :func:`fit_sae` draws the components, then the encoder, from one generator
    seeded with ``random_state``, so the two differ.

    >>> rng = np.random.default_rng(0)
    >>> C, E = init_dictionary(4, 3, rng=rng), init_encoder(4, 3, rng=rng)
    >>> bool(np.allclose(C, E))
    False
    """
    return _unit_rows_uniform(n_atoms, n_features, rng, dtype)


def encode_direct(X: np.ndarray, encoder: np.ndarray, lambda_z: float, lambda_e: float) -> np.ndarray:
    """Direct encoding ``Z = h_{lambda_z / lambda_e}(X E^T)`` (N, m).

    ``h_t`` is the soft-threshold; ``X`` (N, n), ``E`` (m, n).  It is the
    minimiser of ``lambda_e/2 ||Z - X E^T||^2 + lambda_z ||Z||_1``: the Z step
    without the reconstruction and graph terms.

    >>> encode_direct(np.array([[1.0, 2.0]]), np.eye(2), lambda_z=1.0, lambda_e=2.0)
    array([[0.5, 1.5]])
    """
    if not lambda_e > 0:
        raise ValueError(f"lambda_e must be > 0 for the direct encoder, got {lambda_e!r}")
    X = np.asarray(X)
    encoder = np.asarray(encoder, dtype=X.dtype)
    return soft_threshold(X @ encoder.T, lambda_z / lambda_e)


def _check_laplacian(laplacian: Any, n_samples: int, lambda_g: float, dtype: Any) -> Any:
    if lambda_g == 0:
        return None
    if laplacian is None:
        raise ValueError(
            f"laplacian is required when lambda_g > 0 (got lambda_g={lambda_g!r} and laplacian=None): "
            "pass an (n_samples, n_samples) sparse matrix, or set lambda_g=0"
        )
    shape = getattr(laplacian, "shape", None)
    if shape is None or len(shape) != 2 or tuple(shape) != (n_samples, n_samples):
        raise ValueError(
            f"laplacian must have shape (n_samples, n_samples) = ({n_samples}, {n_samples}), got {shape}"
        )
    if sp.issparse(laplacian):
        return laplacian.astype(dtype, copy=False)
    return np.asarray(laplacian, dtype=dtype)


def solve_codes(
    X: np.ndarray,
    components: np.ndarray,
    encoder: np.ndarray | None,
    laplacian: Any,
    Z0: np.ndarray,
    *,
    lambda_d: float,
    lambda_z: float,
    lambda_g: float = 0.0,
    lambda_e: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 500,
    laplacian_norm: float | None = None,
    restart: bool = True,
    method: Literal["auto", "fista", "cd"] = "auto",
    n_threads: int | None = None,
) -> SolverResult:
    """Z step: minimise over ``Z`` the objective with ``C`` and ``E`` fixed.

    ``lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1 + lambda_g/2 tr(Z^T L Z) + lambda_e/2 ||Z - X E^T||^2``.

    Smooth part ``1/2 <Z, A(Z)> - <Z, B> + c`` with
    ``A(Z) = lambda_d Z C C^T + lambda_e Z + lambda_g L Z`` (N, m) and
    ``B = lambda_d X C^T + lambda_e X E^T`` (N, m); prox: soft-thresholding at
    ``lambda_z / beta``, ``beta = lambda_d ||C C^T||_2 + lambda_e + lambda_g ||L||_2``
    (times the solver's safety factor).  FISTA warm-started from ``Z0``.

    Shapes: ``X`` (N, n), ``C`` (m, n), ``E`` (m, n) or None (needs
    ``lambda_e = 0``), ``L`` (N, N) sparse or None (needs ``lambda_g = 0``),
    ``Z0`` (N, m).  The computation runs in ``X``'s dtype.  ``laplacian_norm``
    (``||L||_2`` or an upper bound) skips its power iteration.

    ``method``: "fista" as above; "cd" (only when ``lambda_g = 0``: the problem
    then separates over frames) is :func:`sae.coordinate.coordinate_descent_codes`,
    coordinate descent per frame on the Gram matrix
    ``G = lambda_d C C^T + lambda_e I`` (m, m), where ``rtol`` and ``atol`` bound
    every frame's duality gap (``gap <= rtol F``: the objective is certified
    within ``rtol`` relative of its minimum), ``max_iter`` caps its full sweeps
    and ``n_threads`` its threads (None: numba's default; 1: serial, for
    single-threaded workers); ``restart`` and ``laplacian_norm`` are FISTA's
    only.  "auto" is "cd" when ``lambda_g = 0``, else "fista".  Both return a
    :class:`~sae.solvers.SolverResult` (for "cd", ``n_iter`` is the largest
    number of full sweeps over the frames).

    >>> rng = np.random.default_rng(0)
    >>> X, C = rng.random((30, 5)), rng.random((4, 5))
    >>> kw = dict(lambda_d=10.0, lambda_z=1.0, rtol=1e-9, max_iter=5000)
    >>> cd = solve_codes(X, C, None, None, np.zeros((30, 4)), method="cd", **kw)
    >>> fista = solve_codes(X, C, None, None, np.zeros((30, 4)), method="fista", **kw)
    >>> bool(abs(cd.objective[-1] - fista.objective[-1]) <= 1e-6 * fista.objective[-1])
    True
    """
    if method not in ("auto", "fista", "cd"):
        raise ValueError(f"method must be one of 'auto', 'fista', 'cd', got {method!r}")
    if method == "cd" and lambda_g > 0:
        raise ValueError(
            f"method='cd' needs lambda_g = 0 (frames are then independent), got lambda_g={lambda_g!r}: "
            "use method='fista' or 'auto'"
        )
    X = np.asarray(X)
    dtype = X.dtype
    components = np.asarray(components, dtype=dtype)
    Z0 = np.asarray(Z0, dtype=dtype)
    if Z0.shape != (X.shape[0], components.shape[0]):
        expected = (X.shape[0], components.shape[0])
        raise ValueError(f"Z0 must have shape (n_samples, n_atoms) = {expected}, got {Z0.shape}")
    terms: list = []
    if lambda_d > 0:
        terms.append(CodeReconstruction(X, components, lambda_d))
    if lambda_e > 0:
        if encoder is None:
            raise ValueError(f"encoder is required when lambda_e > 0, got encoder=None and lambda_e={lambda_e!r}")
        terms.append(CodeEncoderFit(X, np.asarray(encoder, dtype=dtype), lambda_e))
    laplacian = _check_laplacian(laplacian, X.shape[0], lambda_g, dtype)
    if laplacian is not None:
        terms.append(GraphDirichlet(laplacian, lambda_g, laplacian_norm=laplacian_norm))
    if not terms:  # no smooth term: argmin of lambda_z ||Z||_1 is 0
        Z = np.zeros_like(Z0)
        value = L1Norm(lambda_z).value(Z0)
        return SolverResult(Z, 1, "rtol", np.array([value, 0.0]))  # exact in one step
    if laplacian is None and method in ("auto", "cd"):
        return coordinate_descent_codes(
            X, components, encoder if lambda_e > 0 else None, Z0, lambda_d=lambda_d, lambda_z=lambda_z,
            lambda_e=lambda_e, rtol=rtol, atol=atol, max_iter=max_iter, n_threads=n_threads,
        )
    return fista(terms, L1Norm(lambda_z), Z0, rtol=rtol, atol=atol, max_iter=max_iter, restart=restart)


def solve_dictionary(
    ZtZ: np.ndarray,
    ZtX: np.ndarray,
    C0: np.ndarray,
    *,
    lambda_d: float,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 500,
    data_sq_norm: float = 0.0,
    restart: bool = True,
) -> SolverResult:
    """D step from sufficient statistics: ``argmin_{||c_i|| <= 1} lambda_d/2 ||X - Z C||_F^2``.

    ``ZtZ = Z^T Z`` (m, m) and ``ZtX = Z^T X`` (m, n) are sums over samples
    (reducible over blocks of frames); ``C0`` (m, n) is the warm start.
    Gradient ``lambda_d (ZtZ C - ZtX)``, step ``1 / (lambda_d ||ZtZ||_2)``, prox:
    projection of every row of ``C`` onto the unit ball.  ``data_sq_norm``
    (``||X||_F^2``) only shifts the recorded objective, to make it the term
    itself.  Runs in ``C0``'s dtype.
    """
    C0 = np.asarray(C0)
    dtype = C0.dtype
    term = DictionaryFit(np.asarray(ZtZ, dtype=dtype), np.asarray(ZtX, dtype=dtype), lambda_d,
                         data_sq_norm=data_sq_norm)
    return fista([term], RowNormBall(1.0), C0, rtol=rtol, atol=atol, max_iter=max_iter, restart=restart)


def solve_encoder(
    XtX: np.ndarray,
    ZtX: np.ndarray,
    E0: np.ndarray,
    *,
    lambda_e: float,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 500,
    codes_sq_norm: float = 0.0,
    restart: bool = True,
) -> SolverResult:
    """E step from sufficient statistics: ``argmin_{||e_k|| <= 1} lambda_e/2 ||Z - X E^T||_F^2``.

    ``XtX = X^T X`` (n, n), ``ZtX = Z^T X`` (m, n), ``E0`` (m, n) warm start.
    Gradient ``lambda_e (E XtX - ZtX)``, step ``1 / (lambda_e ||XtX||_2)``, prox:
    row-wise projection onto the unit ball.  ``codes_sq_norm`` (``||Z||_F^2``)
    only shifts the recorded objective.  Runs in ``E0``'s dtype.
    """
    E0 = np.asarray(E0)
    dtype = E0.dtype
    term = EncoderFit(np.asarray(XtX, dtype=dtype), np.asarray(ZtX, dtype=dtype), lambda_e,
                      codes_sq_norm=codes_sq_norm)
    return fista([term], RowNormBall(1.0), E0, rtol=rtol, atol=atol, max_iter=max_iter, restart=restart)


TERM_WEIGHTS = {"reconstruction": ("lambda_d", 0.5), "sparsity": ("lambda_z", 1.0),
                "graph": ("lambda_g", 0.5), "encoder": ("lambda_e", 0.5)}
"""How each term enters the objective: its weight's name and factor (``lambda_d/2 ||X - Z C||^2``, ...)."""


def weigh_terms(terms: Mapping[str, float], config: ModelConfig) -> dict[str, float]:
    """The weighted terms, their total and the weights, from the unweighted terms.

    ``<name>_weighted = factor * lambda * terms[name]`` (`TERM_WEIGHTS`; 0 when the
    weight is 0, whatever the term, which may then be NaN), ``total`` their sum,
    and ``lambda_d``, ``lambda_z``, ``lambda_g``, ``lambda_e`` of ``config``.

    >>> weigh_terms({"reconstruction": 4.0, "sparsity": 3.0, "graph": float("nan"), "encoder": 1.0},
    ...             ModelConfig(lambda_d=1.0, lambda_z=2.0, lambda_e=0.5))["total"]
    8.25
    """
    out: dict[str, float] = {}
    total = 0.0
    for name, (weight_name, factor) in TERM_WEIGHTS.items():
        weight = getattr(config, weight_name)
        weighted = factor * weight * float(terms[name]) if weight > 0 else 0.0
        out[f"{name}_weighted"] = weighted
        total += weighted
    out["total"] = total
    out.update({weight_name: float(getattr(config, weight_name)) for weight_name, _ in TERM_WEIGHTS.values()})
    return out


def balanced_weights(record: Mapping[str, float], config: ModelConfig) -> dict[str, float]:
    """Weights that make every weighted term of ``record`` equal to the sparsity term ``lambda_z ||Z||_1``.

    ``lambda <- lambda * (lambda_z ||Z||_1) / (weighted term)`` for ``lambda_d``,
    ``lambda_g`` and ``lambda_e``; ``lambda_z`` sets the scale (the minimiser only
    depends on the ratios of the weights).  A weight of 0 stays 0 (its term is
    off), and so does a weight whose term is 0 at ``record`` (nothing to scale).
    Returns only the weights that change, ``{}`` when the codes are all zero
    (no scale to match: the caller keeps its weights).

    This is the rescaling of ``balance_lambdas`` (:func:`fit_sae`), applied once,
    after the first outer iteration.  At the next iterations the terms drift from
    equality as the codes adapt to the new weights; a penalty whose weighted
    value falls as its weight grows (the encoder term when ``Z`` can follow
    ``X E^T`` closely) may stay well below the others.

    >>> record = {"reconstruction": 20.0, "sparsity": 4.0, "graph": 0.5, "encoder": float("nan")}
    >>> balanced_weights(record, ModelConfig(lambda_d=10.0, lambda_z=1.0, lambda_g=100.0))
    {'lambda_d': 0.4, 'lambda_g': 16.0}
    """
    anchor = config.lambda_z * float(record["sparsity"])
    if not anchor > 0:
        return {}
    update = {}
    for name in ("reconstruction", "graph", "encoder"):
        weight_name, factor = TERM_WEIGHTS[name]
        weight, value = getattr(config, weight_name), float(record[name])
        if weight > 0 and value > 0:
            update[weight_name] = anchor / (factor * value)
    return update


def objective_terms(
    X: np.ndarray,
    Z: np.ndarray,
    C: np.ndarray,
    E: np.ndarray | None,
    laplacian: Any,
    config: ModelConfig,
) -> dict[str, float]:
    """Every term of the objective, unweighted and weighted, and the total.

    Unweighted: ``reconstruction = ||X - Z C||_F^2``, ``sparsity = ||Z||_1``,
    ``graph = tr(Z^T L Z)``, ``encoder = ||Z - X E^T||_F^2`` (NaN when ``L`` or
    ``E`` is None).  Weighted (keys ``<name>_weighted``): the terms as they
    enter ``F``: ``lambda_d/2 reconstruction``, ``lambda_z sparsity``,
    ``lambda_g/2 graph``, ``lambda_e/2 encoder`` (0 when the weight is 0).
    ``total`` is their sum; the weights too (`weigh_terms`).  Shapes: ``X`` (N, n), ``Z`` (N, m), ``C`` and
    ``E`` (m, n), ``L`` (N, N).  Values are Python floats (float64 sums).

    >>> X = np.ones((2, 2)); Z = np.ones((2, 1)); C = np.ones((1, 2))
    >>> objective_terms(X, Z, C, None, None, ModelConfig(n_atoms=1))["total"]
    2.0
    """
    residual = X - Z @ C
    out: dict[str, float] = {
        "reconstruction": inner(residual, residual),
        "sparsity": float(np.abs(Z).sum(dtype=np.float64)),
        "graph": float("nan"),
        "encoder": float("nan"),
    }
    if laplacian is not None:
        out["graph"] = inner(Z, laplacian @ Z)
    if E is not None:
        R = Z - X @ E.T
        out["encoder"] = inner(R, R)
    out.update(weigh_terms(out, config))
    return out


@dataclass(frozen=True)
class FitState:
    """What :func:`fit_sae` passes to ``callback`` after every outer iteration.

    The arrays are the live iterates: read or copy them, do not modify them.
    ``record`` is the history entry of this iteration (see :class:`FitResult`).
    """

    iteration: int
    codes: np.ndarray
    components: np.ndarray
    encoder: np.ndarray | None
    record: dict[str, Any]


@dataclass(frozen=True)
class FitResult:
    """Result of :func:`fit_sae`.

    Attributes
    ----------
    components : ndarray (m, n)
        The dictionary ``C`` (the thesis's ``D^T``), one atom per row.
    encoder : ndarray (m, n) or None
        ``E``; None when ``lambda_e = 0`` (not learned).
    codes : ndarray (N, m)
        ``Z`` after the last Z step.
    history : list of dict
        One dict per outer iteration, preceded by the initial point
        (``iteration = 0``).  Keys: ``iteration``; the unweighted and weighted
        terms and ``total`` of :func:`objective_terms`; ``relative_change``
        ``|F_prev - F| / |F|`` (NaN at iteration 0); ``sparsity_percent``
        (percentage of non-zero codes); ``inner_codes``, ``inner_dictionary``,
        ``inner_encoder`` (iterations of each step: FISTA iterations, or the
        largest number of full sweeps of the coordinate-descent Z step; 0 if
        skipped);
        ``stop_codes``, ``stop_dictionary``, ``stop_encoder`` (their stop
        reasons, "" if skipped); ``seconds`` (wall time of the iteration);
        ``lambda_d``, ``lambda_z``, ``lambda_g``, ``lambda_e`` (the weights of
        the objective measured); ``balanced`` (True on the iteration after
        which the weights were rescaled, see ``rebalance``).
    n_iter : int
        Outer iterations performed.
    stop_reason : {"rtol", "max_outer"}
    config : ModelConfig or None
        The configuration the model was trained with: the one given, with the
        rescaled weights when ``balance_lambdas`` is set (to encode new data
        with the same objective).
    """

    components: np.ndarray
    encoder: np.ndarray | None
    codes: np.ndarray
    history: list[dict[str, Any]]
    n_iter: int
    stop_reason: str
    config: ModelConfig | None = None


def relative_change(previous: float | None, total: float) -> float:
    """The outer stopping quantity ``|F_prev - F| / |F|`` (NaN without a previous value).

    >>> relative_change(110.0, 100.0), relative_change(None, 1.0)
    (0.1, nan)
    """
    if previous is None:
        return float("nan")
    return abs(previous - total) / max(abs(total), np.finfo(np.float64).tiny)


def log_outer(log: logging.Logger, record: dict[str, Any]) -> None:
    """One progress line for an outer iteration's history record (see `FitResult`)."""
    log.info(
        "outer %d: objective %.6g (rel. change %.2e), non-zeros %.2f%%, inner Z/D/E %d/%d/%d, %.2f s",
        record["iteration"], record["total"], record["relative_change"], record["sparsity_percent"],
        record["inner_codes"], record["inner_dictionary"], record["inner_encoder"], record["seconds"],
    )


def fit_sae(
    X: np.ndarray,
    config: ModelConfig,
    laplacian: Any = None,
    *,
    init: dict[str, np.ndarray] | None = None,
    callback: Callable[[FitState], None] | None = None,
) -> FitResult:
    """Fit the structured auto-encoder by alternating minimisation.

    Minimises ``F(Z, C, E)`` (module docstring).  Initialisation as the thesis:
    ``C`` then ``E`` drawn uniform on [0, 1) from
    ``np.random.default_rng(config.random_state)`` with rows scaled to unit
    norm, ``Z = 0``; ``init`` may supply any of ``"components"``, ``"encoder"``,
    ``"codes"`` instead (e.g. to resume).  Every outer iteration runs the Z
    step, then the D step (if ``lambda_d > 0``), then the E step (if
    ``lambda_e > 0``), each warm-started from the current iterate with
    ``rtol = config.inner_tolerance``, ``atol = config.atol`` and
    ``max_iter = config.max_inner``; the Z step's solver is
    ``config.z_solver`` (see :func:`solve_codes`'s ``method``).  Stops when
    ``|F_prev - F| <= config.rtol |F|`` ("rtol") or after ``config.max_outer``
    iterations ("max_outer").  With ``config.balance_lambdas``, the weights
    ``lambda_d``, ``lambda_g``, ``lambda_e`` are rescaled after the first outer
    iteration so that every weighted term equals ``lambda_z ||Z||_1``
    (`balanced_weights`, `rebalance`), and training goes on with them
    (``FitResult.config`` holds them).

    Every array of the computation is in ``config.dtype``: ``X`` and the
    Laplacian are converted (copied) if they are not.  ``||L||_2`` is estimated
    once per fit.  One log line per outer iteration (logger ``sae.model``),
    then ``callback(FitState(...))``.

    Parameters
    ----------
    X : array (N, n)
    config : ModelConfig
    laplacian : sparse (N, N), optional
        Required when ``config.lambda_g > 0``.
    init : dict, optional
    callback : callable, optional

    Returns
    -------
    FitResult
    """
    dtype = np.dtype(config.dtype)
    X = np.asarray(X, dtype=dtype)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}")
    n_samples, n_features = X.shape
    m = config.n_atoms
    laplacian = _check_laplacian(laplacian, n_samples, config.lambda_g, dtype)
    laplacian_norm = spectral_norm(laplacian) if laplacian is not None else None

    init = dict(init or {})
    rng = np.random.default_rng(config.random_state)
    C = init_dictionary(m, n_features, rng=rng, dtype=dtype)
    E = init_encoder(m, n_features, rng=rng, dtype=dtype) if config.lambda_e > 0 else None
    if "components" in init:
        C = np.array(init["components"], dtype=dtype)
    if "encoder" in init and config.lambda_e > 0:
        E = np.array(init["encoder"], dtype=dtype)
    Z = np.array(init["codes"], dtype=dtype) if "codes" in init else np.zeros((n_samples, m), dtype=dtype)
    for name, array, shape in (("components", C, (m, n_features)), ("codes", Z, (n_samples, m))) + (
        (("encoder", E, (m, n_features)),) if E is not None else ()
    ):
        if array.shape != shape:
            raise ValueError(f"init[{name!r}] must have shape {shape}, got {array.shape}")

    XtX = X.T @ X if E is not None else None
    X_sq_norm = inner(X, X)
    inner_kw = dict(rtol=config.inner_tolerance, atol=config.atol, max_iter=config.max_inner,
                    restart=config.fista_restart)

    def record_of(iteration: int, seconds: float, steps: dict[str, SolverResult | None], previous: float | None):
        record: dict[str, Any] = {"iteration": iteration}
        record.update(objective_terms(X, Z, C, E, laplacian, config))
        record["relative_change"] = relative_change(previous, record["total"])
        record["sparsity_percent"] = 100.0 * np.count_nonzero(Z) / max(Z.size, 1)
        for name in ("codes", "dictionary", "encoder"):
            result = steps.get(name)
            record[f"inner_{name}"] = 0 if result is None else result.n_iter
            record[f"stop_{name}"] = "" if result is None else result.stop_reason
        record["seconds"] = seconds
        return record

    history = [record_of(0, 0.0, {}, None)]
    stop_reason = "max_outer"
    iteration = 0
    for iteration in range(1, config.max_outer + 1):
        start = time.perf_counter()
        steps: dict[str, SolverResult | None] = {}
        result = solve_codes(
            X, C, E, laplacian, Z,
            lambda_d=config.lambda_d, lambda_z=config.lambda_z,
            lambda_g=config.lambda_g, lambda_e=config.lambda_e,
            laplacian_norm=laplacian_norm, method=config.z_solver, **inner_kw,
        )
        Z = result.solution
        steps["codes"] = result
        if config.lambda_d > 0 or E is not None:
            ZtX = Z.T @ X
        if config.lambda_d > 0:
            result = solve_dictionary(Z.T @ Z, ZtX, C, lambda_d=config.lambda_d, data_sq_norm=X_sq_norm, **inner_kw)
            C = result.solution
            steps["dictionary"] = result
        if E is not None:
            result = solve_encoder(XtX, ZtX, E, lambda_e=config.lambda_e, codes_sq_norm=inner(Z, Z), **inner_kw)
            E = result.solution
            steps["encoder"] = result
        record = record_of(iteration, time.perf_counter() - start, steps, history[-1]["total"])
        history.append(record)
        if config.balance_lambdas and iteration == 1:
            config = rebalance(history, config)
        log_outer(logger, record)
        if callback is not None:
            callback(FitState(iteration=iteration, codes=Z, components=C, encoder=E, record=record))
        if record["relative_change"] <= config.rtol and not record.get("balanced"):
            stop_reason = "rtol"
            break
    return FitResult(components=C, encoder=E, codes=Z, history=history, n_iter=iteration, stop_reason=stop_reason,
                     config=config)


def rebalance(history: list[dict[str, Any]], config: ModelConfig) -> ModelConfig:
    """``config`` with `balanced_weights` of ``history[-1]``; the history re-weighted in place.

    Every record gets the new weighted terms, total and weights (`weigh_terms`),
    so the whole history measures one objective, the one trained from here on;
    the last record's ``relative_change`` is recomputed against the previous
    one, and it is marked ``balanced = True``.  Without a change (all-zero codes)
    ``config`` is returned as it is, with a warning.
    """
    record = history[-1]
    update = balanced_weights(record, config)
    if not update:
        logger.warning("balance_lambdas: the codes are all zero after outer iteration %d, weights kept "
                       "(lower lambda_z or raise lambda_d)", record["iteration"])
        return config
    before = {name: getattr(config, name) for name in update}
    config = config.model_copy(update=update)
    for entry in history:
        entry.update(weigh_terms(entry, config))
    if len(history) > 1:
        record["relative_change"] = relative_change(history[-2]["total"], record["total"])
    record["balanced"] = True
    logger.info("balance_lambdas after outer iteration %d: %s", record["iteration"],
                ", ".join(f"{name} {before[name]:.4g} -> {value:.4g}" for name, value in update.items()))
    return config
