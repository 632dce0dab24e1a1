"""The distributed Z step: block problems and states, one FISTA iteration per block task, the client's loop.

The Z step minimises over the codes ``Z`` (N, m) (orientation of :mod:`sae`)
``F(Z) = 1/2 <Z, A(Z)> - <Z, B> + c + lambda_z ||Z||_1`` with, per row block
``b`` (:mod:`sae.distributed.blocks`),
``A(Z)_b = lambda_d Z_b C C^T + lambda_e Z_b + lambda_g (L Z)_b`` and
``B_b = lambda_d X_b C^T + lambda_e X_b E^T`` (N_b, m).

**With the graph term**: one global FISTA (:func:`sae.solvers.fista`) whose
iterations are per-block tasks.  Iteration ``k`` of block ``b`` (`code_iterate`,
compiled pass :func:`sae.distributed.kernel.block_iterate`) receives the halo
rows of ``x_k`` and ``x_{k-1}`` from its neighbours and computes::

    y_b         = x_{k,b} + alpha_k (x_{k,b} - x_{k-1,b})                          (N_b, m)
    grad_b      = lambda_d (y_b C - X_b) C^T + lambda_e (y_b - X_b E^T) + lambda_g (L y)_b
    x_{k+1,b}   = soft(y_b - grad_b / beta, lambda_z / beta)

with ``beta`` = :func:`sae.model.code_lipschitz` (global), ``y_b C`` (N_b, n)
extrapolated from ``P_k = x_k C`` and ``P_{k-1}`` kept in the block's state
(two (N_b, m) x (m, n) products per iteration: ``y C`` and ``x_{k+1} C``) and
``(L y)_b`` from ``(L x_k)_b`` and ``(L x_{k-1})_b``.  It returns the block's
parts of ``F(x_k)`` (``||P_k - X_b||^2``, ``<x_k, (L x_k)_b>``, ...), of the
adaptive restart test ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0`` and, for the
gap rule, of the dual point at ``y_k``.  Small tasks cut the halo rows of
``x_{k+1}`` the neighbours on other workers want (`halo_pack`: one pack per
block and receiving worker, moved once; a neighbour on the same worker reads
the rows from the block's state itself) and decide the momentum of the next iteration from the summed
restart test, in block order (`next_momentum`), on the cluster.  Every
operation is row-wise but ``L Z``, which the halo makes exact, and the
restart test, summed globally: the iterates **are** those of the in-memory
FISTA on the whole problem (same ``alpha_k``, same ``beta``; equal up to the
rounding of sums).  The client (`block_fista`) sums each iteration's parts in
block order and applies the stopping rule of :func:`sae.solvers.fista`:
``z_stop="gap"``, the duality gap of ``x_k`` with the dual point of ``y_k``
(:func:`sae.solvers.duality_gap`, at the iterations of :func:`sae.solvers.gap_due`)
``<= rtol F(x_k)``; ``"change"``,
``|F_k - F_{k-1}| <= rtol |F_k|``; ``atol``; ``max_iter``; and the start if
the last iterate is worse.  Iterations are submitted ``lookahead`` ahead of
that test (the momentum is decided on the cluster), so the round trip is
hidden; iterates submitted past the stop are dropped.

**Without the graph term** blocks are independent: each block's whole Z step
is one task (`solve_block_codes`: :func:`sae.model.solve_codes` on one
thread).  With coordinate descent (the default) every frame stops on its own
duality gap, so the codes are those of the in-memory fit whatever the blocks;
with FISTA the rule holds per block, which implies it for the sum: blocks
may run a few more iterations than the in-memory fit, never fewer.  The
step's iteration count is the largest over blocks.  Coordinate descent codes a
block by batches of frames of about a second (the same codes, frame by frame)
and, given the name of a `distributed.Event`, looks at it between batches (at
most every `STOP_CHECK_SECONDS`): a stopped run sets it, and a block already
running ends within seconds (`StepStopped`) instead of coding the rest of its
frames.

State in worker memory, per block: ``X_b``, ``x_k`` and ``x_{k-1}`` (compact:
CSR when sparse enough), ``P_k``, ``P_{k-1}`` (or, with ``offload_previous``,
``x_{k-1}``, ``P_{k-1}``, ``P_k`` in a file: :mod:`sae.distributed.offload`),
``X_b E^T`` when ``lambda_e > 0``.  The client lets go of a state once the
next iteration is submitted, so two generations of iterates live per block
(plus those submitted ahead).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from dask.sizeof import sizeof

from sae.config import ModelConfig
from sae.distributed.blocks import SPARSE_STATE_DENSITY, GraphBlock, compact, densify
from sae.distributed.kernel import (
    ITERATE_TILE,
    SUMS,
    Coefficients,
    GraphRows,
    Iterates,
    Reconstruction,
    Terms,
    Work,
    block_iterate,
)
from sae.distributed.memory import pooled_empty, sizeof_fields
from sae.distributed.offload import Offloaded, Resident, offload_async
from sae.model import solve_codes
from sae.progress import Interrupt, go_on
from sae.solvers import duality_gap, gap_due, gap_stop_reason, next_momentum
from sae.solvers import stop_reason as change_stop_reason

logger = logging.getLogger(__name__)

#: Halo rows are sent as CSR when at most this fraction of their entries is non-zero.
SPARSE_HALO_DENSITY = 0.25

#: A Z step with the graph term logs its progress (iteration, objective, non-zeros) at most this often, in seconds.
PROGRESS_SECONDS = 30.0

#: Coordinate descent codes a block by batches of frames (`solve_block_codes`), the first of this many.
CD_FIRST_BATCH = 16

#: A block coded by batches looks at its step's stop event at most this often, in seconds.
STOP_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Tuning:
    """How the distributed fit runs, never what it computes: the results are the same for any values.

    ``tile``: rows per tile of the compiled block iteration; ``sparse_density``:
    code blocks are CSR when at most this fraction is non-zero (`compact`);
    ``array_pool``: new iterates come from the worker's array pool
    (:mod:`sae.distributed.memory`), else from ``np.empty``;
    ``pause_work_stealing``: the scheduler's work stealing is paused during
    the training; ``progress_seconds``: period of the Z step's progress log.
    """

    tile: int = ITERATE_TILE
    sparse_density: float = SPARSE_STATE_DENSITY
    array_pool: bool = True
    pause_work_stealing: bool = True
    progress_seconds: float = PROGRESS_SECONDS


@dataclass(frozen=True)
class CodeProblem:
    """The data of block ``b``'s part of the Z step (constant during the step)."""

    index: int  # b
    data: np.ndarray  # X_b (N_b, n)
    components: np.ndarray | None  # C (m, n) when lambda_d > 0
    target: np.ndarray | None  # X_b E^T (N_b, m) when lambda_e > 0
    lambda_d: float
    lambda_z: float
    lambda_g: float
    lambda_e: float
    step: float  # 1 / beta
    graph: GraphBlock | None
    offload: bool = False  # keep dense x_{k-1}, x_{k-1} C and x_k C in an offload file
    tuning: Tuning = field(default_factory=Tuning)


@dataclass(frozen=True)
class CodeState:
    """FISTA state of one block after iteration ``k - 1``.

    ``x`` = x_k and ``x_prev`` = x_{k-1} (compact: CSR when sparse enough);
    ``P`` = x_k C and ``P_prev`` = x_{k-1} C (N_b, n), from which ``y C`` is
    extrapolated; None when not computed yet (the start) or when
    ``lambda_d = 0``.  With ``offload_previous``, a dense x_{k-1} is an
    `Offloaded` (or `Resident`) holding x_{k-1} and, unless ``lambda_d = 0``,
    x_{k-1} C and x_k C; ``P`` and ``P_prev`` are then None.  ``scalars``: the
    block's parts of F(x_{k-1}), of the restart test and of the gap.
    """

    x: Any
    x_prev: Any = None
    P: np.ndarray | None = None
    P_prev: np.ndarray | None = None
    scalars: dict[str, float] = field(default_factory=dict)


for _block_type in (GraphBlock, CodeProblem, CodeState):
    sizeof.register(_block_type)(sizeof_fields)


def code_problem(
    index: int,
    X_block: np.ndarray,
    components: np.ndarray,
    encoder: np.ndarray | None,
    graph: GraphBlock | None,
    params: dict[str, Any],
) -> CodeProblem:
    """Block ``index``'s `CodeProblem`; ``params``: the weights, ``step``, and optionally ``offload_previous``,
    ``tuning``."""
    lambda_e = params["lambda_e"]
    return CodeProblem(
        index=index,
        data=X_block,
        components=components if params["lambda_d"] > 0 else None,
        target=X_block @ encoder.T if lambda_e > 0 else None,
        lambda_d=params["lambda_d"],
        lambda_z=params["lambda_z"],
        lambda_g=params["lambda_g"],
        lambda_e=lambda_e,
        step=params["step"],
        graph=graph,
        offload=bool(params.get("offload_previous", False)),
        tuning=params.get("tuning") or Tuning(),
    )


def _stacked_halo(sources: Sequence[Any] | None, index: int, n_cols: int, dtype: Any,
                  previous: bool = False, empty: Callable[..., np.ndarray] = np.empty) -> np.ndarray:
    """The halo rows block ``index`` receives, stacked in neighbour order (dense, C-contiguous).

    A source is a neighbour's pack (`halo_pack`: ``{receiver: rows}``) or, for
    a neighbour on the same worker, ``(state, plan)``: its `CodeState` and
    `send_plan`, whose rows are cut here, from ``x_prev`` when ``previous``.
    Each piece is written in place into one array of ``empty`` (a pooled one
    in the trainer), instead of a copy per piece then a stacked copy into a
    fresh array: the two took a fifth of the workers' time on the development
    set (560,280 frames, 12 blocks, 349,233 halo rows per iteration and
    generation); 30,000 rows of 512 from 6 neighbours 37 -> 24 ms.
    """
    pieces = []
    for source in sources or ():
        if isinstance(source, tuple):
            state, plan = source
            pieces.append(((state.x_prev if previous else state.x), plan[index]))
        else:
            pieces.append((source[index], None))
    counts = [matrix.shape[0] if rows is None else len(rows) for matrix, rows in pieces]
    if not sum(counts):
        return np.zeros((0, n_cols), dtype=dtype)
    out = empty((sum(counts), n_cols), dtype)
    at = 0
    for (matrix, rows), count in zip(pieces, counts):
        target = out[at : at + count]
        if sp.issparse(matrix):
            densify(matrix if rows is None else matrix[rows], target)
        elif rows is not None and matrix.dtype == out.dtype:
            np.take(matrix, rows, axis=0, out=target)
        else:
            target[...] = matrix if rows is None else matrix[rows]
        at += count
    return out


def code_iterate(
    problem: CodeProblem,
    state: CodeState,
    packs: Sequence[dict],
    previous_packs: Sequence[dict] | None,
    momentum: tuple[float, float],
    gap: bool = False,
) -> CodeState:
    """One FISTA iteration on one block (module docstring): the next `CodeState`.

    ``packs`` and ``previous_packs``: the halo rows of ``x_k`` and ``x_{k-1}``
    from the neighbours (`_stacked_halo`'s sources: for a neighbour on the same
    worker, its state, read for both); ``momentum``: ``(t_k, alpha_k)``; ``gap``: also the
    block's parts of the dual point at ``y_k``.  Everything after
    densifying ``x_k`` and ``x_{k-1}`` is one compiled pass,
    :func:`sae.distributed.kernel.block_iterate`: no (N_b, m) temporary but the
    new iterate.
    """
    tuning = problem.tuning
    empty = pooled_empty if tuning.array_pool else np.empty
    # CSR iterates are densified into pooled arrays, free again once the task is over
    x = densify(state.x, empty(state.x.shape, state.x.dtype) if sp.issparse(state.x) else None)
    dtype = x.dtype.type
    alpha = dtype(momentum[1])
    used = bool(state.x_prev is not None and alpha != 0)
    X, C = problem.data, problem.components
    m = x.shape[1]
    none = np.zeros((0, 0), dtype=x.dtype)
    use_recon = C is not None
    previous, P, P_previous = state.x_prev, state.P, state.P_prev
    offloaded_previous = previous if isinstance(previous, Offloaded) else None
    if isinstance(previous, (Offloaded, Resident)) and (used or use_recon):
        # x_{k-1} (and x_{k-1} C, x_k C) read back into pooled arrays, usually ahead of this task
        previous, *parts = previous.load(prefetch_next=False)
        if parts:
            P_previous, P = parts
    if use_recon and P is None:
        P = x @ C
    # x_k and x_k C become the next state's x_{k-1} and x_{k-1} C: written to disk while the kernel runs,
    # then x_{k+1} C after them (the next state keeps none of the three in memory)
    offload = problem.offload and not sp.issparse(state.x) and state.x.size > 0
    written = _offload_async_or_none(offload, state.x, P if use_recon else None)
    if offloaded_previous is not None and offloaded_previous.sequence:
        # then the I/O thread reads the next block's ahead (after this write: this task waits for the write)
        offloaded_previous.files.prefetch_after(offloaded_previous.sequence)
    x_prev = densify(previous, empty(x.shape, x.dtype) if sp.issparse(previous) else None) if used else none
    if use_recon:
        P_prev = P_previous if used else none
        reconstruction = Reconstruction(X, C, np.ascontiguousarray(C.T))
        P_next = empty(P.shape, P.dtype)
    else:
        P = P_prev = P_next = none
        reconstruction = Reconstruction(none, none, none)
    graph = problem.graph
    if graph is not None:
        own, halo_part = graph.own, graph.halo
        halo = _stacked_halo(packs, problem.index, m, x.dtype, empty=empty)
        halo_prev = (_stacked_halo(previous_packs, problem.index, m, x.dtype, previous=True, empty=empty) if used
                     else halo)
        rows = GraphRows(own.data, own.indices, own.indptr, halo_part.data, halo_part.indices, halo_part.indptr,
                         halo, halo_prev)
    else:
        index = np.zeros(1, dtype=np.int64)
        rows = GraphRows(np.zeros(0), index[:0], index, np.zeros(0), index[:0], index, none, none)
    target = problem.target if problem.target is not None else none
    # the next iterate: compacted to CSR below the sparse density (its pooled array is then free again)
    x_next = empty(x.shape, x.dtype)
    tile = min(tuning.tile, max(x.shape[0], 1))
    coefficients = Coefficients(alpha, dtype(problem.lambda_d), dtype(problem.lambda_g), dtype(problem.lambda_e),
                                dtype(problem.step), dtype(problem.step * problem.lambda_z))
    terms = Terms(used, use_recon, graph is not None, problem.target is not None, bool(gap))
    work = Work(np.empty((tile, X.shape[1] if use_recon else 0), dtype=x.dtype), np.empty((tile, m), dtype=x.dtype),
                x_next, P_next)
    sums = dict(zip(SUMS, (float(v) for v in block_iterate(Iterates(x, x_prev, P, P_prev), reconstruction, rows,
                                                              target, coefficients, terms, work))))
    scalars = {"smooth": _smooth(problem, sums["reconstruction"], sums["graph"], sums["encoder"]),
               "l1": sums["l1"], "graph": sums["graph"], "nnz": sums["nnz"], "momentum_used": used,
               "restart_y": sums["restart_y"], "restart_x": sums["restart_x"]}
    if gap:
        scalars.update(smooth_y=_smooth(problem, sums["reconstruction_y"], sums["graph_y"], sums["encoder_y"]),
                       l1_y=sums["l1_y"], dot_y=sums["y_dot_gradient"], largest_y=sums["gradient_max"])
    x_next = compact(x_next, sums["nnz_next"], tuning.sparse_density)
    if written is not None:
        offloaded = written.result()
        if use_recon:
            offloaded.append(P_next)
        offloaded.complete()
        return CodeState(x=x_next, x_prev=offloaded, scalars=scalars)
    return CodeState(x=x_next, x_prev=state.x, P=P_next if use_recon else None,
                     P_prev=P if use_recon else None, scalars=scalars)


def _smooth(problem: CodeProblem, reconstruction: float, graph: float, encoder: float) -> float:
    """The block's part of the smooth terms from its unweighted sums."""
    smooth = 0.5 * problem.lambda_d * reconstruction if problem.components is not None else 0.0
    if problem.graph is not None:
        smooth += 0.5 * problem.lambda_g * graph
    if problem.target is not None:
        smooth += 0.5 * problem.lambda_e * encoder
    return smooth


def _offload_async_or_none(offload: bool, x: np.ndarray, P: np.ndarray | None) -> Any:
    """With ``offload``: the future of `Offloaded` ``x`` (and ``P``, room kept for ``x_{k+1} C``); else None."""
    if not offload:
        return None
    return offload_async((x,) if P is None else (x, P), 0 if P is None else P.nbytes)


def first_momentum() -> tuple[float, float]:
    """``(t_1, alpha_1) = (1, 0)``: the first step is a plain proximal-gradient step."""
    return 1.0, (1.0 - 1.0) / next_momentum(1.0)


def block_momentum(
    momentum: tuple[float, float], parts: Sequence[dict[str, Any]], restart: bool = True
) -> tuple[float, float]:
    """``(t_{k+1}, alpha_{k+1})`` after iteration ``k``, with the adaptive restart of :func:`sae.solvers.fista`.

    ``t_{k+1} = next_momentum(t_k)``, or 1 when the momentum was used and
    ``<y_k - x_{k+1}, x_{k+1} - x_k> > 0`` (block sums added in block order);
    ``alpha_{k+1} = (t_{k+1} - 1) / next_momentum(t_{k+1})``.  ``restart=False``: plain FISTA.
    """
    t = next_momentum(momentum[0])
    if restart and parts and parts[0]["momentum_used"]:
        if sum(p["restart_y"] for p in parts) - sum(p["restart_x"] for p in parts) > 0:
            t = 1.0
    return t, (t - 1.0) / next_momentum(t)


def state_scalars(state: CodeState) -> dict[str, float]:
    """The block's sums of the iteration that made ``state``."""
    return state.scalars


def state_solution(state: CodeState) -> Any:
    """The iterate ``x_k`` of the state after iteration ``k`` (its ``x_prev``), the result of a stopped step."""
    if isinstance(state.x_prev, (Offloaded, Resident)):
        return state.x_prev.load(prefetch_next=False)[0]
    return state.x_prev


def halo_pack(state: CodeState, plan: dict[int, np.ndarray],
              receivers: Sequence[int] | None = None) -> dict[int, Any]:
    """The rows of ``x_k`` each of ``receivers`` (default: every neighbour) wants: ``{receiver: rows}`` (CSR when
    sparse enough)."""
    pack = {}
    for receiver, wanted in plan.items():
        if receivers is not None and receiver not in receivers:
            continue
        rows = state.x[wanted]
        if not sp.issparse(rows) and rows.size and np.count_nonzero(rows) <= SPARSE_HALO_DENSITY * rows.size:
            rows = sp.csr_array(rows)
        pack[receiver] = rows
    return pack


class StepStopped(RuntimeError):
    """A block's Z step left unfinished because its run was stopped (the step's stop event was set)."""


def solve_block_codes(X_block: np.ndarray, components: np.ndarray, encoder: np.ndarray | None, Z0: Any,
                      options: dict[str, Any], sparse_density: float = SPARSE_STATE_DENSITY,
                      stop_event: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The whole Z step of one block when blocks are independent (``lambda_g = 0``): its codes and record.

    ``options``: the keyword arguments of :func:`sae.model.solve_codes`
    (:func:`sae.model.code_step_options`).  Coordinate descent runs by
    batches of frames, sized to take about `STOP_CHECK_SECONDS` each (every
    frame is its own problem, its right-hand side computed within it: the codes
    are bit for bit those of one call); with ``stop_event``, the
    `distributed.Event` of that name is looked at between batches, at most
    every `STOP_CHECK_SECONDS`, and `StepStopped` raised once it is set.
    FISTA solves the block as one problem.
    """
    Z0 = densify(Z0)
    n_frames = X_block.shape[0]
    event = None
    if stop_event is not None:
        from distributed import Event

        event = Event(stop_event)
    whole = options.get("method", "auto") == "fista"
    size = n_frames if whole else CD_FIRST_BATCH
    looked, parts, n_iter, reasons, start = time.monotonic(), [], 0, set(), 0
    while start < n_frames or not parts:
        if event is not None and parts and time.monotonic() - looked >= STOP_CHECK_SECONDS:
            looked = time.monotonic()
            if event.is_set():
                raise StepStopped(f"Z step stopped after {start} of {n_frames} frames of the block")
        rows = slice(start, start + size)
        began = time.monotonic()
        result = solve_codes(X_block[rows], components, encoder, None, Z0[rows], **options,
                             n_threads=1)  # one core per task: the workers' threads are the parallelism
        seconds = time.monotonic() - began
        parts.append(result.solution)
        n_iter, reasons, start = max(n_iter, result.n_iter), reasons | {result.stop_reason}, start + size
        if seconds < STOP_CHECK_SECONDS / 4:
            size *= 2
        elif seconds > 2 * STOP_CHECK_SECONDS:
            size = max(1, size // 2)
    codes = parts[0] if len(parts) == 1 else np.concatenate(parts)
    reason = next(r for r in ("max_iter", "atol", "rtol", *sorted(reasons)) if r in reasons)  # as one call's
    return compact(codes, density=sparse_density), {"n_iter": n_iter, "stop_reason": reason, "graph": 0.0}


def block_fista(
    client: Any,
    home: Callable[[int], dict[str, Any]],
    problems: Sequence[Any],
    states: list,
    neighbours: Sequence[Sequence[int]],
    send_plans: Sequence[Any],
    config: ModelConfig,
    *,
    tag: str,
    outer: int,
    lookahead: int,
    progress_seconds: float,
    n_codes: int,
    guard: Any = None,
    local_states: bool = True,
    interrupt: Interrupt = go_on,
) -> tuple[list | None, dict[str, Any]]:
    """The client's loop of the global FISTA (module docstring), from the block ``states`` (futures).

    ``home(b)``: the ``submit`` keywords of block ``b``'s tasks; ``problems``:
    futures of the `CodeProblem` of every block; ``neighbours[b]``: the blocks
    whose rows ``b`` needs; ``send_plans[c]``: future of `send_plan` of block
    ``c``; ``n_codes``: N m; ``guard``: a `sae.distributed.budget.MemoryGuard`
    that watches the workers' memory while the client waits; ``local_states``:
    a block reads the halo rows of a neighbour on its own worker from the
    neighbour's state (``x_k`` and ``x_{k-1}``) instead of a pack (not with
    ``offload_previous``: ``x_{k-1}`` is then in a file); ``interrupt(where)``:
    called after every iteration, raises to stop the step.  Empties ``states`` once its first iteration is
    submitted.  Returns the final states (None when the start is better than
    the last iterate) and the step's record: ``n_iter``, ``stop_reason``,
    ``gap`` (the last duality gap evaluated, NaN with the change rule) and
    ``graph`` (``tr(Z^T L Z)`` of the result, or of the start).
    """
    n_blocks = len(problems)

    # The halo rows, scalars and momentum (instant tasks) have priority over the block iterations: a worker
    # runs its blocks one after the other, and without it the halo rows the *other* worker waits for were cut
    # only after all of this worker's blocks (one worker idle for up to half an iteration).
    def worker(b: int) -> str | None:
        return (home(b).get("workers") or [None])[0]

    receivers = [[b for b in range(n_blocks) if c in neighbours[b]] for c in range(n_blocks)]

    def submit_iteration(k: int, current: list, previous: list | None, momentum: Any) -> tuple[list, list, list, Any]:
        # sources[b][i]: where block b gets the rows of x_k of its i-th neighbour c: a pack cut for the
        # receivers on b's worker (moved once per worker), or c's state itself when it lives on b's worker
        sources: list[list[Any]] = [[None] * len(neighbours[b]) for b in range(n_blocks)]
        for c in range(n_blocks):
            by_worker: dict[str | None, list[int]] = {}
            for b in receivers[c]:
                by_worker.setdefault(worker(b), []).append(b)
            for i, (w, receiving) in enumerate(by_worker.items()):
                if local_states and w is not None and w == worker(c):
                    source: Any = (current[c], send_plans[c])
                else:
                    source = client.submit(halo_pack, current[c], send_plans[c], tuple(receiving),
                                           key=f"sae-halo-{tag}-{k}-{c}-{i}", priority=1, **home(c))
                for b in receiving:
                    sources[b][neighbours[b].index(c)] = source
        # x_{k-1}'s rows: the packs of the last iteration, or the same state (its x_prev)
        previous_sources = None if previous is None else [
            [s if isinstance(s, tuple) else p for s, p in zip(sources[b], previous[b])] for b in range(n_blocks)]
        new = [
            client.submit(code_iterate, problems[b], current[b], sources[b],
                          None if previous_sources is None else previous_sources[b], momentum,
                          by_gap and gap_due(k, max_iter), key=f"sae-ziter-{tag}-{k}-{b}", **home(b))
            for b in range(n_blocks)
        ]
        scalars = [client.submit(state_scalars, s, key=f"sae-zscalars-{tag}-{k}-{b}", priority=1, **home(b))
                   for b, s in enumerate(new)]
        # the momentum of the next iteration is decided on the cluster (adaptive restart needs a global sum),
        # so iterations can be submitted ahead of the client's stopping test
        following = client.submit(block_momentum, momentum, scalars, config.fista_restart,
                                  key=f"sae-momentum-{tag}-{k}", priority=1)
        # kept for the next iteration: the packs only (holding the states would keep a generation more alive)
        packs = [[None if isinstance(s, tuple) else s for s in sources[b]] for b in range(n_blocks)]
        return new, scalars, packs, following

    by_gap = config.z_stop == "gap" and config.lambda_z > 0
    pending: deque = deque()
    previous_packs: list | None = None
    momentum: Any = first_momentum()
    submitted = list(states)
    states.clear()  # the caller's list: the client holds the start only through the first iteration's tasks
    next_k = 0
    max_iter, rtol, atol = config.max_inner, config.inner_tolerance, config.atol
    history: list[float] = []
    graph_energy = start_graph_energy = gap = float("nan")
    stop_reason = "max_iter"
    final_states = None
    started = reported = time.perf_counter()
    while True:
        while len(pending) < lookahead and next_k <= max_iter:
            new, scalars, previous_packs, momentum = submit_iteration(next_k, submitted, previous_packs, momentum)
            pending.append((next_k, new, scalars))
            submitted = new
            next_k += 1
            # the client lets go of the states this iteration reads: each block's is freed on its worker as
            # soon as the block's next state exists (two generations of iterates alive per block, not three)
            final_states = None
        k, new, scalars = pending.popleft()
        interrupt(f"outer iteration {outer}, Z step iteration {k}")
        if guard is not None:
            guard.wait(scalars, f"outer iteration {outer}, Z step iteration {k}")
        parts = client.gather(scalars)
        value = sum(p["smooth"] for p in parts) + config.lambda_z * sum(p["l1"] for p in parts)
        history.append(value)
        graph_energy = math.fsum(p["graph"] for p in parts)
        if time.perf_counter() - reported >= progress_seconds:
            reported = time.perf_counter()
            logger.info("outer %d, Z step: iteration %d, F = %.6g, %.2f%% non-zeros, %.2f s per iteration",
                        outer, k, value, 100 * sum(p["nnz"] for p in parts) / n_codes,
                        (reported - started) / max(k, 1))
        if k == 0:
            start_graph_energy = graph_energy
        final_states = new
        if k >= 1:
            if by_gap:
                reason = None
                if gap_due(k, max_iter):
                    gap = _gap(parts, value, config.lambda_z)
                    reason = gap_stop_reason(gap, value, rtol, atol)
            else:
                reason = change_stop_reason(history, rtol, atol)
            if reason is not None:
                stop_reason = reason
                break
            if k >= max_iter:
                break
    pending.clear()  # iterations submitted past the stop: dropping the futures releases them
    start_better = history[-1] > history[0]
    if start_better:
        logger.debug("Z step: last iterate worse than the start, keeping the start")
    return (None if start_better else final_states), {
        "n_iter": len(history) - 1, "stop_reason": stop_reason, "gap": gap,
        "graph": start_graph_energy if start_better else graph_energy}


def _gap(parts: Sequence[dict[str, Any]], value: float, lambda_z: float) -> float:
    """The duality gap of ``x_k`` (objective ``value``), from the blocks' parts of the dual point at ``y_k``."""
    return duality_gap(sum(p["smooth_y"] for p in parts), sum(p["l1_y"] for p in parts),
                       sum(p["dot_y"] for p in parts), max(p["largest_y"] for p in parts), lambda_z, value)
