"""Online dictionary learning: the fit without graph term by mini-batches (``ModelConfig.fit_method = "online"``).

Without graph term the objective separates over frames (:mod:`sae.model`):

    F(Z, C, E) = sum_x  lambda_d/2 ||x - C^T z||^2 + lambda_z ||z||_1 + lambda_e/2 ||z - E x||^2

and the alternating fit spends most of its time coding every frame again
after each small move of the dictionary.  The online method of Mairal, Bach,
Ponce & Sapiro (JMLR 2010, Algorithm 1 with the mini-batch rescaling of its
section 3.4.3; SPAMS's ``trainDL`` and scikit-learn's
``MiniBatchDictionaryLearning``) moves the dictionary after every mini-batch
of ``eta`` frames (``ModelConfig.batch_size``) instead.  At mini-batch ``t``:

1. the batch's codes ``Z_t`` (eta, m) are the Z step's exact solution for the
   current ``C`` and ``E`` (:func:`sae.model.solve_codes`, by the per-frame
   solver of ``ModelConfig.z_step_method`` to the inner tolerance; the
   homotopy path, ``z_solver="lars"``, is the fast one);
2. the sufficient statistics of the frames coded so far are updated with a
   forgetting factor ``beta_t = (theta + 1 - eta) / (theta + 1)``,
   ``theta = min((t - 1) eta, 2 N)`` for ``t <= eta`` and ``min(eta^2 + t - 1 - eta, 2 N)``
   after (`forgetting_factor`, capped at `MEMORY` epochs of the N frames):
   ``A <- beta_t A + Z_t^T Z_t`` (m, m), ``B <- beta_t B + Z_t^T X_t`` (m, n),
   and, with an encoder, ``S <- beta_t S + X_t^T X_t`` (n, n).  ``A`` and
   ``B`` hold the frames of this epoch and of the one before only: an epoch
   drops the statistics of the one before last, whose codes came from a
   dictionary long gone (SPAMS's ``trainDL`` does the same; on
   ``bench/bench_core.py``'s data it lowers the objective after 4 and 8
   epochs by 0.1 and 0.2 % at lambda_z = 1 (N = 20,000, m = 128), by 1.3 and
   3.6 % at lambda_z = 0.03 (N = 10,000));
3. the D step is one pass of block coordinate descent over the atoms on the
   surrogate ``1/2 tr(C^T A C) - tr(C^T B)``: ``c_j <- c_j + (b_j - a_j C) / A_jj``,
   projected onto the unit ball (`_update_atoms`).  An atom no frame has used
   yet (``A_jj = 0``) is replaced by a frame of the batch scaled to unit norm,
   as scikit-learn does: an atom never used is never moved by the update;
4. the E step (``lambda_e > 0``) is at most `ENCODER_STEPS` iterations of
   FISTA on ``1/2 tr(E S E^T) - tr(E^T B)`` over rows of unit norm, from the
   last encoder (the encoder term then ends 5-6 % above its minimum for the
   final codes on the tests' data; one projected gradient step per batch left
   it 1.7-1.9x above).

An epoch is one pass over the frames: blocks of `ORDER_BLOCK` consecutive
frames in a random order, the frames of each block in a random order, cut
into mini-batches (`epoch_order`; ``np.random.default_rng(config.random_state)``
after the initial draws of :func:`sae.model.fit_sae`), so that a stored array
is read a block at a time and the in-memory and the cluster's fits visit the
same frames in the same order.  Its history record holds the terms summed
over the batches, each coded with the dictionary of its time: an estimate of
the objective, not a bound (the final dictionary, fitted to the recent frames,
gave 1 % more than the last epoch's sum on ``bench/bench_train.py``'s data at
GTZAN scale, at most 0.1 % more on the tests'): ``online = True`` marks them.
Epochs stop when that sum changes by at most ``rtol`` relative, or after
``max_outer`` epochs; then the codes of every frame are solved once more with
the final ``C`` and ``E``, and that last record is the true objective
(`fit_online`).  The time is in the epochs' coding: the D step costs
``O(m^2 n)`` per batch whatever the batch size.

On a cluster (:func:`sae.distributed.fit_distributed`) the epochs run in the
calling process, reading the frames block by block (sequential by nature: each
batch needs the dictionary of the one before), and the last Z step runs on the
workers' blocks like any other.  Only that last step is checkpointed: an
online training stopped during its epochs starts them again.

>>> import numpy as np
>>> from sae.config import ModelConfig
>>> from sae.model import fit_sae
>>> X = np.random.default_rng(0).random((600, 8))
>>> config = ModelConfig(n_atoms=12, lambda_z=0.5, max_outer=3, random_state=0, fit_method="online", batch_size=64)
>>> fit = fit_sae(X, config)
>>> [record["online"] for record in fit.history], fit.stop_reason
([False, True, True, True, False], 'max_outer')
>>> fit.history[-1]["total"] < fit.history[0]["total"]
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from sae.config import ModelConfig
from sae.blas import one_blas_thread
from sae.outer import Backend, FitResult, FitState, history_record, log_outer, solve_encoder
from sae.progress import Interrupt, go_on
from sae.terms import inner

__all__ = ["epoch_order", "fit_online", "forgetting_factor", "learn_online"]

logger = logging.getLogger(__name__)


def forgetting_factor(t: int, eta: int, cap: float = np.inf) -> float:
    """``beta`` of the statistics of ``t`` mini-batches when a batch of ``eta`` frames joins them (module docstring).

    ``beta = (theta + 1 - eta) / (theta + 1)`` with ``theta = t eta`` for ``t < eta`` and ``eta^2 + t - eta``
    after (Mairal et al. 2010, 3.4.3, where ``t`` counts the batches before this one as in SPAMS's ``trainDL``:
    0 when there are none), capped at ``cap`` frames, which keeps forgetting at a steady rate from there on.
    The statistics then weigh the new batch against all before by about ``1 / t`` early on, and by less and
    less as ``t`` grows past ``eta``.  Counting this batch in ``t`` too, as the paper's algorithm reads, keeps
    twice as much of the first batches: on ``bench/bench_core.py``'s data (N = 10,000, m = 128,
    lambda_z = 0.03) the objective after 1, 3 and 5 epochs was 1.5, 1.2 and 0.9 % higher.

    >>> forgetting_factor(0, 256), round(forgetting_factor(1, 256), 6), round(forgetting_factor(10_000, 256), 6)
    (0.0, 0.003891, 0.996599)
    >>> round(forgetting_factor(10_000, 256, cap=40_000), 6)
    0.9936
    """
    if t <= 0:
        return 0.0
    theta = min(t * eta if t < eta else eta * eta + t - eta, cap)
    return (theta + 1.0 - eta) / (theta + 1.0)


@njit(cache=True)
def _update_atoms(A, B, C, residual):  # pragma: no cover - compiled
    """One pass of block coordinate descent over the rows of ``C`` (m, n), in place.

    ``c_j <- proj(c_j + (b_j - sum_k A_jk c_k) / A_jj)`` onto ``||c_j|| <= 1``, with the rows updated before
    ``j`` already moved (Gauss-Seidel).  Atoms with ``A_jj = 0`` are skipped.
    """
    m, n = C.shape
    for j in range(m):
        ajj = A[j, j]
        if ajj <= 0.0:
            continue
        for f in range(n):
            residual[f] = B[j, f]
        for k in range(m):
            a = A[j, k]
            if a != 0.0:
                for f in range(n):
                    residual[f] -= a * C[k, f]
        norm = 0.0
        for f in range(n):
            value = C[j, f] + residual[f] / ajj
            residual[f] = value
            norm += value * value
        scale = 1.0 / max(1.0, np.sqrt(norm))
        for f in range(n):
            C[j, f] = residual[f] * scale


@njit(cache=True)
def _accumulate_sparse(A, B, Z, X):  # pragma: no cover - compiled
    """``A += Z^T Z`` and ``B += Z^T X`` over the non-zeros of each row of ``Z`` (``nnz^2 + nnz n`` per frame)."""
    m = Z.shape[1]
    n = X.shape[1]
    index = np.empty(m, np.int64)
    for i in range(Z.shape[0]):
        k = 0
        for j in range(m):
            if Z[i, j] != 0:
                index[k] = j
                k += 1
        for p in range(k):
            row = index[p]
            zp = np.float64(Z[i, row])
            for q in range(k):
                A[row, index[q]] += zp * Z[i, index[q]]
            for f in range(n):
                B[row, f] += zp * X[i, f]


#: Below this share of non-zero codes in a batch, its statistics are summed over the non-zeros
#: (`_accumulate_sparse`); above, by two matrix products.
SPARSE_SHARE = 0.1

#: ``theta`` of `forgetting_factor` is capped at this many epochs of frames, so that the statistics keep
#: forgetting at a steady rate (SPAMS's ``trainDL`` caps it at two epochs too).
MEMORY = 2.0


def _accumulate(A: np.ndarray, B: np.ndarray, codes: np.ndarray, batch: np.ndarray, nnz: int, beta: float) -> None:
    """``A <- beta A + Z^T Z`` and ``B <- beta B + Z^T X`` in float64 sums: over the non-zeros in float64 when
    the codes are sparse, by matrix products in the batch's dtype when they are not."""
    A *= beta
    B *= beta
    if nnz <= SPARSE_SHARE * codes.size:
        _accumulate_sparse(A, B, codes, batch)
    else:
        A += codes.T @ codes
        B += codes.T @ batch


def _replace_unused(A: np.ndarray, C: np.ndarray, batch: np.ndarray, rng: np.random.Generator) -> None:
    """Atoms that no frame has used (``A_jj = 0``) become frames of ``batch`` drawn at random, unit norm."""
    unused = np.flatnonzero(np.diag(A) <= 0.0)
    norms = np.linalg.norm(batch, axis=1)
    usable = np.flatnonzero(norms > 0)
    if unused.size == 0 or usable.size == 0:
        return
    picks = rng.choice(usable, size=unused.size, replace=usable.size < unused.size)
    C[unused] = batch[picks] / norms[picks, None]


#: FISTA iterations of the E step per mini-batch, warm-started from the last encoder.
ENCODER_STEPS = 10


def _step_encoder(S: np.ndarray, B: np.ndarray, E: np.ndarray, rtol: float) -> np.ndarray:
    """The E step on the statistics: ``argmin 1/2 tr(E S E^T) - tr(E^T B)`` over rows of unit norm, by at most
    `ENCODER_STEPS` FISTA iterations from ``E`` (:func:`sae.outer.solve_encoder`)."""
    return solve_encoder(S, B, E, lambda_e=1.0, rtol=rtol, max_iter=ENCODER_STEPS).solution


#: Frames an epoch reads at a time: the frames are visited block by block, the blocks in a random order and
#: the frames of a block in a random order (a permutation of all frames would read a stored array frame by frame).
ORDER_BLOCK = 65_536


def epoch_order(n_samples: int, rng: np.random.Generator, block: int | None = None):
    """The visits of an epoch: ``(start, stop, permutation of range(stop - start))`` per block of ``block``
    frames (`ORDER_BLOCK` by default), the blocks in a random order.

    >>> [(start, stop, perm.tolist()) for start, stop, perm in epoch_order(5, np.random.default_rng(0), block=3)]
    [(0, 3, [2, 0, 1]), (3, 5, [1, 0])]
    """
    block = ORDER_BLOCK if block is None else block
    bounds = [(start, min(start + block, n_samples)) for start in range(0, n_samples, block)]
    for index in rng.permutation(len(bounds)):
        start, stop = bounds[index]
        yield start, stop, rng.permutation(stop - start)


class _Statistics:
    """``A = sum z z^T`` (m, m), ``B = sum z x^T`` (m, n) and, when an encoder is learned, ``S = sum x x^T``
    (n, n), over the frames coded in this epoch and the one before (older ones are dropped when an epoch
    starts: their codes came from a dictionary long gone; ``S`` goes with them, so that the E step's ``B`` and
    ``S`` sum the same frames)."""

    def __init__(self, m: int, n: int, encoder: bool) -> None:
        shapes = [(m, m), (m, n)] + ([(n, n)] if encoder else [])
        self.sums = [np.zeros(shape) for shape in shapes]  # A, B (and S): what the D and E steps see
        self.current = [np.zeros(shape) for shape in shapes]
        self.before = [np.zeros(shape) for shape in shapes]

    @property
    def A(self) -> np.ndarray:
        return self.sums[0]

    @property
    def B(self) -> np.ndarray:
        return self.sums[1]

    @property
    def S(self) -> np.ndarray:
        return self.sums[2]

    def new_epoch(self) -> None:
        self.before, self.current = self.current, self.before
        for array in self.current:
            array[...] = 0.0

    def add(self, codes: np.ndarray, batch: np.ndarray, nnz: int, beta: float) -> None:
        for array in self.before:
            array *= beta
        _accumulate(self.current[0], self.current[1], codes, batch, nnz, beta)
        if len(self.current) == 3:
            self.current[2] *= beta
            self.current[2] += batch.T @ batch
        for total, now, old in zip(self.sums, self.current, self.before):
            np.add(now, old, out=total)


def learn_online(
    read: Callable[[int, int], np.ndarray],
    n_samples: int,
    config: ModelConfig,
    components: np.ndarray,
    encoder: np.ndarray | None,
    rng: np.random.Generator,
    previous_total: float,
    *,
    code_batch: Callable[[np.ndarray, np.ndarray, np.ndarray | None], Any],
    log: logging.Logger = logger,
    callback: Callable[[FitState], None] | None = None,
    interrupt: Interrupt = go_on,
) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]], str]:
    """The epochs of the online fit (module docstring) of ``n_samples`` frames, from ``components`` and ``encoder``.

    ``read(start, stop)`` returns frames ``start:stop`` as an array (stop - start, n) in the working dtype;
    ``code_batch(X_t, C, E)`` returns the batch's codes as a :class:`~sae.solvers.SolverResult` (the caller's
    Z step); ``previous_total`` is the objective of the initial point (the first epoch's change is measured
    against it); ``interrupt`` (`sae.progress.Interrupt`) is called before every block is read and before
    every mini-batch.  Returns the
    final ``C`` and ``E`` (in the frames' dtype), one history record per epoch (:func:`sae.outer.history_record`,
    with ``online = True`` and ``seconds``; the terms are the batches' sums) and the stop reason, "rtol" or
    "max_outer".
    """
    m, eta = config.n_atoms, max(1, min(config.batch_size, n_samples))
    C = np.array(components, dtype=np.float64)
    E = None if encoder is None else np.array(encoder, dtype=np.float64)
    statistics = _Statistics(m, C.shape[1], E is not None)
    residual = np.empty(C.shape[1])
    size, t, history, stop_reason, dtype = n_samples * m, 0, [], "max_outer", np.dtype(config.dtype)
    for epoch in range(1, config.max_outer + 1):
        tic = time.perf_counter()
        sums = dict(reconstruction=0.0, sparsity=0.0, encoder=0.0, nnz=0)
        largest, coding, batches = 0, 0.0, 0
        statistics.new_epoch()
        for start, stop, permutation in epoch_order(n_samples, rng):
            interrupt(f"online epoch {epoch}, frames {start}:{stop}")
            frames = read(start, stop)
            for first in range(0, stop - start, eta):
                if first:  # a block of real music takes tens of seconds: a stop is noticed batch by batch
                    interrupt(f"online epoch {epoch}, frames {start}:{stop}, mini-batch {first // eta + 1}")
                batch = frames[np.sort(permutation[first:first + eta])]
                dictionary, encoding = C.astype(dtype), None if E is None else E.astype(dtype)
                started = time.perf_counter()
                result = code_batch(batch, dictionary, encoding)
                coding += time.perf_counter() - started
                codes = result.solution
                largest = max(largest, int(result.n_iter))
                nnz = int(np.count_nonzero(codes))
                reconstruction = batch - codes @ dictionary
                sums["reconstruction"] += inner(reconstruction, reconstruction)
                sums["sparsity"] += float(np.abs(codes).sum(dtype=np.float64))
                sums["nnz"] += nnz
                if E is not None:
                    misfit = codes - batch @ encoding.T
                    sums["encoder"] += inner(misfit, misfit)
                t += 1
                batches += 1
                statistics.add(codes, batch, nnz, forgetting_factor(t - 1, len(batch), MEMORY * n_samples))
                if config.lambda_d > 0:
                    _update_atoms(statistics.A, statistics.B, C, residual)
                    _replace_unused(statistics.A, C, batch, rng)
                if E is not None:
                    E = _step_encoder(statistics.S, statistics.B, E, config.dictionary_tolerance)
        terms = {"reconstruction": sums["reconstruction"], "sparsity": sums["sparsity"], "graph": float("nan"),
                 "encoder": sums["encoder"] if E is not None else float("nan"), "nnz": sums["nnz"]}
        steps = {"codes": {"n_iter": largest, "stop_reason": "online"},
                 "dictionary": {"n_iter": batches, "stop_reason": "online"} if config.lambda_d > 0 else None,
                 "encoder": {"n_iter": batches, "stop_reason": "online"} if E is not None else None}
        record = history_record(epoch, config, terms, size, previous_total, steps)
        record["online"] = True
        record["seconds"], record["seconds_codes"] = time.perf_counter() - tic, coding
        history.append(record)
        previous_total = record["total"]
        log_outer(log, record)
        if callback is not None:
            callback(FitState(iteration=epoch, codes=None, components=C.astype(dtype),
                              encoder=None if E is None else E.astype(dtype), record=record))
        if epoch > 1 and record["relative_change"] <= config.rtol:
            stop_reason = "rtol"
            break
    return C.astype(dtype), None if E is None else E.astype(dtype), history, stop_reason


def fit_online(backend: Backend, read: Callable[[int, int], np.ndarray], config: ModelConfig, components: np.ndarray,
               encoder: np.ndarray | None, codes: Any, rng: np.random.Generator, *,
               callback: Callable[[FitState], None] | None = None, interrupt: Interrupt = go_on) -> FitResult:
    """The online fit on ``backend`` (a `sae.outer.Backend`): `learn_online`'s epochs, then one Z step of every
    frame by the backend, saved as its last iteration.

    ``codes``: the backend's initial (all-zero) codes.  The history: the initial point, one record per epoch
    (``online = True``), and the last Z step's record (the true objective of the returned model, numbered after
    the epochs).
    """
    from sae.model import code_step_options, solve_codes  # sae.model runs this module's fit

    size = backend.n_samples * config.n_atoms
    start = history_record(0, config, backend.terms(codes, components, encoder, None, None), size, None, {})
    start.update(seconds=0.0, online=False)
    options = code_step_options(config)

    def code_batch(batch: np.ndarray, C: np.ndarray, E: np.ndarray | None) -> Any:
        return solve_codes(batch, C, E, None, np.zeros((len(batch), config.n_atoms), batch.dtype), **options)

    with one_blas_thread():  # the batches' small products: no spinning BLAS thread beside the frames' threads
        C, E, epochs, stop_reason = learn_online(read, backend.n_samples, config, components, encoder, rng,
                                                 start["total"], code_batch=code_batch, log=backend.logger,
                                                 callback=callback, interrupt=interrupt)
    history = [start, *epochs]
    iteration = len(epochs) + 1
    tic = time.perf_counter()
    codes, step = backend.code_step(codes, C, E, config, iteration)
    seconds_codes = time.perf_counter() - tic
    terms = backend.terms(codes, C, E, step, backend.statistics(codes))
    record = history_record(iteration, config, terms, size, history[-1]["total"], {"codes": step})
    record.update(online=False, seconds=time.perf_counter() - tic, seconds_codes=seconds_codes)
    history.append(record)
    codes = backend.save(iteration, codes, C, E, history, stop_reason)
    log_outer(backend.logger, record)
    if callback is not None:
        callback(FitState(iteration=iteration, codes=codes, components=C, encoder=E, record=record))
    return FitResult(components=C, encoder=E, codes=codes, history=history, n_iter=len(epochs),
                     stop_reason=stop_reason, config=config)
