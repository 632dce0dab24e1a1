"""Solvers: FISTA for ``sum of quadratic terms + one proximal term``, and spectral norms.

The solver owns the iteration and the stopping rules; the terms
(:mod:`sae.terms`) only know their value, gradient or proximal map.  A call
has no hidden state: the momentum starts afresh at every call (restart per
sub-problem) and the iteration warm-starts from ``x0``.

>>> import numpy as np
>>> from sae.terms import CodeReconstruction, L1Norm
>>> rng = np.random.default_rng(0)
>>> X, C = rng.random((6, 4)), rng.random((3, 4))
>>> result = fista([CodeReconstruction(X, C, 10.0)], L1Norm(1.0), np.zeros((6, 3)), rtol=1e-10)
>>> result.stop_reason, bool(result.objective[-1] < result.objective[0])
('rtol', True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from numba import njit

from sae.terms import L1Norm, QuadraticTerm, inner

__all__ = [
    "SolverResult",
    "fista",
    "spectral_norm",
    "stop_reason",
    "LIPSCHITZ_SAFETY",
    "next_momentum",
    "duality_gap",
    "gap_stop_code",
    "gap_stop_reason",
    "STOP_CODES",
    "GAP_EVERY",
    "gap_due",
]

logger = logging.getLogger(__name__)

#: The step is ``1 / (LIPSCHITZ_SAFETY * beta)``.  ``beta`` comes from power
#: iterations, which approach ``||A||_2`` from below; with the tolerances of
#: :func:`spectral_norm` the estimate is within ~1e-4 of the true value, so a
#: 1 % margin keeps the step below ``1 / ||A||_2`` (the FISTA convergence
#: condition) at a negligible cost in speed.
LIPSCHITZ_SAFETY = 1.01

StopReason = Literal["rtol", "atol", "max_iter"]

STOP_CODES: tuple[StopReason, ...] = ("max_iter", "rtol", "atol")
"""Stop reasons by the integer codes of `gap_stop_code` (0: not stopped, so far "max_iter")."""

#: The duality gap of FISTA's iterate ``x_k`` is evaluated when ``k`` is a multiple of this, and at ``max_iter``.
GAP_EVERY = 5


class ProxTerm(Protocol):
    """What :func:`fista` needs from the non-smooth term."""

    def value(self, V: np.ndarray) -> float: ...

    def prox(self, V: np.ndarray, step: float) -> np.ndarray: ...


@dataclass(frozen=True)
class SolverResult:
    """Outcome of one solve.

    Attributes
    ----------
    solution : ndarray
        The last iterate (or ``x0`` if the last iterate is worse than the start,
        see :func:`fista`); same shape and dtype as ``x0``.
    n_iter : int
        Iterations performed (applications of the operator after the first).
    stop_reason : {"rtol", "atol", "max_iter"}
        Which criterion stopped the iteration.
    objective : ndarray of float64, shape (n_iter + 1,)
        Objective at ``x0`` then after every iteration.
    gap : float
        The last duality gap evaluated (FISTA's gap rule), NaN if none.
    """

    solution: np.ndarray
    n_iter: int
    stop_reason: StopReason
    objective: np.ndarray
    gap: float = float("nan")


def spectral_norm(
    operator: Any,
    *,
    size: int | None = None,
    rtol: float = 1e-9,
    max_iter: int = 2000,
    random_state: int | np.random.Generator | None = 0,
) -> float:
    """Largest eigenvalue ``||A||_2`` of a symmetric positive semi-definite operator.

    Power iteration ``v <- A v / ||A v||`` from a seeded random start; the
    estimate ``||A v||`` (``v`` unit) is a lower bound of ``||A||_2`` that
    increases to it.  Stops when its relative change is ``<= rtol`` or after
    ``max_iter`` iterations.  For a gap ``delta`` between the two largest
    eigenvalues the remaining error is at most about ``min(delta, 1/(2 e k))``
    relative after ``k`` iterations, well within :data:`LIPSCHITZ_SAFETY`.

    Parameters
    ----------
    operator : ndarray (n, n), scipy sparse (n, n), LinearOperator or callable
        The matrix, or a function ``v -> A v`` on 1-D arrays of length ``size``.
    size : int, optional
        Dimension ``n``; required when ``operator`` is a plain callable.
    rtol, max_iter : float, int
        Stopping rule of the power iteration.
    random_state : int, Generator or None
        Seed of the starting vector.

    Returns
    -------
    float
        The estimate of ``||A||_2`` (0 for the zero operator).  Vectors are
        float64 whatever the operator's dtype; a float32 matrix is copied to
        float64 (it is small: an (m, m) Gram or the sparse Laplacian).

    >>> A = np.diag([1.0, 3.0, 2.0])
    >>> round(spectral_norm(A), 6)
    3.0
    >>> import scipy.sparse as sp
    >>> round(spectral_norm(sp.csr_array(A)), 6)
    3.0
    """
    if callable(operator) and not hasattr(operator, "shape"):
        if size is None:
            raise ValueError("size is required when operator is a callable (the dimension of its input)")
        n = int(size)
        matvec: Callable[[np.ndarray], np.ndarray] = operator
    else:
        shape = operator.shape
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"operator must be square, got shape {shape}")
        n = shape[0]
        if isinstance(operator, spla.LinearOperator):
            matvec = operator.matvec
        else:
            if sp.issparse(operator):
                mat = operator.astype(np.float64, copy=False)
            else:
                mat = np.asarray(operator, dtype=np.float64)
            matvec = mat.__matmul__
    if n == 0:
        return 0.0
    rng = np.random.default_rng(random_state)
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    estimate = 0.0
    for _ in range(max_iter):
        w = np.asarray(matvec(v), dtype=np.float64).ravel()
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(norm - estimate) <= rtol * norm:
            return norm
        estimate = norm
    logger.debug("spectral_norm: no convergence to rtol=%g in %d iterations", rtol, max_iter)
    return estimate


def next_momentum(t: float) -> float:
    """FISTA's sequence ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2`` (``t_1 = 1``).

    The extrapolation weight of iteration ``k`` is ``(t_k - 1) / t_{k+1}``.

    >>> next_momentum(1.0)
    1.618033988749895
    """
    return (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0


def stop_reason(history: Sequence[float], rtol: float, atol: float) -> StopReason | None:
    """The stopping rule of FISTA on an objective history (``len(history) >= 2``).

    ``"rtol"`` if ``|F_k - F_{k-1}| <= rtol |F_k|``, else ``"atol"`` if
    ``|F_k - F_{k-1}| <= atol``, else None.  The distributed trainer applies the
    same rule, so both stop at the same iteration.

    >>> stop_reason([10.0, 9.99999], rtol=1e-5, atol=0.0)
    'rtol'
    >>> stop_reason([10.0, 9.0], rtol=1e-5, atol=0.0) is None
    True
    """
    change = abs(history[-1] - history[-2])
    if change <= rtol * abs(history[-1]):
        return "rtol"
    if change <= atol:
        return "atol"
    return None


@njit(cache=True, nogil=True)
def duality_gap(smooth, l1, dot, largest, weight, objective=None):  # pragma: no cover - compiled
    """Duality gap of ``min_Z P(Z) = f(Z) + weight ||Z||_1`` at ``Z``, from the dual point of a point ``W``.

    ``f`` is a convex quadratic, a sum of squared norms of affine maps:
    ``f(Z) = 1/2 ||K(Z) - Y||^2``.  For the Z step (orientation of :mod:`sae`:
    ``Z``, ``W`` (N, m), ``X`` (N, n), ``C`` and ``E`` (m, n), ``L`` (N, N)),
    ``f(Z) = lambda_d/2 ||X - Z C||^2 + lambda_e/2 ||Z - X E^T||^2 + lambda_g/2 tr(Z^T L Z)``;
    with ``L = B B^T`` (``B`` (N, p), never formed),
    ``K(Z) = (sqrt(lambda_d) Z C, sqrt(lambda_e) Z, sqrt(lambda_g) B^T Z)`` and
    ``Y = (sqrt(lambda_d) X, sqrt(lambda_e) X E^T, 0)``.  The dual (Lasso) is
    ``max D(theta) = <Y, theta> - 1/2 ||theta||^2`` s.t. ``||K^*(theta)||_inf <= weight``.
    The residual ``R = Y - K(W)`` has ``K^*(R) = Q = -grad f(W)``
    (N, m), ``Q = lambda_d (X - W C) C^T + lambda_e (X E^T - W) - lambda_g L W``:
    the graph part needs only ``L W`` and, in ``f(W)``, ``tr(W^T L W)``.  The dual
    point ``theta = s R`` with ``s = min(1, weight / ||Q||_inf)`` is feasible, and
    with ``||R||^2 / 2 = f(W)`` and ``<Y, R> = 2 f(W) + <W, Q>``::

        gap = P(Z) - D(s R) = [P(Z) - P(W)] + (1 - s)^2 f(W) + weight ||W||_1 - s <W, Q>  >= P(Z) - min P

    Arguments: ``smooth = f(W)``, ``l1 = ||W||_1``, ``dot = <W, grad f(W)>`` (=
    ``-<W, Q>``), ``largest = ||grad f(W)||_inf``, ``objective = P(Z)`` (None
    when ``Z = W``: the per-frame gap of :mod:`sae.coordinate`).  At the
    minimiser, ``W = Z``, ``s = 1`` and ``weight ||Z||_1 = <Z, Q>``: the gap is 0.
    Needs ``weight > 0`` (else the only dual point is 0).  Clipped at 0 (rounding).

    >>> round(duality_gap(2.0, 1.0, -1.0, 1.0, 1.0), 12)  # at the minimiser of (z - 2)^2 + |z|: z = 1.5
    0.0
    """
    s = 1.0 if largest <= weight else weight / largest
    gap = (1.0 - s) ** 2 * smooth + weight * l1 + s * dot
    if objective is not None:
        gap += objective - (smooth + weight * l1)
    return max(gap, 0.0)


@njit(cache=True, nogil=True)
def gap_stop_code(gap, objective, rtol, atol):  # pragma: no cover - compiled
    """The stopping rule on a duality gap, as an index of `STOP_CODES`: 1 ("rtol") if
    ``gap <= rtol objective``, else 2 ("atol") if ``gap <= atol``, else 0 (go on).

    ``rtol`` is then the relative accuracy of the objective that the gap
    certifies: ``P(Z) - min P <= gap <= rtol P(Z)``.
    """
    if gap <= rtol * objective:
        return 1
    if gap <= atol:
        return 2
    return 0


def gap_due(k: int, max_iter: int) -> bool:
    """Whether the gap rule is tested at FISTA's iterate ``x_k`` (`GAP_EVERY`, and the last one).

    Its parts cost a few more passes over the iterate, so not every
    iteration; a solve then runs at most ``GAP_EVERY - 1`` iterations more
    than needed.

    >>> [k for k in range(13) if gap_due(k, max_iter=12)]
    [5, 10, 12]
    """
    return k >= 1 and (k % GAP_EVERY == 0 or k >= max_iter)


def gap_stop_reason(gap: float, objective: float, rtol: float, atol: float) -> StopReason | None:
    """`gap_stop_code` as a stop reason, None to go on.

    >>> gap_stop_reason(1e-6, 1.0, rtol=1e-5, atol=0.0), gap_stop_reason(1.0, 1.0, rtol=1e-5, atol=0.0)
    ('rtol', None)
    """
    code = gap_stop_code(float(gap), float(objective), float(rtol), float(atol))
    return STOP_CODES[code] if code else None


def _sum_apply(terms: Sequence[QuadraticTerm], V: np.ndarray) -> np.ndarray:
    out = terms[0].apply(V)
    for term in terms[1:]:
        out = out + term.apply(V)
    return out


def _sum_linear(terms: Sequence[QuadraticTerm]) -> np.ndarray | None:
    total = None
    for term in terms:
        B = term.linear
        if B is not None:
            total = B if total is None else total + B
    return total


def fista(
    quadratic_terms: Sequence[QuadraticTerm],
    prox_term: ProxTerm | None,
    x0: np.ndarray,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 500,
    lipschitz: float | None = None,
    restart: bool = True,
    stop: Literal["change", "gap"] = "change",
) -> SolverResult:
    """Minimise ``F(x) = f(x) + g(x)``, ``f`` = sum of quadratic terms, ``g`` = ``prox_term``.

    Every quadratic term is ``f_i(x) = 1/2 <x, A_i(x)> - <x, B_i> + c_i``; so
    ``f(x) = 1/2 <x, A(x)> - <x, B> + c`` with ``A = sum A_i`` etc. and
    ``grad f(x) = A(x) - B``.  FISTA (Beck & Teboulle 2009) with step
    ``1 / beta``, ``beta = LIPSCHITZ_SAFETY * sum_i ||A_i||_2``::

        t_1 = 1, x_0 = x_{-1} = x0
        y_k     = x_k + (t_k - 1) / t_{k+1} (x_k - x_{k-1})
        x_{k+1} = prox_{g / beta}(y_k - (A(y_k) - B) / beta)

    **One application of A per iteration.**  ``A`` is linear, so with
    ``A(x_k)`` and ``A(x_{k-1})`` kept from the previous iterations,
    ``A(y_k) = A(x_k) + (t_k - 1)/t_{k+1} (A(x_k) - A(x_{k-1}))`` costs no new
    application; the one application ``A(x_{k+1})`` then serves both the next
    gradient and the objective ``F(x_{k+1}) = 1/2 <x_{k+1}, A(x_{k+1})> -
    <x_{k+1}, B> + c + g(x_{k+1})`` recorded in the history.

    Stopping, with ``F_k`` the objective after iteration ``k`` (``F_0 = F(x0)``):
    ``|F_k - F_{k-1}| <= rtol |F_k|`` ("rtol"), else ``|F_k - F_{k-1}| <= atol``
    ("atol"), else ``k = max_iter`` ("max_iter").  With ``stop="gap"`` (``g``
    an `sae.terms.L1Norm` of weight ``w > 0``), the change is replaced by the
    duality gap of ``x_k`` (:func:`duality_gap`, at the iterations of
    :func:`gap_due`), with the dual point of ``y_k``, whose gradient the next
    iteration computes anyway: ``gap_k <= rtol F_k`` ("rtol", ``F_k`` is then
    within ``rtol`` relative of the minimum), else ``gap_k <= atol`` ("atol").
    It costs four reductions over ``x`` (``<y, grad>``, ``<y, B>``,
    ``||y||_1``, ``max |grad|``) and no application of ``A``.

    **Adaptive restart** (``restart=True``, O'Donoghue & Candes 2015, gradient
    scheme): when ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0`` the momentum points
    against the descent direction; it is then reset (``t = 1``), so the next
    step is a plain proximal-gradient step from ``x_{k+1}``.  Same fixed
    points and the same ``O(1/k^2)`` guarantee, and far fewer iterations on
    ill-conditioned problems (coherent dictionaries).  ``restart=False`` is the
    plain FISTA of the original implementation.

    FISTA is not monotone: if the last iterate is worse than ``x0`` (possible
    after an early stop), ``x0`` is returned, so a warm-started solve never
    increases the objective.  The momentum is restarted at every call.

    Parameters
    ----------
    quadratic_terms : sequence of QuadraticTerm
        Summed; at least one.
    prox_term : object with ``value`` and ``prox``, or None
        ``None`` means ``g = 0`` (accelerated gradient descent).
    x0 : ndarray
        Starting point; not modified.  Its dtype is the dtype of the computation.
    rtol, atol, max_iter : float, float, int
        Stopping rules (see above).
    lipschitz : float, optional
        ``beta`` to use instead of ``LIPSCHITZ_SAFETY * sum_i term.lipschitz()``.
        When it is 0 (zero operator) a unit step is used.
    restart : bool
        Adaptive (gradient) restart of the momentum; False: plain FISTA.
    stop : {"change", "gap"}
        The stopping quantity: relative change of the objective, or relative
        duality gap (an l1 ``prox_term`` of positive weight only; with another
        one, or a zero weight, the change).

    Returns
    -------
    SolverResult
    """
    if not quadratic_terms:
        raise ValueError("quadratic_terms must contain at least one term, got an empty sequence")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol!r}, atol={atol!r}")
    x0 = np.asarray(x0)
    dtype = x0.dtype
    if lipschitz is None:
        lipschitz = LIPSCHITZ_SAFETY * sum(term.lipschitz() for term in quadratic_terms)
    beta = float(lipschitz) if lipschitz > 0 else 1.0
    step = 1.0 / beta
    step_t = dtype.type(step)

    B = _sum_linear(quadratic_terms)
    c = sum(term.constant for term in quadratic_terms)

    def objective(x: np.ndarray, Ax: np.ndarray) -> float:
        value = 0.5 * inner(x, Ax) + c
        if B is not None:
            value -= inner(x, B)
        if prox_term is not None:
            value += prox_term.value(x)
        return value

    weight = float(getattr(prox_term, "weight", 0.0)) if isinstance(prox_term, L1Norm) else 0.0
    if stop not in ("change", "gap"):
        raise ValueError(f"stop must be 'change' or 'gap', got {stop!r}")
    by_gap = stop == "gap" and weight > 0

    def gap_reason(x: np.ndarray, y: np.ndarray, gradient: np.ndarray) -> StopReason | None:
        """The gap rule for x (objective ``history[-1]``), with the dual point of y (gradient at y)."""
        nonlocal gap
        dot = inner(y, gradient)
        smooth = 0.5 * dot + c - (0.5 * inner(y, B) if B is not None else 0.0)  # f(y) = 1/2 <y, A y> - <y, B> + c
        l1 = prox_term.value(y) / weight
        gap = duality_gap(smooth, l1, dot, float(np.max(np.abs(gradient), initial=0.0)), weight, history[-1])
        return gap_stop_reason(gap, history[-1], rtol, atol)

    def extrapolate(alpha: Any) -> np.ndarray:
        """y = x + alpha (x - x_prev), and A(y) into ``forward`` (A is linear: no new application)."""
        if alpha != 0:
            y = np.subtract(x, x_prev, out=y_buf)
            y *= alpha
            y += x
            np.subtract(Ax, Ax_prev, out=forward)
            np.multiply(forward, alpha, out=forward)
            np.add(forward, Ax, out=forward)
        else:
            y = x
            np.copyto(forward, Ax)
        return y

    gap = float("nan")
    x = x0
    Ax = _sum_apply(quadratic_terms, x)
    x_prev, Ax_prev = x, Ax
    history = [objective(x, Ax)]
    # Work buffers, reused every iteration: the extrapolated point y and the
    # forward step.  Iterates themselves are fresh arrays (from prox and A).
    y_buf = np.empty_like(x)
    forward = np.empty_like(Ax)
    t = 1.0
    stopped: StopReason = "max_iter"
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        t_next = next_momentum(t)
        alpha = dtype.type((t - 1.0) / t_next)
        # forward = y - step (A(y) - B), with y and A(y) extrapolated linearly.
        y = extrapolate(alpha)
        if B is not None:
            forward -= B
        if by_gap and gap_due(n_iter - 1, max_iter):  # forward is grad f(y_k): the gap of x_k, k = n_iter - 1
            reason = gap_reason(x, y, forward)
            if reason is not None:
                stopped, n_iter = reason, n_iter - 1
                break
        forward *= step_t
        np.subtract(y, forward, out=forward)
        x_new = prox_term.prox(forward, step) if prox_term is not None else forward
        if np.shares_memory(x_new, forward):  # an identity prox returns its input
            x_new = x_new.copy()
        Ax_new = _sum_apply(quadratic_terms, x_new)
        if restart and alpha != 0:
            # <y - x_new, x_new - x> > 0: the momentum opposes the descent.
            step_taken = np.subtract(x_new, x, out=forward)  # forward is free after the prox
            if inner(y, step_taken) - inner(x_new, step_taken) > 0:
                t_next = 1.0
        x_prev, Ax_prev, x, Ax, t = x, Ax, x_new, Ax_new, t_next
        history.append(objective(x, Ax))
        reason = None if by_gap else stop_reason(history, rtol, atol)
        if reason is not None:
            stopped = reason
            break
    else:
        if by_gap:  # the last iterate is certified too (as the distributed Z step tests it)
            y = extrapolate(dtype.type((t - 1.0) / next_momentum(t)))
            if B is not None:
                forward -= B
            stopped = gap_reason(x, y, forward) or stopped
    objective_history = np.asarray(history, dtype=np.float64)
    solution = x
    if objective_history[-1] > objective_history[0]:
        logger.debug("fista: last iterate worse than the start (%g > %g): returning x0",
                     objective_history[-1], objective_history[0])
        solution = x0
    return SolverResult(solution=solution, n_iter=n_iter, stop_reason=stopped, objective=objective_history, gap=gap)
