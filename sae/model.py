"""The structured auto-encoder: objective, Z step and the in-memory fit.

Orientation (see :mod:`sae`): ``X`` (N, n) data, ``Z`` (N, m) codes,
``C`` (m, n) components (the thesis's ``D = C^T``), ``E`` (m, n) encoder,
``L`` (N, N) graph Laplacian.  The objective is

    F(Z, C, E) = lambda_d/2 ||X - Z C||_F^2 + lambda_z ||Z||_1
                 + lambda_g/2 tr(Z^T L Z) + lambda_e/2 ||Z - X E^T||_F^2

subject to every row of ``C`` and of ``E`` having an l2 norm ``<= 1`` (unit
ball).  A weight of 0 removes its term: ``lambda_e = 0`` learns no encoder
(``encoder`` is ``None``), ``lambda_g = 0`` needs no Laplacian,
``lambda_d = 0`` keeps the components at their initialisation.

:func:`fit_sae` runs the outer loop of :mod:`sae.outer` (the one the
distributed trainer runs too) on arrays in memory: a Z step
(:func:`solve_codes`: FISTA, or coordinate descent per frame when
``lambda_g = 0``, see ``ModelConfig.z_solver``), a D step and an E step
(:func:`sae.outer.solve_dictionary`, :func:`sae.outer.solve_encoder`), each
warm-started.  The D and E steps only see the sufficient statistics
``Z^T Z``, ``Z^T X`` and ``X^T X``, so a distributed trainer reduces them over
blocks of frames and calls the same functions.  The history record, the
weights' bookkeeping and the outer stopping rule are :mod:`sae.outer`'s, and
re-exported here.

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
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from sae.config import ModelConfig
from sae.coordinate import coordinate_descent_codes
from sae.lars import lars_codes
from sae.online import fit_online
from sae.outer import (
    TERM_NAMES,
    TERM_WEIGHTS,
    FitResult,
    FitState,
    alternate,
    balanced_weights,
    inner_options,
    log_outer,
    rebalance,
    relative_change,
    solve_dictionary,
    solve_encoder,
    weigh_terms,
)
from sae.solvers import LIPSCHITZ_SAFETY, SolverResult, fista, spectral_norm
from sae.terms import (
    CodeEncoderFit,
    CodeReconstruction,
    GraphDirichlet,
    L1Norm,
    QuadraticTerm,
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
    "sample_dictionary",
    "initial_dictionary",
    "solve_codes",
    "solve_dictionary",
    "solve_encoder",
    "encode_direct",
    "check_laplacian",
    "code_lipschitz",
    "code_step_options",
    "code_terms",
    "TERM_NAMES",
    "TERM_WEIGHTS",
    "weigh_terms",
    "balanced_weights",
    "relative_change",
    "rebalance",
    "log_outer",
]

logger = logging.getLogger("sae.model")

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


def sample_dictionary(X: Any, n_atoms: int, *, rng: RandomLike = None, dtype: Any = np.float32) -> np.ndarray:
    """Initial components (m, n): ``n_atoms`` distinct rows of ``X`` drawn at random, each scaled to unit norm.

    Rows are taken in the order of ``rng.permutation(N)``, skipping rows whose
    norm is zero (silence) or not finite.  ``X``: an (N, n) array in memory or
    a Zarr array (rows read in batches of ``2 n_atoms``).

    >>> X = np.arange(12.0).reshape(6, 2)
    >>> C = sample_dictionary(X, 3, rng=0)
    >>> C.shape, bool(np.allclose(np.linalg.norm(C, axis=1), 1))
    ((3, 2), True)
    """
    rng = np.random.default_rng(rng)
    n_samples = int(X.shape[0])
    order = rng.permutation(n_samples)
    atoms: list[np.ndarray] = []
    found = 0
    for start in range(0, n_samples, 2 * n_atoms):
        rows = order[start:start + 2 * n_atoms]
        ascending = np.argsort(rows)
        values = np.empty((len(rows), int(X.shape[1])))
        values[ascending] = _take_rows(X, rows[ascending])
        norms = np.linalg.norm(values, axis=1)
        usable = np.flatnonzero(np.isfinite(norms) & (norms > 0))[:n_atoms - found]
        atoms.append(values[usable] / norms[usable, None])
        found += len(usable)
        if found == n_atoms:
            return np.concatenate(atoms).astype(dtype)
    raise ValueError(f"init='frames' needs n_atoms = {n_atoms} non-zero frames, the data has {found}: "
                     "use init='uniform' or fewer atoms")


def _take_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` (``rows`` ascending) of an array in memory or a Zarr array (orthogonal indexing)."""
    if isinstance(X, np.ndarray):
        return X[rows]
    oindex = getattr(X, "oindex", None)
    return np.asarray(oindex[rows, :] if oindex is not None else X[rows])


def initial_dictionary(X: Any, config: Any, rng: np.random.Generator, dtype: Any) -> np.ndarray:
    """The initial components of a fit of ``X`` by ``config.init`` (`init_dictionary` or `sample_dictionary`)."""
    if config.init == "frames":
        return sample_dictionary(X, config.n_atoms, rng=rng, dtype=dtype)
    return init_dictionary(config.n_atoms, int(X.shape[1]), rng=rng, dtype=dtype)


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


def check_laplacian(laplacian: Any, n_samples: int, lambda_g: float) -> None:
    """The Laplacian argument of a fit or Z step: required (N, N) when ``lambda_g > 0``, ignored otherwise.

    >>> check_laplacian(None, 3, lambda_g=1.0)
    Traceback (most recent call last):
    ...
    ValueError: laplacian is required when lambda_g > 0 (got lambda_g=1.0 and laplacian=None): pass an (n_samples, n_samples) sparse matrix (to the distributed fit, also a LaplacianRef), or set lambda_g=0
    """
    if lambda_g == 0:
        return
    if laplacian is None:
        raise ValueError(
            f"laplacian is required when lambda_g > 0 (got lambda_g={lambda_g!r} and laplacian=None): "
            "pass an (n_samples, n_samples) sparse matrix (to the distributed fit, also a LaplacianRef), "
            "or set lambda_g=0"
        )
    shape = getattr(laplacian, "shape", None)
    if shape is None or len(shape) != 2 or tuple(shape) != (n_samples, n_samples):
        raise ValueError(
            f"laplacian must have shape (n_samples, n_samples) = ({n_samples}, {n_samples}), "
            f"got {None if shape is None else tuple(shape)}"
        )


def _as_laplacian(laplacian: Any, n_samples: int, lambda_g: float, dtype: Any) -> Any:
    """`check_laplacian`, then ``laplacian`` in ``dtype`` (None when ``lambda_g = 0``)."""
    check_laplacian(laplacian, n_samples, lambda_g)
    if lambda_g == 0:
        return None
    if sp.issparse(laplacian):
        return laplacian.astype(dtype, copy=False)
    return np.asarray(laplacian, dtype=dtype)


def code_lipschitz(
    components: np.ndarray, *, lambda_d: float, lambda_e: float, lambda_g: float, laplacian_norm: float | None
) -> float:
    """``beta``, the inverse step of the FISTA Z step: ``1.01 (lambda_d ||C C^T||_2 + lambda_e + lambda_g ||L||_2)``.

    The sum of the Lipschitz constants of the smooth terms' gradients
    (:data:`sae.solvers.LIPSCHITZ_SAFETY` times, as :func:`sae.solvers.fista`);
    ``||C C^T||_2`` by a power iteration on the smaller Gram matrix of ``C``
    (m, n); ``laplacian_norm``: ``||L||_2`` or an upper bound (None when
    ``lambda_g = 0``).  1 when every weight is 0.

    >>> code_lipschitz(np.eye(2), lambda_d=1.0, lambda_e=0.0, lambda_g=2.0, laplacian_norm=2.0)
    5.05
    """
    norms = []
    if lambda_d > 0:
        m, n = components.shape
        small = components @ components.T if m <= n else components.T @ components
        norms.append(lambda_d * spectral_norm(small))
    if lambda_e > 0:
        norms.append(float(lambda_e))
    if lambda_g > 0:
        norms.append(lambda_g * float(laplacian_norm))
    beta = LIPSCHITZ_SAFETY * sum(norms)
    return beta if beta > 0 else 1.0


def code_step_options(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`solve_codes` that ``config`` sets (weights, tolerances, solver, rule)."""
    return dict(
        lambda_d=config.lambda_d, lambda_z=config.lambda_z, lambda_g=config.lambda_g, lambda_e=config.lambda_e,
        **inner_options(config), method=config.z_solver, stop=config.z_stop,
    )


def code_terms(
    X: np.ndarray, components: np.ndarray, encoder: np.ndarray | None, lambda_d: float, lambda_e: float
) -> list[QuadraticTerm]:
    """The Z step's smooth terms but the graph's, in ``X``'s dtype.

    ``lambda_d/2 ||X - Z C||^2`` (`CodeReconstruction`) when ``lambda_d > 0``,
    then ``lambda_e/2 ||Z - X E^T||^2`` (`CodeEncoderFit`) when ``lambda_e > 0``.
    """
    terms: list[QuadraticTerm] = []
    if lambda_d > 0:
        terms.append(CodeReconstruction(X, components, lambda_d))
    if lambda_e > 0:
        if encoder is None:
            raise ValueError(f"encoder is required when lambda_e > 0, got encoder=None and lambda_e={lambda_e!r}")
        terms.append(CodeEncoderFit(X, np.asarray(encoder, dtype=X.dtype), lambda_e))
    return terms


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
    method: Literal["auto", "fista", "cd", "lars"] = "auto",
    n_threads: int | None = None,
    stop: Literal["gap", "change"] = "gap",
) -> SolverResult:
    """Z step: minimise over ``Z`` the objective with ``C`` and ``E`` fixed.

    ``lambda_d/2 ||X - Z C||^2 + lambda_z ||Z||_1 + lambda_g/2 tr(Z^T L Z) + lambda_e/2 ||Z - X E^T||^2``.

    Smooth part ``1/2 <Z, A(Z)> - <Z, B> + c`` with
    ``A(Z) = lambda_d Z C C^T + lambda_e Z + lambda_g L Z`` (N, m) and
    ``B = lambda_d X C^T + lambda_e X E^T`` (N, m); prox: soft-thresholding at
    ``lambda_z / beta``, ``beta`` = :func:`code_lipschitz`.  FISTA warm-started
    from ``Z0``, stopped (``stop="gap"``) when the duality gap of the iterate
    is at most ``rtol`` times its objective (:func:`sae.solvers.duality_gap`:
    ``F(Z) - min F <= rtol F(Z)``, what the coordinate-descent Z step
    certifies per frame), or ``stop="change"`` on the relative change of the
    objective (the original rule).  ``lambda_z = 0`` always uses the change.

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
    single-threaded workers); "lars" (also only when ``lambda_g = 0``) is
    :func:`sae.lars.lars_codes`, every frame's lasso solved exactly by its homotopy
    path (no warm start), certified by the same per-frame gap; ``restart``,
    ``laplacian_norm`` and ``stop`` are FISTA's only.  "auto" is "cd" when ``lambda_g = 0``, else "fista".  Both return a
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
    if method not in ("auto", "fista", "cd", "lars"):
        raise ValueError(f"method must be one of 'auto', 'fista', 'cd', 'lars', got {method!r}")
    if method in ("cd", "lars") and lambda_g > 0:
        raise ValueError(
            f"method={method!r} needs lambda_g = 0 (frames are then independent), got lambda_g={lambda_g!r}: "
            "use method='fista' or 'auto'"
        )
    X = np.asarray(X)
    dtype = X.dtype
    components = np.asarray(components, dtype=dtype)
    Z0 = np.asarray(Z0, dtype=dtype)
    if Z0.shape != (X.shape[0], components.shape[0]):
        expected = (X.shape[0], components.shape[0])
        raise ValueError(f"Z0 must have shape (n_samples, n_atoms) = {expected}, got {Z0.shape}")
    laplacian = _as_laplacian(laplacian, X.shape[0], lambda_g, dtype)
    if laplacian is None and lambda_d <= 0 and lambda_e <= 0:  # no smooth term: argmin of lambda_z ||Z||_1 is 0
        Z = np.zeros_like(Z0)
        value = L1Norm(lambda_z).value(Z0)
        return SolverResult(Z, 1, "rtol", np.array([value, 0.0]))  # exact in one step
    if laplacian is None and method in ("auto", "cd", "lars"):
        solver = lars_codes if method == "lars" else coordinate_descent_codes
        return solver(
            X, components, encoder if lambda_e > 0 else None, Z0, lambda_d=lambda_d, lambda_z=lambda_z,
            lambda_e=lambda_e, rtol=rtol, atol=atol, max_iter=max_iter, n_threads=n_threads,
        )
    terms = code_terms(X, components, encoder, lambda_d, lambda_e)
    if laplacian is not None:
        laplacian_norm = spectral_norm(laplacian) if laplacian_norm is None else laplacian_norm
        terms.append(GraphDirichlet(laplacian, lambda_g, laplacian_norm=laplacian_norm))
    beta = code_lipschitz(components, lambda_d=lambda_d, lambda_e=lambda_e, lambda_g=lambda_g,
                          laplacian_norm=laplacian_norm)
    return fista(terms, L1Norm(lambda_z), Z0, rtol=rtol, atol=atol, max_iter=max_iter, lipschitz=beta,
                 restart=restart, stop=stop)


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




class _InMemory:
    """The `sae.outer.Backend` of arrays in memory: ``X`` (N, n), ``L`` (N, N) or None, codes an (N, m) array."""

    logger = logger

    def __init__(self, X: np.ndarray, laplacian: Any, config: ModelConfig) -> None:
        self.X = X
        self.n_samples = X.shape[0]
        self.laplacian = _as_laplacian(laplacian, X.shape[0], config.lambda_g, X.dtype)
        self.laplacian_norm = spectral_norm(self.laplacian) if self.laplacian is not None else None

    def code_step(self, Z: np.ndarray, C: np.ndarray, E: np.ndarray | None, config: ModelConfig,
                  iteration: int) -> tuple[np.ndarray, dict[str, Any]]:
        result = solve_codes(self.X, C, E, self.laplacian, Z, laplacian_norm=self.laplacian_norm,
                             **code_step_options(config))
        return result.solution, {"n_iter": result.n_iter, "stop_reason": result.stop_reason}

    def statistics(self, Z: np.ndarray) -> dict[str, Any]:
        return {"ZtZ": Z.T @ Z, "ZtX": Z.T @ self.X, "Z_sq": inner(Z, Z)}

    def data_statistics(self) -> dict[str, Any]:
        return {"XtX": self.X.T @ self.X, "X_sq": inner(self.X, self.X)}

    def terms(self, Z: np.ndarray, C: np.ndarray, E: np.ndarray | None, step: Any, statistics: Any) -> dict[str, Any]:
        residual = self.X - Z @ C
        out: dict[str, Any] = {
            "reconstruction": inner(residual, residual),
            "sparsity": float(np.abs(Z).sum(dtype=np.float64)),
            "graph": inner(Z, self.laplacian @ Z) if self.laplacian is not None else float("nan"),
            "encoder": float("nan"),
            "nnz": int(np.count_nonzero(Z)),
        }
        if E is not None:
            R = Z - self.X @ E.T
            out["encoder"] = inner(R, R)
        return out

    def save(self, iteration: int, Z: np.ndarray, C: np.ndarray, E: np.ndarray | None, history: list,
             stop_reason: str) -> np.ndarray:
        return Z


def fit_sae(
    X: np.ndarray,
    config: ModelConfig,
    laplacian: Any = None,
    *,
    init: dict[str, np.ndarray] | None = None,
    callback: Callable[[FitState], None] | None = None,
) -> FitResult:
    """Fit the structured auto-encoder by alternating minimisation, in memory.

    Minimises ``F(Z, C, E)`` (module docstring) with the outer loop of
    :func:`sae.outer.alternate`.  Initialisation as the thesis: ``C`` then ``E``
    drawn uniform on [0, 1) from ``np.random.default_rng(config.random_state)``
    with rows scaled to unit norm, ``Z = 0``; with ``config.init = "frames"``,
    ``C`` is `sample_dictionary` of ``X`` from the same generator; ``init`` may supply any of
    ``"components"``, ``"encoder"``, ``"codes"`` instead (e.g. to resume).
    Every outer iteration runs the Z step (:func:`solve_codes` with
    :func:`code_step_options`), then the D step (if ``lambda_d > 0``), then the
    E step (if ``lambda_e > 0``), each warm-started from the current iterate
    with ``rtol = config.inner_tolerance`` (``config.dictionary_tolerance`` for
    the D and E steps), ``atol = config.atol`` and ``max_iter = config.max_inner``.  Stops when ``|F_prev - F| <= config.rtol |F|``
    ("rtol") or after ``config.max_outer`` iterations ("max_outer").  With
    ``config.balance_lambdas``, the weights ``lambda_d``, ``lambda_g``,
    ``lambda_e`` are rescaled after the first outer iteration so that every
    weighted term equals ``lambda_z ||Z||_1`` (`balanced_weights`, `rebalance`),
    and training goes on with them (``FitResult.config`` holds them).

    With ``config.fit_method = "online"`` (no graph term) the dictionary (and
    encoder) are learned by mini-batches instead, for at most ``max_outer``
    epochs, then every frame is coded once (:mod:`sae.online`).

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
    backend = _InMemory(X, laplacian, config)

    init = dict(init or {})
    rng = np.random.default_rng(config.random_state)
    # given components still take the uniform draw, so that the encoder's comes from the same point of the stream
    C = (initial_dictionary(X, config, rng, dtype) if "components" not in init
         else init_dictionary(m, n_features, rng=rng, dtype=dtype))
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
    if config.fit_method == "online":
        return fit_online(backend, lambda start, stop: X[start:stop], config, C, E, Z, rng, callback=callback)
    return alternate(backend, config, C, E, Z, callback=callback)
