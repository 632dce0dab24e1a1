"""The compiled pass of one block iteration of the distributed Z step.

`block_iterate` computes, for block ``b`` (rows ``i``) and iteration ``k`` of
the block FISTA (:mod:`sae.distributed.zstep`), tile by tile in one pass::

    y_i         = x_k,i + alpha (x_k,i - x_{k-1},i)
    grad_i      = lambda_d (y C - X)_i C^T + lambda_e (y_i - t_i) + lambda_g (L y)_i
    x_{k+1},i   = soft(y_i - step grad_i, step lambda_z)

with ``y C`` extrapolated from ``P = x_k C`` and ``P_prev = x_{k-1} C``,
``(L y)_i`` from the rows ``(L x_k)_i`` and ``(L x_{k-1})_i`` (own rows of the
iterates and the halo rows received), ``t = X_b E^T``; then ``x_{k+1} C``
for the tile.  It returns the block's sums of `SUMS` for the objective at
``x_k``, the restart test, the sparsity and (``use.gap``) the dual point at
``y`` (:func:`sae.solvers.duality_gap`).  Per-row sums are accumulated in the
arrays' dtype, sums over rows in float64 (as :func:`sae.terms.inner`).

The arguments are grouped by role in named tuples (numba unpacks them at
compile time): `Iterates`, `Reconstruction`, `GraphRows`, `Coefficients`,
`Terms` (which terms and parts are computed) and `Work` (outputs and
buffers).  An array whose term is off may be empty.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

#: Rows per tile of `block_iterate`: its reconstruction gradient (tile, m) and products stay in cache.
ITERATE_TILE = 1024

Iterates = namedtuple("Iterates", "x x_prev P P_prev")
Iterates.__doc__ = "x_k, x_{k-1} (N_b, m) dense; P = x_k C, P_prev = x_{k-1} C (N_b, n)."
Reconstruction = namedtuple("Reconstruction", "X C CT")
Reconstruction.__doc__ = "X_b (N_b, n), C (m, n) and C^T (n, m), C-contiguous."
GraphRows = namedtuple(
    "GraphRows", "own_data own_indices own_indptr halo_data halo_indices halo_indptr halo halo_prev"
)
GraphRows.__doc__ = ("The block's rows of L as CSR arrays, own part (N_b, N_b) and halo part (N_b, H); the halo rows "
                     "of x_k and of x_{k-1} (H, m).")
Coefficients = namedtuple("Coefficients", "alpha lambda_d lambda_g lambda_e step threshold")
Coefficients.__doc__ = "alpha_k, the weights, the step 1/beta and the threshold step lambda_z, in the iterates' dtype."
Terms = namedtuple("Terms", "prev recon graph target gap")
Terms.__doc__ = ("Whether x_{k-1} enters (momentum), the reconstruction, graph and encoder terms are on, and the "
                 "sums of the dual point at y are wanted.")
Work = namedtuple("Work", "residual gradient out P_out")
Work.__doc__ = ("Tile buffers residual (tile, n) and gradient (tile, m); outputs x_{k+1} (N_b, m) and "
                "x_{k+1} C (N_b, n).")

SUMS = ("l1", "graph", "encoder", "restart_y", "restart_x", "nnz", "nnz_next", "reconstruction",
        "reconstruction_y", "graph_y", "encoder_y", "l1_y", "y_dot_gradient", "gradient_max")
"""What `block_iterate` returns, in order: ``||x_k||_1``, ``<x_k, L x_k>``, ``||x_k - t||^2``,
``<y, x_{k+1} - x_k>``, ``<x_{k+1}, x_{k+1} - x_k>``, ``nnz(x_k)``, ``nnz(x_{k+1})``,
``||x_k C - X||^2``; with ``use.gap``: ``||y C - X||^2``, ``<y, L y>``, ``||y - t||^2``, ``||y||_1``,
``<y, grad>`` and ``max |grad|`` (else 0)."""

# positions in SUMS (compile-time constants in the kernel)
_L1, _GRAPH, _ENCODER, _RESTART_Y, _RESTART_X, _NNZ, _NNZ_NEXT, _RECON = range(8)
_RECON_Y, _GRAPH_Y, _ENCODER_Y, _L1_Y, _Y_DOT_GRADIENT, _GRADIENT_MAX = range(8, 14)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _add_rows(data, indices, start, stop, rows, out):  # pragma: no cover - compiled
    """``out += sum_p data[p] rows[indices[p]]`` over ``p`` in [start, stop): four rows per pass over ``out``.

    One pass per row would load and store ``out`` once per neighbour; four at a
    time does it once per four (the graph part of an iteration is bound by
    these loads and stores when the neighbour rows are in cache).
    """
    dtype = out.dtype.type
    p = start
    while p + 3 < stop:
        w0, w1, w2, w3 = dtype(data[p]), dtype(data[p + 1]), dtype(data[p + 2]), dtype(data[p + 3])
        r0, r1, r2, r3 = rows[indices[p]], rows[indices[p + 1]], rows[indices[p + 2]], rows[indices[p + 3]]
        for c in range(out.size):
            out[c] += (w0 * r0[c] + w1 * r1[c]) + (w2 * r2[c] + w3 * r3[c])
        p += 4
    while p < stop:
        w0, r0 = dtype(data[p]), rows[indices[p]]
        for c in range(out.size):
            out[c] += w0 * r0[c]
        p += 1


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def graph_row(graph, i, x, halo, out):  # pragma: no cover - compiled
    """``out = (L x)_i``: row ``i`` of ``L``'s own part times the block's rows ``x``, plus its halo part."""
    out[:] = 0
    _add_rows(graph.own_data, graph.own_indices, graph.own_indptr[i], graph.own_indptr[i + 1], x, out)
    _add_rows(graph.halo_data, graph.halo_indices, graph.halo_indptr[i], graph.halo_indptr[i + 1], halo, out)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def block_iterate(it, rec, graph, target, coef, use, work):  # pragma: no cover - compiled
    """A block's FISTA iteration (module docstring), tile by tile, in one pass; returns the `SUMS`.

    Tiles of ``work.gradient.shape[0]`` rows; nothing is allocated but row vectors.
    """
    sums = np.zeros(len(SUMS))
    x, x_prev, P, P_prev = it
    out = work.out
    n_rows, n_cols = out.shape
    tile = work.gradient.shape[0]
    zero = out.dtype.type(0)
    alpha = coef.alpha
    y = np.empty(n_cols, dtype=out.dtype)
    lx = np.empty(n_cols, dtype=out.dtype)
    lx_prev = np.empty(n_cols, dtype=out.dtype)
    residual, gradient = work.residual, work.gradient
    for t0 in range(0, n_rows, tile):
        t1 = min(t0 + tile, n_rows)
        # the reconstruction part of the tile's gradient: lambda_d (y C - X) C^T
        if use.recon:
            for r in range(t1 - t0):
                s = zero
                for c in range(residual.shape[1]):
                    value = P[t0 + r, c] - rec.X[t0 + r, c]
                    s += value * value
                    if use.prev:
                        value += alpha * (P[t0 + r, c] - P_prev[t0 + r, c])
                    residual[r, c] = coef.lambda_d * value
                sums[_RECON] += s
            if use.gap:
                for r in range(t1 - t0):
                    s = zero
                    for c in range(residual.shape[1]):
                        value = P[t0 + r, c] - rec.X[t0 + r, c]
                        if use.prev:
                            value += alpha * (P[t0 + r, c] - P_prev[t0 + r, c])
                        s += value * value
                    sums[_RECON_Y] += s
            np.dot(residual[: t1 - t0], rec.CT, gradient[: t1 - t0])
        else:
            gradient[:] = zero
        for i in range(t0, t1):
            xi, gi, oi = x[i], gradient[i - t0], out[i]
            # y = x_k + alpha (x_k - x_{k-1})
            if use.prev:
                pi = x_prev[i]
                for j in range(n_cols):
                    y[j] = alpha * (xi[j] - pi[j]) + xi[j]
            else:
                y[:] = xi
            # the graph part: lambda_g (L y)_i, with (L y)_i = (L x_k)_i + alpha ((L x_k)_i - (L x_{k-1})_i)
            if use.graph:
                graph_row(graph, i, x, graph.halo, lx)
                energy = zero
                for j in range(n_cols):
                    energy += xi[j] * lx[j]
                sums[_GRAPH] += energy
                if use.prev:
                    graph_row(graph, i, x_prev, graph.halo_prev, lx_prev)
                    for j in range(n_cols):
                        gi[j] += coef.lambda_g * (alpha * (lx[j] - lx_prev[j]) + lx[j])
                else:
                    for j in range(n_cols):
                        gi[j] += coef.lambda_g * lx[j]
                if use.gap:
                    energy = zero
                    for j in range(n_cols):
                        ly = alpha * (lx[j] - lx_prev[j]) + lx[j] if use.prev else lx[j]
                        energy += y[j] * ly
                    sums[_GRAPH_Y] += energy
            # the encoder part: lambda_e (y - t)_i
            if use.target:
                ti = target[i]
                residual_e = zero
                for j in range(n_cols):
                    d = xi[j] - ti[j]
                    residual_e += d * d
                    gi[j] += coef.lambda_e * (y[j] - ti[j])
                sums[_ENCODER] += residual_e
                if use.gap:
                    residual_e = zero
                    for j in range(n_cols):
                        d = y[j] - ti[j]
                        residual_e += d * d
                    sums[_ENCODER_Y] += residual_e
            # the dual point at y: ||y||_1, <y, grad>, max |grad|
            if use.gap:
                l1 = zero
                dot = zero
                largest = zero
                for j in range(n_cols):
                    l1 += abs(y[j])
                    dot += y[j] * gi[j]
                    largest = max(largest, abs(gi[j]))
                sums[_L1_Y] += l1
                sums[_Y_DOT_GRADIENT] += dot
                sums[_GRADIENT_MAX] = max(sums[_GRADIENT_MAX], largest)
            # forward step and soft threshold
            l1 = zero
            nnz = 0
            nnz_next = 0
            for j in range(n_cols):
                forward = y[j] - coef.step * gi[j]
                oi[j] = max(forward - coef.threshold, zero) - max(-forward - coef.threshold, zero)
                l1 += abs(xi[j])
                nnz += xi[j] != zero
                nnz_next += oi[j] != zero
            sums[_L1] += l1
            sums[_NNZ] += nnz
            sums[_NNZ_NEXT] += nnz_next
            # the adaptive restart test's parts
            if use.prev:
                restart_y = zero
                restart_x = zero
                for j in range(n_cols):
                    moved = oi[j] - xi[j]
                    restart_y += y[j] * moved
                    restart_x += oi[j] * moved
                sums[_RESTART_Y] += restart_y
                sums[_RESTART_X] += restart_x
        if use.recon:
            np.dot(out[t0:t1], rec.C, work.P_out[t0:t1])
    return sums
