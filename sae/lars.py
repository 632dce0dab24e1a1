"""The Z step without graph term to its exact solution: the lasso of every frame by homotopy (LARS-lasso).

When ``lambda_g = 0`` the Z step separates over frames (:mod:`sae.coordinate`
states the problem): row ``z`` (m,) of ``Z`` minimises

    F(z) = 1/2 z^T G z - z^T b + c + lambda_z ||z||_1,   G = lambda_d C C^T + lambda_e I,
    b = lambda_d C x + lambda_e E x.

The homotopy method (Osborne, Presnell & Turlach 2000; Efron, Hastie,
Johnstone & Tibshirani 2004, "LARS-lasso") follows the solution ``z(t)`` of
this problem with ``t`` in place of ``lambda_z``, from ``t = max_j |b_j|``
(where ``z = 0``) down to ``lambda_z``.  ``z(t)`` is piecewise linear: on each
piece the active set ``A`` (the non-zeros) and their signs ``s`` are fixed,
the correlations ``c = b - G z`` satisfy ``c_A = t s_A`` and ``|c_j| <= t``
elsewhere, and ``z_A`` moves along ``d = G_AA^{-1} s_A``.  A piece ends where
an inactive correlation reaches ``t`` (the atom joins ``A``) or an active code
reaches 0 (it leaves), found in closed form; ``G_AA``'s Cholesky factor is
extended by one row when an atom joins and updated by Givens rotations when one
leaves.  There are at least as many pieces as non-zeros in the solution (137
for 93 on real music at lambda_z = 0.03, m = 512), each costing ``O(m |A|)``:
fast where coordinate descent is slow, with many non-zeros on coherent atoms
(small ``lambda_z``).  SPAMS's ``lasso``, the field's reference, follows the
same path.

The path runs in float64 whatever the data's dtype.  At its end ``z_A`` is
recomputed in one solve, ``G_AA z_A = b_A - lambda_z s_A``, and every frame's
duality gap is computed as in :mod:`sae.coordinate`.  An atom whose column
would make ``G_AA`` singular (more than n atoms with ``lambda_e = 0``,
degenerate data) is left out of the path.  A frame whose gap is above the
tolerance (such an atom left out, a path cut by ``max_iter`` pieces, or float32
codes whose rounding alone leaves the gap above a tight tolerance: half of the
frames at lambda_z = 0.03 and rtol 1e-5) is finished by
:func:`sae.coordinate.coordinate_descent_codes` from where the path ended, in
the working dtype, so the result is certified to the same tolerance as the
coordinate-descent Z step.
The path does not use a warm start (it always starts at ``z = 0``); a frame's
codes depend on that frame alone (``b`` is computed inside the kernel), not on
the batch, the threads or the chunking.

>>> import numpy as np
>>> X = np.array([[3.0, 0.0], [0.5, 0.0]])
>>> result = lars_codes(X, np.eye(2), None, np.zeros((2, 2)), lambda_d=1.0, lambda_z=1.0)
>>> result.solution, result.stop_reason
(array([[2., 0.],
       [0., 0.]]), 'rtol')
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from sae.blas import one_blas_thread
from sae.coordinate import (
    _objective_and_gap,
    _refresh_gradient,
    checked_frame_problem,
    coordinate_descent_codes,
    frame_chunks,
    run_chunks,
)
from sae.solvers import SolverResult

__all__ = ["lars_codes"]

logger = logging.getLogger(__name__)

#: A joining atom whose Cholesky pivot ``G_jj - w^T w`` is at most this times
#: ``G_jj`` is (numerically) in the span of the active atoms: left out.
SINGULAR_PIVOT = 1e-10

# what ends a piece of the path
_END, _JOIN, _LEAVE = 0, 1, 2


@njit(cache=True, nogil=True)
def _frame_rhs(x, Ct, Et, lambda_d, lambda_e, b, ex):  # pragma: no cover - compiled
    """``b = lambda_d C x + lambda_e E x`` (float64) and ``c = ||y||^2 / 2`` of one frame."""
    m = b.shape[0]
    n = x.shape[0]
    xx = 0.0
    for j in range(m):
        b[j] = 0.0
    for k in range(n):
        xk = np.float64(x[k])
        xx += xk * xk
        if xk != 0:
            for j in range(m):
                b[j] += np.float64(Ct[k, j]) * xk
    yy = lambda_d * xx
    for j in range(m):
        b[j] *= lambda_d
    if Et.shape[0] > 0:
        for j in range(m):
            ex[j] = 0.0
        for k in range(n):
            xk = np.float64(x[k])
            if xk != 0:
                for j in range(m):
                    ex[j] += np.float64(Et[k, j]) * xk
        ex_sq = 0.0
        for j in range(m):
            b[j] += lambda_e * ex[j]
            ex_sq += ex[j] * ex[j]
        yy += lambda_e * ex_sq
    return 0.5 * yy


@njit(cache=True, nogil=True)
def _append_cholesky(G, L, active, k, j):  # pragma: no cover - compiled
    """Extend the Cholesky factor ``L`` of ``G_AA`` (``A = active[:k]``) by atom ``j``; False if singular."""
    gjj = G[j, j]
    pivot = gjj
    for p in range(k):
        value = G[active[p], j]
        for r in range(p):
            value -= L[p, r] * L[k, r]
        value /= L[p, p]
        L[k, p] = value
        pivot -= value * value
    if not pivot > SINGULAR_PIVOT * gjj:
        return False
    L[k, k] = np.sqrt(pivot)
    return True


@njit(cache=True, nogil=True)
def _remove_cholesky(L, k, p):  # pragma: no cover - compiled
    """The Cholesky factor of ``G_AA`` without its ``p``-th atom, from ``L`` (``k`` atoms), in ``O((k - p)^2)``.

    Deleting row ``p`` of ``L`` leaves ``L' L'^T = G_A'A'`` with one entry above the diagonal in each row from
    ``p`` on; Givens rotations of neighbouring columns (``L' Q``, ``Q`` orthogonal) make it triangular again, with
    a positive diagonal.  Returns False if a pivot vanishes.
    """
    for i in range(p, k - 1):
        for j in range(i + 2):
            L[i, j] = L[i + 1, j]
    for r in range(p, k - 1):
        x, y = L[r, r], L[r, r + 1]
        h = np.hypot(x, y)
        if not h > 0:
            return False
        cos, sin = x / h, y / h
        for i in range(r, k - 1):
            x, y = L[i, r], L[i, r + 1]
            L[i, r] = cos * x + sin * y
            L[i, r + 1] = cos * y - sin * x
        L[r, r + 1] = 0.0
    return True


@njit(cache=True, nogil=True)
def _solve_cholesky(L, k, rhs, out):  # pragma: no cover - compiled
    """``out = (L L^T)^{-1} rhs`` on the first ``k`` entries, reading ``L`` by rows (contiguous).

    Forward: ``out_p = (rhs_p - L[p, :p] . out[:p]) / L_pp``; backward, column by column of ``L^T``
    (= row by row of ``L``): ``out_p /= L_pp``, then ``out[:p] -= out_p L[p, :p]``.
    """
    for p in range(k):
        value = rhs[p]
        for r in range(p):
            value -= L[p, r] * out[r]
        out[p] = value / L[p, p]
    for p in range(k - 1, -1, -1):
        out[p] /= L[p, p]
        value = out[p]
        for r in range(p):
            out[r] -= value * L[p, r]


@njit(cache=True, nogil=True)
def _path_frame(G, b, lambda_z, max_steps, z, c, a, d, s, rhs, active, state, L):  # pragma: no cover - compiled
    """The homotopy path of one frame, from ``z = 0`` down to ``lambda_z``; returns (pieces, reached the end).

    ``state[j]``: 0 inactive, 1 active, 2 left out (singular).  All arrays float64 but the index arrays.
    """
    m = G.shape[0]
    for j in range(m):
        z[j] = 0.0
        c[j] = b[j]
        state[j] = 0 if G[j, j] > 0 else 2  # a zero atom (lambda_e = 0): no term involves z_j
    top = -1
    t = 0.0
    for j in range(m):
        if state[j] == 0 and abs(c[j]) > t:
            t = abs(c[j])
            top = j
    if top < 0 or t <= lambda_z:
        return 0, True
    _append_cholesky(G, L, active, 0, top)
    active[0] = top
    s[0] = 1.0 if c[top] > 0 else -1.0
    state[top] = 1
    k = 1
    left = -1
    steps = 0
    while steps < max_steps:
        steps += 1
        _solve_cholesky(L, k, s, d)
        for j in range(m):
            a[j] = 0.0
        for p in range(k):
            dp = d[p]
            row = active[p]
            for j in range(m):
                a[j] += dp * G[row, j]
        # the longest step along d: to lambda_z, or to the next atom that joins or leaves
        gamma = t - lambda_z
        event = _END
        who = -1
        for j in range(m):
            if state[j] != 0 or j == left:
                continue
            aj = a[j]
            cj = c[j]
            if aj < 1.0:
                g = (t - cj) / (1.0 - aj)
                if 0.0 < g < gamma:
                    gamma, event, who = g, _JOIN, j
            if aj > -1.0:
                g = (t + cj) / (1.0 + aj)
                if 0.0 < g < gamma:
                    gamma, event, who = g, _JOIN, j
        for p in range(k):
            zj = z[active[p]]
            if zj * d[p] < 0.0:
                g = -zj / d[p]
                if g < gamma:
                    gamma, event, who = g, _LEAVE, p
        for p in range(k):
            z[active[p]] += gamma * d[p]
        for j in range(m):
            c[j] -= gamma * a[j]
        t -= gamma
        left = -1
        if event == _END:
            _polish(b, lambda_z, z, d, s, rhs, active, k, L)
            return steps, True
        if event == _LEAVE:
            j = active[who]
            z[j] = 0.0
            state[j] = 0
            left = j
            if not _remove_cholesky(L, k, who):
                return steps, False
            for p in range(who, k - 1):
                active[p] = active[p + 1]
                s[p] = s[p + 1]
            k -= 1
            if k == 0:
                # every code is back to 0: start again from the largest correlation
                top = -1
                best = 0.0
                for i in range(m):
                    if state[i] == 0 and i != left and abs(c[i]) > best:
                        best = abs(c[i])
                        top = i
                if top < 0:
                    return steps, False
                if not _append_cholesky(G, L, active, 0, top):
                    state[top] = 2
                    return steps, False
                active[0] = top
                s[0] = 1.0 if c[top] > 0 else -1.0
                state[top] = 1
                k = 1
        else:
            if _append_cholesky(G, L, active, k, who):
                active[k] = who
                s[k] = 1.0 if c[who] > 0 else -1.0
                state[who] = 1
                k += 1
            else:
                state[who] = 2
    return steps, False


@njit(cache=True, nogil=True)
def _polish(b, lambda_z, z, d, s, rhs, active, k, L):  # pragma: no cover - compiled
    """At the end of the path, ``z_A`` from one solve of ``G_AA z_A = b_A - lambda_z s_A`` with the path's
    factor (free of the drift of its steps), if that keeps the signs."""
    for p in range(k):
        rhs[p] = b[active[p]] - lambda_z * s[p]
    _solve_cholesky(L, k, rhs, d)
    for p in range(k):
        if d[p] * s[p] <= 0.0:
            return
    for p in range(k):
        z[active[p]] = d[p]


@njit(cache=True, nogil=True)
def _solve_frame(x, Ct, Et, G, lambdas, max_steps, z0, zout, objectives,
                 b, z, c, a, d, s, rhs, ex, active, state, L):  # pragma: no cover - compiled
    """One frame: its path, the result in ``zout`` (working dtype) and ``objectives = [F(z0), F(z), gap]``;
    returns (pieces, reached the end).  The arrays after ``objectives`` are scratch."""
    lambda_d, lambda_e, lambda_z = lambdas[0], lambdas[1], lambdas[2]
    half_yy = _frame_rhs(x, Ct, Et, lambda_d, lambda_e, b, ex)
    _refresh_gradient(G, b, z0, c, a)
    objectives[0] = _objective_and_gap(z0, b, a, half_yy, lambda_z)[0]
    steps, ended = _path_frame(G, b, lambda_z, max_steps, z, c, a, d, s, rhs, active, state, L)
    for j in range(z.shape[0]):
        zout[j] = z[j]
    _refresh_gradient(G, b, zout, c, a)
    objective, gap = _objective_and_gap(zout, b, a, half_yy, lambda_z)
    objectives[1] = objective
    objectives[2] = gap
    return steps, ended


#: Frames in a row that one thread solves: chunks of whole runs keep the threads' writes (codes, objectives,
#: counts) on cache lines of their own, and interleaving the runs balances the load.
RUN = 16


@njit(cache=True, nogil=True)
def _drive_chunk(X, Ct, Et, G, lambdas, max_steps, Z0, Z, steps_out, ended_out, objectives, first, stride):
    # pragma: no cover - compiled
    """Runs of `RUN` frames ``first, first + stride, ...`` with one set of scratch arrays."""
    m = G.shape[0]
    b, z, c, a, d, s, rhs, ex = (np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(m), np.zeros(m),
                                 np.zeros(m), np.zeros(m))
    active = np.zeros(m, np.int64)
    state = np.zeros(m, np.int64)
    L = np.empty((m, m))  # only the entries written are read: no zeroing of (m, m) per chunk
    n_samples = X.shape[0]
    for start in range(first * RUN, n_samples, stride * RUN):
        for i in range(start, min(start + RUN, n_samples)):
            steps, ended = _solve_frame(X[i], Ct, Et, G, lambdas, max_steps, Z0[i], Z[i], objectives[i],
                                        b, z, c, a, d, s, rhs, ex, active, state, L)
            steps_out[i] = steps
            ended_out[i] = ended


@one_blas_thread()
def lars_codes(
    X: np.ndarray,
    components: np.ndarray,
    encoder: np.ndarray | None,
    Z0: np.ndarray,
    *,
    lambda_d: float,
    lambda_z: float,
    lambda_e: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int = 500,
    n_threads: int | None = None,
) -> SolverResult:
    """Z step without graph term, every frame's lasso solved by its homotopy path (module docstring).

    The arguments are those of :func:`sae.coordinate.coordinate_descent_codes`, with the same meaning of
    ``rtol`` and ``atol`` (each frame's duality gap) and threads; ``Z0`` is not a warm start (the path starts at
    ``z = 0``) but the point whose objective opens ``objective``, and ``max_iter`` caps the pieces of each
    frame's path at ``max(max_iter, 4 m)``.

    Returns
    -------
    SolverResult
        ``solution`` (N, m) in ``X``'s dtype; ``objective`` = [objective at ``Z0``, objective of the
        solution]; ``n_iter`` the largest number of pieces of a path or of coordinate-descent sweeps of the
        frames it finished (so that any split of the frames into batches gives the same largest number);
        ``stop_reason`` "rtol", or what coordinate descent gave for the frames it finished.

    >>> rng = np.random.default_rng(0)
    >>> X, C = rng.random((50, 6)), rng.random((4, 6))
    >>> kw = dict(lambda_d=10.0, lambda_z=1.0)
    >>> path = lars_codes(X, C, None, np.zeros((50, 4)), **kw)
    >>> cd = coordinate_descent_codes(X, C, None, np.zeros((50, 4)), rtol=1e-12, **kw)
    >>> bool(np.allclose(path.solution, cd.solution, atol=1e-9)), path.stop_reason
    (True, 'rtol')
    """
    X, components, encoder, Z0, n_threads = checked_frame_problem(
        X, components, encoder, Z0, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, rtol=rtol, atol=atol,
        max_iter=max_iter, n_threads=n_threads)
    dtype, (n_samples, m) = X.dtype, Z0.shape
    Et = np.ascontiguousarray(encoder.T, dtype=np.float64) if encoder is not None else np.zeros((0, m))
    C64 = components.astype(np.float64)
    Ct = np.ascontiguousarray(C64.T)
    G = np.ascontiguousarray(lambda_d * (C64 @ C64.T))
    G[np.diag_indices(m)] += lambda_e
    lambdas = np.array([lambda_d, lambda_e, lambda_z], dtype=np.float64)
    max_steps = max(int(max_iter), 4 * m)
    Z = np.zeros((n_samples, m), dtype=dtype)
    steps = np.zeros(n_samples, dtype=np.int64)
    ended = np.zeros(n_samples, dtype=np.bool_)
    objectives = np.zeros((n_samples, 3))
    args = (X, Ct, Et, G, lambdas, max_steps, Z0, Z, steps, ended, objectives)
    threads, n_chunks = frame_chunks(n_samples, n_threads, RUN)
    run_chunks(lambda first, stride: _drive_chunk(*args, first, stride), n_chunks, threads)

    start, final, gap = objectives[:, 0], objectives[:, 1], objectives[:, 2]
    # certified like coordinate descent: gap <= rtol F or gap <= atol, per frame; the others are finished by it
    unfinished = np.flatnonzero(~ended | ((gap > rtol * final) & (gap > atol)))
    n_iter, reason = int(steps.max()) if n_samples else 0, "rtol"
    objective = np.array([start.sum(), final.sum()])
    if unfinished.size:
        logger.debug("lars_codes: %d of %d frames finished by coordinate descent", unfinished.size, n_samples)
        rest = coordinate_descent_codes(X[unfinished], components, encoder, Z[unfinished], lambda_d=lambda_d,
                                        lambda_z=lambda_z, lambda_e=lambda_e, rtol=rtol, atol=atol,
                                        max_iter=max_iter, n_threads=n_threads)
        Z[unfinished] = rest.solution
        objective[1] += rest.objective[-1] - final[unfinished].sum()
        n_iter = max(n_iter, rest.n_iter)
        reason = rest.stop_reason
    return SolverResult(solution=Z, n_iter=n_iter, stop_reason=reason, objective=objective)
