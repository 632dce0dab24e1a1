"""Coordinate descent for the Z step without graph term: one lasso per frame, one shared Gram matrix.

When ``lambda_g = 0`` the Z step (:func:`sae.model.solve_codes`) separates over
frames.  Orientation (see :mod:`sae`): ``X`` (N, n), ``Z`` (N, m), ``C`` and
``E`` (m, n).  Row ``z`` (m,) of ``Z`` minimises, for its frame ``x`` (n,),

    F(z) = lambda_d/2 ||x - C^T z||^2 + lambda_e/2 ||z - E x||^2 + lambda_z ||z||_1
         = 1/2 z^T G z - z^T b + c + lambda_z ||z||_1

with the Gram matrix ``G = lambda_d C C^T + lambda_e I`` (m, m), shared by all
frames, ``b = lambda_d C x + lambda_e E x`` (m,) (the rows of
``B = lambda_d X C^T + lambda_e X E^T``, (N, m)) and
``c = lambda_d/2 ||x||^2 + lambda_e/2 ||E x||^2``.  The Z-step objective is the
sum of ``F`` over the frames.

:func:`coordinate_descent_codes` solves all frames with a numba kernel,
parallel over frames: cyclic coordinate descent in covariance form (Friedman,
Hastie & Tibshirani 2010: the negative gradient ``q = b - G z`` is kept and
updated by ``- delta G[:, j]`` only when ``z_j`` moves by ``delta``), each full
sweep followed by an active phase on the support of ``z``: a few coordinate
sweeps, then Newton (active-set) steps that solve the problem on the support
exactly, which coordinate descent alone does slowly when atoms are coherent.
Every frame stops on its own duality gap.

>>> import numpy as np
>>> X = np.array([[3.0, 0.0], [0.5, 0.0]])
>>> result = coordinate_descent_codes(X, np.eye(2), None, np.zeros((2, 2)), lambda_d=1.0, lambda_z=1.0)
>>> result.solution, result.stop_reason
(array([[2., 0.],
       [0., 0.]]), 'rtol')
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numba
import numpy as np
from numba import njit

from sae.blas import one_blas_thread
from sae.solvers import STOP_CODES, SolverResult, StopReason, duality_gap, gap_stop_code

__all__ = ["coordinate_descent_codes", "STATIONARY_ULPS", "PRE_SWEEPS"]

logger = logging.getLogger(__name__)

#: Coordinate-descent sweeps on the support stop when the largest change is at
#: most this many units in the last place of the largest ``|z_j|`` (a fixed
#: point to working precision).
STATIONARY_ULPS = 4.0

#: Parallel solves from several Python threads are serialised: they would
#: oversubscribe the cores.
_PARALLEL_LOCK = threading.Lock()

#: Coordinate-descent sweeps on the support before the exact (Newton) solve on
#: it: they drop most of the coordinates that a full sweep lets in spuriously,
#: so that the Cholesky factorisations run on small blocks.
PRE_SWEEPS = 10

# per-frame stop codes of the kernel: indices of sae.solvers.STOP_CODES
_MAX_ITER, _RTOL, _ATOL = (STOP_CODES.index(reason) for reason in ("max_iter", "rtol", "atol"))


@njit(cache=True, nogil=True)
def _refresh_gradient(G, b, z, q, q64):  # pragma: no cover - compiled
    """``q = b - G z`` from scratch in float64 (``q64``), then rounded into ``q``.

    Sums over the non-zeros of ``z`` only (``G`` is symmetric: row j = column j).
    """
    m = z.shape[0]
    for k in range(m):
        q64[k] = np.float64(b[k])
    for j in range(m):
        zj = np.float64(z[j])
        if zj != 0:
            for k in range(m):
                q64[k] -= zj * np.float64(G[j, k])
    for k in range(m):
        q[k] = q64[k]


@njit(cache=True, nogil=True)
def _objective_and_gap(z, b, q, half_yy, lambda_z):  # pragma: no cover - compiled
    """``F(z)`` and the duality gap of the frame, in float64, in O(m) from ``q = b - G z``.

    ``F = c - 1/2 z^T (b + q) + lambda_z ||z||_1`` (``c = half_yy``).  The gap is
    :func:`sae.solvers.duality_gap` of the lasso ``1/2 ||y - A z||^2 + lambda_z ||z||_1``
    with ``A^T A = G``, ``A^T y = b``, ``||y||^2 = 2 c``, at the dual point of ``z``
    itself (``grad = -q``):
    ``gap = (1 - s)^2 ||r||^2 / 2 + lambda_z ||z||_1 - s q^T z`` with
    ``||r||^2 / 2 = F - lambda_z ||z||_1`` and ``s = min(1, lambda_z / ||q||_inf)``.
    This form has no cancellation between large terms but the one of
    ``lambda_z ||z||_1 - s q^T z``, both of the order of ``F``.
    """
    m = z.shape[0]
    zbq = 0.0
    zq = 0.0
    l1 = 0.0
    q_inf = 0.0
    for j in range(m):
        zj = np.float64(z[j])
        qj = np.float64(q[j])
        zbq += zj * (np.float64(b[j]) + qj)
        zq += zj * qj
        l1 += abs(zj)
        if abs(qj) > q_inf:
            q_inf = abs(qj)
    objective = half_yy - 0.5 * zbq + lambda_z * l1
    half_rr = max(objective - lambda_z * l1, 0.0)
    return objective, duality_gap(half_rr, l1, -zq, q_inf, lambda_z)


@njit(cache=True, nogil=True)
def _soft_coordinate(r, g, lambda_z, zero):  # pragma: no cover - compiled
    """``argmin_t g t^2 / 2 - r t + lambda_z |t|`` (``g > 0``): ``h_{lambda_z}(r) / g``."""
    if r > lambda_z:
        return (r - lambda_z) / g
    if r < -lambda_z:
        return (r + lambda_z) / g
    return zero


@njit(cache=True, nogil=True)
def _newton_on_support(G, b, z, index, n_active, lambda_z64, L, w, zs):  # pragma: no cover - compiled
    """Minimise ``F`` over the support ``S = index[:n_active]`` of ``z`` by Newton (active-set) steps.

    On the orthant of the signs ``s`` of ``z_S``, ``F`` is the quadratic
    ``1/2 z_S^T G_SS z_S - z_S^T (b_S - lambda_z s)``, minimised by
    ``w = G_SS^{-1} (b_S - lambda_z s)`` (Cholesky, float64).  The step goes
    from ``z_S`` towards ``w`` until the first coordinate reaches 0 (which
    leaves the support) or all the way; ``F`` decreases along it.  Repeated
    until a full step (at most ``|S|`` times).  Returns False, leaving ``z``
    unchanged, if ``G_SS`` is singular to working precision (pivot below
    ``1e-10`` of its diagonal entry).
    """
    n_s = n_active
    for a in range(n_s):
        zs[a] = np.float64(z[index[a]])
    first = True
    for _ in range(n_active + 1):  # every step but the last removes a coordinate
        if n_s == 0:
            break
        # Cholesky G_SS = L L^T, in float64
        for a in range(n_s):
            ja = index[a]
            for c in range(a + 1):
                total = np.float64(G[ja, index[c]])
                for k in range(c):
                    total -= L[a, k] * L[c, k]
                if c == a:
                    if not total > 1e-10 * np.float64(G[ja, ja]):
                        if first:
                            return False
                        # a reduced support turned singular: keep the progress made so far
                        for e in range(n_s):
                            z[index[e]] = zs[e]
                        return True
                    L[a, a] = np.sqrt(total)
                else:
                    L[a, c] = total / L[c, c]
        first = False
        # w = G_SS^{-1} (b_S - lambda_z sign(z_S))
        for a in range(n_s):
            sign = 1.0 if zs[a] > 0 else -1.0
            total = np.float64(b[index[a]]) - lambda_z64 * sign
            for k in range(a):
                total -= L[a, k] * w[k]
            w[a] = total / L[a, a]
        for a in range(n_s - 1, -1, -1):
            total = w[a]
            for k in range(a + 1, n_s):
                total -= L[k, a] * w[k]
            w[a] = total / L[a, a]
        # longest step in the orthant
        t = 1.0
        for a in range(n_s):
            if w[a] * zs[a] <= 0:
                ta = zs[a] / (zs[a] - w[a])
                if ta < t:
                    t = ta
        n_kept = 0
        for a in range(n_s):
            value = zs[a] + t * (w[a] - zs[a])
            if t < 1.0 and (value * zs[a] <= 0 or abs(value) <= 1e-15 * abs(zs[a])):
                z[index[a]] = 0  # leaves the support
                continue
            index[n_kept] = index[a]
            zs[n_kept] = value
            n_kept += 1
        if t >= 1.0:
            for a in range(n_s):
                z[index[a]] = zs[a]
            return True
        n_s = n_kept
    for a in range(n_s):
        z[index[a]] = zs[a]
    return True


@njit(cache=True, nogil=True)
def _support(z, index):  # pragma: no cover - compiled
    """Write the indices of the non-zeros of ``z`` to the head of ``index``; return their count."""
    n_active = 0
    for j in range(z.size):
        if z[j] != 0:
            index[n_active] = j
            n_active += 1
    return n_active


@njit(cache=True, nogil=True)
def _sweep_support(
    G, b, z, q, index, n_active, scalars, lambda_z64, rtol, atol, objective, max_iter, eps, GA, zA, qA, half_yy,
):  # pragma: no cover - compiled
    """Coordinate descent restricted to the support ``index[:n_active]`` on its own block of ``G``.

    Sweeps until stationary (largest change at most ``eps`` times the largest
    ``|z_j|``), or until the duality gap of the restricted problem is below a
    tenth of the tolerance (``rtol`` relative to ``objective``, or ``atol``), at
    most ``max_iter`` sweeps.  ``GA``, ``zA`` and ``qA`` are float64 scratch.
    """
    zero = scalars[3]
    for a in range(n_active):
        ja = index[a]
        zA[a] = z[ja]
        qA[a] = q[ja]
        for c in range(n_active):
            GA[a, c] = G[ja, index[c]]
    for _ in range(max_iter):
        max_change = 0.0
        max_abs = 0.0
        for a in range(n_active):
            gaa = GA[a, a]
            za = zA[a]
            new = _soft_coordinate(qA[a] + gaa * za, gaa, lambda_z64, 0.0)
            if new != za:
                delta = new - za
                for c in range(n_active):
                    qA[c] -= delta * GA[a, c]
                zA[a] = new
                if abs(delta) > max_change:
                    max_change = abs(delta)
            if abs(new) > max_abs:
                max_abs = abs(new)
        if max_change <= eps * max_abs:
            break
        l1 = 0.0
        zq = 0.0
        q_inf = 0.0
        for a in range(n_active):
            l1 += abs(zA[a])
            zq += zA[a] * qA[a]
            if abs(qA[a]) > q_inf:
                q_inf = abs(qA[a])
        # the gap without its (1 - s)^2 ||r||^2 / 2 term (smooth part 0): a stop hint only
        active_gap = duality_gap(0.0, l1, -zq, q_inf, lambda_z64)
        if active_gap <= 0.1 * rtol * objective or active_gap <= 0.1 * atol:
            break
    for a in range(n_active):
        z[index[a]] = zA[a] if zA[a] != 0 else zero


@njit(cache=True, nogil=True)
def _solve_frame(
    x, Ct, Et, G, scalars, lambda_z64, rtol, atol, max_iter, eps, z,
    b, q, q64, cx, ex, index, L, w, zs, history, tail,
):  # pragma: no cover - compiled
    """Coordinate descent for one frame, in place on ``z``; returns (full sweeps, stop code).

    ``scalars = [lambda_d, lambda_e, lambda_z, 0]`` in the working dtype.  Adds
    the frame's objective after sweep ``k`` to ``history[k]`` and its final
    objective to ``tail[k_final + 1]`` (the caller's cumulative sum carries it
    to the later sweeps).  The other arrays are scratch of length ``m``
    (``L`` (m, m)); ``q64``, ``L``, ``w``, ``zs`` are float64.
    """
    m = z.shape[0]
    n = x.shape[0]
    lambda_d = scalars[0]
    lambda_e = scalars[1]
    lambda_z = scalars[2]
    zero = scalars[3]
    # b = lambda_d C x + lambda_e E x and c = ||y||^2 / 2, computed here so that a frame's result
    # never depends on the other frames of the batch
    xx = 0.0
    for j in range(m):
        cx[j] = zero
    for k in range(n):
        xk = x[k]
        xx += np.float64(xk) * np.float64(xk)
        if xk != 0:
            for j in range(m):
                cx[j] += Ct[k, j] * xk
    yy = np.float64(lambda_d) * xx
    if Et.shape[0] > 0:
        for j in range(m):
            ex[j] = zero
        for k in range(n):
            xk = x[k]
            if xk != 0:
                for j in range(m):
                    ex[j] += Et[k, j] * xk
        ex_sq = 0.0
        for j in range(m):
            b[j] = lambda_d * cx[j] + lambda_e * ex[j]
            ex_sq += np.float64(ex[j]) * np.float64(ex[j])
        yy += np.float64(lambda_e) * ex_sq
    else:
        for j in range(m):
            b[j] = lambda_d * cx[j]
    half_yy = 0.5 * yy

    for j in range(m):  # a zero diagonal is a zero row of the PSD G: no term involves z_j
        if not G[j, j] > 0:
            z[j] = zero
    _refresh_gradient(G, b, z, q, q64)
    objective, gap = _objective_and_gap(z, b, q64, half_yy, lambda_z64)
    history[0] += objective

    sweeps = 0
    code = _MAX_ITER
    while sweeps < max_iter:
        # ---- full sweep over all coordinates, in their natural order
        for j in range(m):
            gjj = G[j, j]
            if not gjj > 0:
                continue
            zj = z[j]
            new = _soft_coordinate(q[j] + gjj * zj, gjj, lambda_z, zero)
            if new != zj:
                delta = new - zj
                for k in range(m):
                    q[k] -= delta * G[j, k]
                z[j] = new
        sweeps += 1
        previous = objective
        # objective and gap on a gradient recomputed in float64, free of the drift of the updates
        _refresh_gradient(G, b, z, q, q64)
        objective, gap = _objective_and_gap(z, b, q64, half_yy, lambda_z64)
        history[sweeps] += objective
        code = gap_stop_code(gap, objective, rtol, atol)
        if code != _MAX_ITER:
            break
        if objective >= previous:
            code = _RTOL  # stalled: no decrease left at working precision (exact coordinate descent is monotone)
            break
        if sweeps >= max_iter:
            break

        # ---- active phase on the support: exact solves (Newton steps), coordinate descent if singular
        n_active = _support(z, index)
        if n_active == 0:
            continue
        # a few sweeps on the support first drop most of the spurious coordinates cheaply
        _sweep_support(G, b, z, q, index, n_active, scalars, lambda_z64, rtol, atol, objective, PRE_SWEEPS, eps,
                       L, zs, w, half_yy)
        n_active = _support(z, index)
        if n_active == 0:
            _refresh_gradient(G, b, z, q, q64)
            continue
        if not _newton_on_support(G, b, z, index, n_active, lambda_z64, L, w, zs):
            _sweep_support(G, b, z, q, index, n_active, scalars, lambda_z64, rtol, atol, objective, max_iter, eps,
                           L, zs, w, half_yy)
        _refresh_gradient(G, b, z, q, q64)
    tail[sweeps + 1] += objective
    return sweeps, code


@njit(cache=True, nogil=True)
def _drive_chunk(
    X, Ct, Et, G, Z, scalars, lambda_z64, rtol, atol, max_iter, eps,
    sweeps_out, codes_out, history, tail, first, stride,
):  # pragma: no cover - compiled
    """Frames ``first, first + stride, ...`` with one set of scratch arrays; ``history`` and ``tail`` are the
    chunk's own rows."""
    m = G.shape[0]
    zero = scalars[3]
    b, q, cx, ex = np.full(m, zero), np.full(m, zero), np.full(m, zero), np.full(m, zero)
    q64, w, zs = np.zeros(m), np.zeros(m), np.zeros(m)
    index = np.zeros(m, np.int64)
    L = np.empty((m, m))  # only the entries written are read: no zeroing of (m, m) per chunk
    for i in range(first, X.shape[0], stride):
        sweeps, code = _solve_frame(
            X[i], Ct, Et, G, scalars, lambda_z64, rtol, atol, max_iter, eps, Z[i],
            b, q, q64, cx, ex, index, L, w, zs, history, tail,
        )
        sweeps_out[i] = sweeps
        codes_out[i] = code


def frame_chunks(n_samples: int, n_threads: int | None, run: int = 1) -> tuple[int, int]:
    """(threads, chunks) of a per-frame solve: ``n_threads`` (by default numba's setting), at most one per frame;
    one chunk in the calling thread, else up to 4 interleaved chunks per thread, each of whole runs of ``run``
    frames."""
    threads = max(1, min(numba.get_num_threads() if n_threads is None else n_threads, n_samples))
    return threads, 1 if threads == 1 else max(1, min(-(-n_samples // run), 4 * threads))


def run_chunks(chunk: Callable[[int, int], object], n_chunks: int, threads: int) -> None:
    """``chunk(first, n_chunks)`` for every ``first < n_chunks``, on ``threads`` Python threads.

    The compiled kernels release the GIL, so Python threads run them in parallel.  They replace numba's
    parallel loops: numba's OpenMP threads spin for a while after each parallel region, and every BLAS call
    that followed one (the D step's products, right after the Z step) ran up to 100x slower against them.
    The threads are kept between calls (`_frame_pool`): the online fit solves thousands of small batches.
    """
    if threads <= 1 or n_chunks <= 1:
        for first in range(n_chunks):
            chunk(first, n_chunks)
        return
    with _PARALLEL_LOCK:
        pool = _frame_pool(threads)
        futures = [pool.submit(chunk, first, n_chunks) for first in range(n_chunks)]
        wait(futures)  # every chunk done before the lock is released, even when one has failed
        for future in futures:
            future.result()


_POOL: dict[str, Any] = {"pool": None, "threads": 0, "pid": None}


def _frame_pool(threads: int) -> ThreadPoolExecutor:
    """The threads of `run_chunks` (held under ``_PARALLEL_LOCK``): made again in a forked child or for another
    number of threads than the last call's."""
    if _POOL["pool"] is None or _POOL["pid"] != os.getpid() or _POOL["threads"] != threads:
        if _POOL["pool"] is not None and _POOL["pid"] == os.getpid():
            _POOL["pool"].shutdown(wait=True)
        _POOL.update(pool=ThreadPoolExecutor(threads, thread_name_prefix="sae-frames"), threads=threads,
                     pid=os.getpid())
    return _POOL["pool"]


def _check_threads(n_threads: int | None) -> int | None:
    if n_threads is None:
        return None
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or not 1 <= n_threads <= limit:
        raise ValueError(f"n_threads must be None or an integer in [1, {limit}] (NUMBA_NUM_THREADS), got {n_threads!r}")
    return int(n_threads)


def checked_frame_problem(
    X: Any, components: Any, encoder: Any, Z0: Any, *, lambda_d: float, lambda_z: float, lambda_e: float,
    rtol: float, atol: float, max_iter: int, n_threads: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int | None]:
    """The arguments of a per-frame Z step, checked: ``X`` C-contiguous in float32 or float64 (others become
    float64), ``components``, ``encoder`` (None unless ``lambda_e > 0``) and ``Z0`` in its dtype, ``n_threads``."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {X.shape}")
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    X = np.ascontiguousarray(X, dtype=dtype)
    components = np.asarray(components, dtype=dtype)
    n_samples, n_features = X.shape
    if components.ndim != 2 or components.shape[1] != n_features:
        raise ValueError(
            f"components must have shape (n_atoms, n_features) with n_features = {n_features}, "
            f"got {components.shape}"
        )
    m = components.shape[0]
    Z0 = np.asarray(Z0)
    if Z0.shape != (n_samples, m):
        raise ValueError(f"Z0 must have shape (n_samples, n_atoms) = {(n_samples, m)}, got {Z0.shape}")
    for name, value in (("lambda_d", lambda_d), ("lambda_z", lambda_z), ("lambda_e", lambda_e),
                        ("rtol", rtol), ("atol", atol)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if lambda_e > 0:
        if encoder is None:
            raise ValueError(f"encoder is required when lambda_e > 0, got encoder=None and lambda_e={lambda_e!r}")
        encoder = np.asarray(encoder, dtype=dtype)
        if encoder.shape != components.shape:
            raise ValueError(f"encoder must have the shape of components {components.shape}, got {encoder.shape}")
    else:
        encoder = None
    return X, components, encoder, np.ascontiguousarray(Z0, dtype=dtype), _check_threads(n_threads)


@one_blas_thread()  # a context manager of contextlib is a decorator too, entered at each call
def coordinate_descent_codes(
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
    """Z step without graph term by coordinate descent, frame by frame, warm-started from ``Z0``.

    Every row ``z`` of ``Z`` (N, m) minimises
    ``F(z) = 1/2 z^T G z - z^T b + c + lambda_z ||z||_1`` with
    ``G = lambda_d C C^T + lambda_e I`` (m, m), ``b = lambda_d C x + lambda_e E x``
    (m,) for the frame ``x`` (n,) (row of ``X``), ``c = lambda_d/2 ||x||^2 +
    lambda_e/2 ||E x||^2``; the sum over the frames is
    ``lambda_d/2 ||X - Z C||_F^2 + lambda_z ||Z||_1 + lambda_e/2 ||Z - X E^T||_F^2``.

    **Algorithm** (per frame).  ``q = b - G z`` is kept up to date.  A *full
    sweep* updates ``j = 0 .. m-1`` in turn:
    ``z_j <- h_{lambda_z}(q_j + G_jj z_j) / G_jj`` (``h`` the soft-threshold) and,
    if ``z_j`` moved by ``delta``, ``q <- q - delta G[:, j]``.  Then ``q`` is
    recomputed from scratch in float64 (no drift of the updates), the
    objective and the gap are evaluated and the stopping rule is tested.  If
    the frame goes on, an *active phase* works on the support ``S`` of ``z``:
    at most :data:`PRE_SWEEPS` coordinate sweeps restricted to ``S`` (on the
    block ``G_SS``), then Newton steps: on the orthant of the signs ``s`` of
    ``z_S``, ``F`` is the quadratic ``1/2 z_S^T G_SS z_S - z_S^T (b_S -
    lambda_z s)``, minimised by ``w = G_SS^{-1} (b_S - lambda_z s)`` (Cholesky in
    float64); ``z_S`` moves towards ``w`` up to the first coordinate that
    reaches 0 (it leaves ``S`` and the step repeats) or all the way.  ``F``
    decreases at every step.  If ``G_SS`` is singular (more atoms in ``S`` than
    features and ``lambda_e = 0``), coordinate sweeps on ``S`` replace the
    Newton steps.  The next full sweep lets new coordinates in.  Coordinates
    with ``G_jj = 0`` (zero atom and ``lambda_e = 0``) are set to 0.

    **Stopping rule, per frame**, after every full sweep, with the duality gap
    ``gap(z) >= F(z) - min F`` of the frame's lasso (dual point: the residual
    scaled into the dual feasible set; O(m) from ``q``): ``gap <= rtol F(z)``
    ("rtol": ``rtol`` is the relative accuracy of the objective that the gap
    certifies, so the batch objective is within ``rtol`` of its minimum: a
    stronger guarantee than FISTA's relative change for the same ``rtol``),
    else ``gap <= atol`` ("atol", absolute, per frame), else ``F`` did not
    decrease over the last full sweep and active phase (exact coordinate
    descent is monotone, so this happens only at the precision floor of the
    dtype, or at the minimum: "rtol"; with ``rtol = atol = 0`` it is what stops
    a frame), else ``max_iter`` full sweeps ("max_iter").  Nothing in a
    frame's solve depends on the other frames (``b`` is computed per frame,
    inside the kernel), so a frame's codes are bitwise the same whatever the
    batch (any blocking of the rows), the number of threads and the chunking.

    **Threads.**  Frames are solved in parallel, interleaved chunks of frames
    on Python threads (`run_chunks`: the compiled kernel releases the GIL; not
    numba's parallel loops, whose spinning OpenMP threads slowed down the BLAS
    calls after them).  ``n_threads=None`` uses numba's setting (all cores
    unless ``NUMBA_NUM_THREADS`` or ``numba.set_num_threads`` say otherwise);
    ``n_threads=1`` runs the kernel in the calling thread: use it inside
    single-threaded workers (a Dask worker thread).  Parallel solves from
    several Python threads are serialised by a lock.

    Parameters
    ----------
    X : array (N, n)
        Frames; its dtype (float32 or float64) is the dtype of the computation.
    components : array (m, n)
        ``C``.
    encoder : array (m, n) or None
        ``E``; required when ``lambda_e > 0``, ignored otherwise.
    Z0 : array (N, m)
        Warm start; not modified.
    lambda_d, lambda_z, lambda_e : float
        Weights (``>= 0``).
    rtol, atol : float
        Per-frame duality-gap tolerances (see above).
    max_iter : int
        Cap on full sweeps per frame.
    n_threads : int or None
        Threads of the parallel loop (see above).

    Returns
    -------
    SolverResult
        ``solution`` (N, m) in ``X``'s dtype; ``n_iter``: the largest number of
        full sweeps over the frames; ``stop_reason``: "max_iter" if a frame hit
        ``max_iter``, else "atol" if a frame stopped on ``atol``, else "rtol";
        ``objective`` (n_iter + 1,) float64: the batch objective (sum of the
        frames' ``F``) at ``Z0`` and after every full sweep, a frame that has
        stopped counting with its final value.  It is non-increasing.

    >>> rng = np.random.default_rng(0)
    >>> X, C = rng.random((50, 6)), rng.random((4, 6))
    >>> result = coordinate_descent_codes(X, C, None, np.zeros((50, 4)), lambda_d=10.0, lambda_z=1.0)
    >>> result.solution.shape, result.stop_reason, bool(np.all(np.diff(result.objective) <= 0))
    ((50, 4), 'rtol', True)
    >>> again = coordinate_descent_codes(X[:7], C, None, np.zeros((7, 4)), lambda_d=10.0, lambda_z=1.0, n_threads=1)
    >>> bool(np.array_equal(again.solution, result.solution[:7]))
    True
    """
    X, components, encoder, Z0, n_threads = checked_frame_problem(
        X, components, encoder, Z0, lambda_d=lambda_d, lambda_z=lambda_z, lambda_e=lambda_e, rtol=rtol, atol=atol,
        max_iter=max_iter, n_threads=n_threads)
    dtype, (n_samples, m) = X.dtype, Z0.shape
    Et = np.ascontiguousarray(encoder.T) if encoder is not None else np.zeros((0, m), dtype=dtype)
    Ct = np.ascontiguousarray(components.T)
    G = np.ascontiguousarray(dtype.type(lambda_d) * (components @ components.T))
    G[np.diag_indices(m)] += dtype.type(lambda_e)
    Z = np.array(Z0, dtype=dtype, order="C", copy=True)
    scalars = np.array([lambda_d, lambda_e, lambda_z, 0.0], dtype=dtype)
    eps = STATIONARY_ULPS * float(np.finfo(dtype).eps)

    threads, n_chunks = frame_chunks(n_samples, n_threads)
    history = np.zeros((n_chunks, max_iter + 1))
    tail = np.zeros((n_chunks, max_iter + 2))
    sweeps = np.zeros(n_samples, dtype=np.int64)
    codes = np.zeros(n_samples, dtype=np.int64)
    args = (X, Ct, Et, G, Z, scalars, float(lambda_z), float(rtol), float(atol), int(max_iter), eps, sweeps, codes)
    run_chunks(lambda first, stride: _drive_chunk(*args, history[first], tail[first], first, stride), n_chunks,
               threads)

    n_iter = int(sweeps.max()) if n_samples else 0
    objective = (history.sum(axis=0) + np.cumsum(tail.sum(axis=0))[:-1])[: n_iter + 1]
    if n_samples == 0:
        objective = np.zeros(1)
    found = set(np.unique(codes).tolist())
    reason: StopReason = "max_iter" if _MAX_ITER in found and n_samples else (
        "atol" if _ATOL in found else "rtol")
    if reason == "max_iter":
        logger.debug("coordinate_descent_codes: %d of %d frames reached max_iter=%d",
                     int(np.count_nonzero(codes == _MAX_ITER)), n_samples, max_iter)
    return SolverResult(solution=Z, n_iter=n_iter, stop_reason=reason, objective=objective)

