"""The distributed fit: the outer loop of :mod:`sae.outer` on row blocks held by Dask workers.

`ClusterBackend` is the loop's backend on a cluster: it reads the frames
block by block on the workers, runs the Z step as block tasks
(:mod:`sae.distributed.zstep`), reduces the statistics ``Z_b^T Z_b``,
``Z_b^T X_b``, ``X_b^T X_b`` and the objective's per-block sums **in block
order** on the client (float64), so the result does not depend on the number
of workers nor on the order in which tasks finish, and writes checkpoints
(:mod:`sae.distributed.checkpoints`).  The client holds futures and (m, m),
(m, n), (n, n) matrices, never an (N, m) or (N, n) array; with the frames in
cluster order (:mod:`sae.distributed.order`) it holds the N-long index maps
between the store's chunks and the blocks (4 bytes per frame each).

Each block's tasks run on a home worker (block ``b`` on worker ``b mod W``,
a loose restriction: a lost worker's blocks go elsewhere), so its state stays
where it is; the scheduler's work stealing, which would move block tasks with
their states, is paused during a training (`without_work_stealing`).  Tasks
read their inputs from the store (or the client's arrays), so a lost worker
costs at most the current outer iteration: Dask recomputes it, and the result
is the same.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import zarr

from sae.blas import one_blas_thread
from sae.config import ModelConfig
from sae.distributed.blocks import (
    LaplacianRef,
    block_bounds,
    block_data_statistics,
    block_residuals,
    block_statistics,
    densify,
    graph_block,
    graph_request,
    graph_summary,
    laplacian_power_norm,
    read_block,
    read_code_block,
    read_laplacian_rows,
    row_source,
    send_plan,
    write_block,
    zeros,
)
from sae.distributed.budget import (
    BlockPlan,
    MemoryGuard,
    check_estimate,
    fitting_plan,
    training_estimate,
    wait_watching,
    worker_budgets,
)
from sae.distributed.checkpoints import checkpoint_slot, read_checkpoint, write_frame_of_row
from sae.distributed.memory import release_pool, start_pool_trimming
from sae.distributed.order import Ordering, cluster_order, halo_plans, halo_wants, laplacian_rows, move_rows
from sae.distributed.zstep import CodeState, Tuning, block_fista, code_problem, solve_block_codes, state_solution
from sae.graph import laplacian_norm_bound
from sae.model import check_laplacian, code_lipschitz, code_step_options, init_encoder, initial_dictionary
from sae.online import fit_online
from sae.outer import FitResult, alternate, iterations_done, training_done
from sae.progress import Interrupt, go_on
from sae.store import json_safe

__all__ = ["DistributedFit", "fit_distributed", "ClusterBackend", "without_work_stealing"]

logger = logging.getLogger("sae.distributed")

MIN_WAIT_SECONDS = 0.05
"""Shortest wait between two looks at a Z step's block tasks (a progress period of 0 logs at this pace)."""


@dataclass(frozen=True)
class DistributedFit(FitResult):
    """Result of :func:`fit_distributed`: a :class:`sae.outer.FitResult` (same history records), and

    Attributes
    ----------
    codes : zarr.Array (N, m), ndarray (N, m) or None
        The stored codes of the last checkpoint when checkpointing; the
        gathered codes when ``return_codes=True`` and no checkpoint; else None.
    n_iter : int
        Outer iterations performed in total (resumed ones included).
    resumed_from : int
        The outer iteration of the checkpoint the run started from (0: fresh).
    """

    resumed_from: int = 0


# --------------------------------------------------------------------------- work stealing


_STEALING_PAUSES = "_sae_work_stealing_pauses"  # attribute of the scheduler: (trainings running, was stealing on)


async def _pause_work_stealing(dask_scheduler: Any, pause: bool) -> None:
    """Pause (``pause=True``) or resume the scheduler's work stealing for one training (run on the scheduler).

    Overlapping trainings (a sweep's) share the pause: stealing restarts when
    the last of them ends, and only if it was running before the first.
    """
    extension = dask_scheduler.extensions.get("stealing")
    if extension is None:  # distributed.scheduler.work-stealing: false
        return
    count, was_running = getattr(dask_scheduler, _STEALING_PAUSES, (0, False))
    if pause:
        if count == 0:
            was_running = "stealing" in dask_scheduler.periodic_callbacks
        setattr(dask_scheduler, _STEALING_PAUSES, (count + 1, was_running))  # before the await: overlapping calls
        if count == 0:
            try:
                await extension.stop()
            except BaseException:
                setattr(dask_scheduler, _STEALING_PAUSES, (count, was_running))
                raise
    elif count > 0:
        setattr(dask_scheduler, _STEALING_PAUSES, (count - 1, was_running))
        if count == 1 and was_running:
            await extension.start()


@contextmanager
def without_work_stealing(client: Any) -> Iterator[None]:
    """Pause the cluster's work stealing while a training runs (`_pause_work_stealing`).

    Work stealing moves queued tasks from a busy worker to an idle one *with
    their inputs*: block iterations and the instant tasks that read their
    result would move back and forth with the block states, and leave a copy
    on each side.  Loose restrictions still send a lost worker's blocks
    elsewhere: recovery does not need stealing.  A client that dies during a
    training leaves stealing paused until the scheduler restarts (a matter of
    speed for other work, not of results).
    """
    try:
        client.run_on_scheduler(_pause_work_stealing, pause=True)
        paused = True
    except Exception as error:  # e.g. a scheduler that refuses functions (distributed.scheduler.pickle: false)
        logger.warning("could not pause the scheduler's work stealing (%s): block states may move between workers",
                       error)
        paused = False
    try:
        yield
    finally:
        if paused:
            try:
                client.run_on_scheduler(_pause_work_stealing, pause=False)
            except Exception:  # the cluster is gone: nothing to resume
                logger.debug("could not resume work stealing", exc_info=True)


@contextmanager
def one_blas_thread_per_task(client: Any, n_blocks: int) -> Iterator[None]:
    """BLAS on one thread while a training runs on worker threads of this process (`sae.blas.one_blas_thread`).

    Dask's worker processes start with one BLAS thread: the parallelism is the tasks'.  Workers that are
    threads of this process (``LocalCluster(processes=False)``, what the commands run on without
    ``--cluster``) share its BLAS, which spread each block iteration's products over both cores while the
    other block's did the same: an iteration of the Z step on the development set took 5.2-5.5 s instead of
    2.9 s.  Nothing changes for workers in other processes, nor for one block (its products keep every
    core).  The limit is set from the main thread only (`sae.blas.one_blas_thread`): a fit called in another
    thread relies on its caller's (the commands' train flow sets it: `flows.train.blas_for_training`).
    """
    import os

    if n_blocks < 2:
        yield
        return
    try:
        pids = client.run(os.getpid)
        threads = sum(info.get("nthreads", 0) for address, info in client.scheduler_info()["workers"].items()
                      if pids.get(address) == os.getpid())
    except Exception as error:  # e.g. a scheduler that refuses functions: BLAS left as it is
        logger.warning("could not tell whether the workers are threads of this process (%s): BLAS's threads left "
                       "as they are", error)
        threads = 0
    with one_blas_thread() if threads > 1 else _nothing():
        yield


# --------------------------------------------------------------------------- the backend


class ClusterBackend:
    """The `sae.outer.Backend` of a Dask cluster: codes are lists of block futures (module docstring)."""

    logger = logger

    def __init__(self, client: Any, X: Any, laplacian: Any, config: ModelConfig, block_size: int,
                 laplacian_norm: float | str, lookahead: int, offload_previous: bool = False,
                 tuning: Tuning | None = None, memory_check: str | None = "refuse", order: str = "stored") -> None:
        # what the workers can give, before this training puts anything on them
        budgets = worker_budgets(client) if memory_check else {}
        self.client = client
        self.dtype = config.dtype
        self.n_samples, self.n_features = (int(s) for s in X.shape)
        self.bounds = block_bounds(self.n_samples, block_size)
        self.block_size = block_size
        self.lookahead = lookahead
        self.offload_previous = offload_previous
        self.tuning = tuning or Tuning()
        self.token = uuid.uuid4().hex[:8]
        self.reload: Callable[[], list] | None = None  # how to read the current codes again (from the store)
        self.checkpoint: zarr.Group | None = None
        self.checkpoint_final_only = False
        self.interrupt: Interrupt = go_on
        self.refresh_homes()
        # with the cluster order, shared once (`_share`): natural row -> block and row in it (`_maps_to_blocks`,
        # only when rows move to blocks), -> chunk and row in it, -> row in the blocks' order (and its copy here)
        self.to_blocks_maps: list | None = None
        self.to_chunks_maps: list | None = None
        self.relabel: Any = None
        self.relabel_local: np.ndarray | None = None
        self.ordering = self._order(X, config, order)
        chunks = [client.submit(read_block, *row_source(X, start, stop), self.dtype, key=f"sae-X-{self.token}-{b}",
                                **({} if not self.ordering.identity else self._home(b)))
                  for b, (start, stop) in enumerate(self.bounds)]
        self.X_blocks = (chunks if self.ordering.identity
                         else self._to_blocks(chunks, self.n_features, None, f"sae-Xb-{self.token}"))
        self.graph = None
        self.laplacian_norm = None
        check_laplacian(laplacian, self.n_samples, config.lambda_g)
        self.plans = [BlockPlan(rows=stop - start) for start, stop in self.bounds]
        self.guard: MemoryGuard | None = None
        # the memory check, as soon as the blocks' halos are known (before the rows of L move, when they move)
        self.check_memory = (partial(self._check_memory, config, budgets, memory_check, lookahead)
                             if memory_check else None)
        if config.lambda_g > 0:
            self._setup_graph(laplacian, laplacian_norm)
        if self.check_memory is not None and self.guard is None:
            self.check_memory(self.plans)

    def _check_memory(self, config: ModelConfig, budgets: dict, memory_check: str, lookahead: int,
                      plans: list[BlockPlan]) -> None:
        """Estimate the training's memory per worker from the blocks' ``plans``; with the graph term, take
        lookahead 1, then the offloaded previous iterates, if only they fit (`fitting_plan`); refuse (or warn) if
        nothing does (`sae.distributed.budget`); then watch the workers (`MemoryGuard`)."""
        what = f"the training ({self.n_samples} frames, m = {config.n_atoms}, {len(self.bounds)} blocks)"

        def estimate_at(ahead: int, offload: bool) -> dict[str, dict[str, int]]:
            return training_estimate(
                plans, self.homes, n_features=self.n_features, n_atoms=config.n_atoms,
                itemsize=np.dtype(self.dtype).itemsize, encoder=config.lambda_e > 0,
                graph=config.lambda_g > 0, lookahead=ahead, offload_previous=offload,
                nthreads={w: b.nthreads for w, b in budgets.items()})

        if config.lambda_g > 0:
            self.lookahead, self.offload_previous, estimate = fitting_plan(estimate_at, budgets, lookahead,
                                                                           self.offload_previous, what)
        else:  # the Z step without graph term submits no iteration ahead and keeps no previous iterate
            estimate = estimate_at(lookahead, False)
        # a refusal's remedies leave out lookahead 1 and offloading: fitting_plan has tried them, or they do nothing
        check_estimate(estimate, budgets, what, refuse=memory_check == "refuse", lookahead=1, offload=True)
        self.guard = MemoryGuard(self.client, budgets, estimate, refuse=memory_check == "refuse")

    # -- the order of the frames in the blocks (sae.distributed.order)
    def _order(self, X: Any, config: ModelConfig, order: str) -> Ordering:
        if order not in ("stored", "cluster"):
            raise ValueError(f"order must be 'stored' or 'cluster', got {order!r}")
        if order == "stored" or config.lambda_g == 0 or len(self.bounds) < 2:
            return Ordering(self.n_samples, self.block_size)
        started = time.perf_counter()
        ordering = Ordering(self.n_samples, self.block_size,
                            cluster_order(X, len(self.bounds), random_state=config.random_state))
        logger.info("frames ordered by k-means cluster for %d blocks in %.1f s", len(self.bounds),
                    time.perf_counter() - started)
        self.to_chunks_maps = [self._share(m, f"chunkmap{i}") for i, m in enumerate(ordering.chunk_maps())]
        self.relabel_local = ordering.relabel()
        self.relabel = self._share(self.relabel_local, "relabel")
        return ordering

    def _share(self, value: np.ndarray, name: str) -> Any:
        """Future of ``value`` (an index map) on the cluster, made by a task the scheduler can run again.

        Not `client.scatter`: scattered data has no task that makes it, and the
        active memory manager of distributed drops a broadcast's extra copies,
        so a lost worker could take the only one, and with it every task that
        needs it, past or future (the Z step then fails: 'already forgotten').
        """
        return self.client.submit(_value, value, key=f"sae-{name}-{self.token}", pure=False)

    def _maps_to_blocks(self) -> list:
        """Futures of natural row -> its block and its row in the block (shared once)."""
        if self.to_blocks_maps is None:
            self.to_blocks_maps = [self._share(self.ordering.block_of, "blockof"),
                                   self._share(self.ordering.position, "position")]
        return self.to_blocks_maps

    def _to_blocks(self, chunks: list, n_cols: int, density: float | None, key: str, relabel: Any = None) -> list:
        """Futures of the blocks' rows from futures of the natural chunks' (`move_rows`; ``relabel``: sparse rows
        of L, their columns renumbered)."""
        return move_rows(self.client, chunks, [np.arange(start, stop) for start, stop in self.bounds],
                         self.ordering.members, self.ordering.block_of, self._maps_to_blocks(), n_cols,
                         self.dtype, density=density, key=key, home=self._home, relabel=relabel)

    def _to_chunks(self, blocks: list, n_cols: int, key: str) -> list:
        """Futures of the natural chunks' rows (dense) from futures of the blocks' (`move_rows`)."""
        return move_rows(self.client, blocks, self.ordering.members,
                         [np.arange(start, stop) for start, stop in self.bounds], self.ordering.chunk_maps()[0],
                         self.to_chunks_maps, n_cols, self.dtype, density=None, key=key)

    # -- graph
    def _setup_graph(self, laplacian: Any, laplacian_norm: float | str) -> None:
        client, bounds = self.client, self.bounds
        if sp.issparse(laplacian):
            laplacian = sp.csr_array(laplacian)
        self.graph = []
        row_blocks = []  # released after the norm: only the split blocks stay for the training
        moved = None
        if not self.ordering.identity and isinstance(laplacian, LaplacianRef):  # read by chunks, moved to blocks
            chunks = [client.submit(read_laplacian_rows, laplacian, start, stop, self.dtype,
                                    key=f"sae-Lchunk-{self.token}-{j}") for j, (start, stop) in enumerate(bounds)]
            if self.check_memory is not None:  # now: moving the rows takes minutes at scale
                self.check_memory(self._halo_preview(chunks))
            moved = self._to_blocks(chunks, self.n_samples, None, f"sae-Lrows-{self.token}", relabel=self.relabel)
            del chunks
        for b, (start, stop) in enumerate(bounds):
            if self.ordering.identity:
                rows = client.submit(read_laplacian_rows, *row_source(laplacian, start, stop), self.dtype,
                                     key=f"sae-Lrows-{self.token}-{b}", **self._home(b))
            elif moved is not None:
                rows = moved[b]
            else:  # in memory: the block's rows travel inside the task graph (small problems only)
                block = laplacian_rows(laplacian, self.ordering.members[b], self.relabel_local, self.dtype)
                rows = client.submit(read_laplacian_rows, block, None, None, self.dtype,
                                     key=f"sae-Lrows-{self.token}-{b}", **self._home(b))
            row_blocks.append(rows)
            self.graph.append(client.submit(graph_block, rows, bounds, b, key=f"sae-graph-{self.token}-{b}",
                                            **self._home(b)))
        info = client.gather([client.submit(graph_summary, g) for g in self.graph])
        self.neighbours = [summary["neighbours"] for summary in info]
        self.plans = [BlockPlan(rows=stop - start, graph_nnz=summary["nnz"], requests=summary["requests"])
                      for (start, stop), summary in zip(bounds, info)]
        logger.info("halo: %d rows received per iteration in all (median block %d, largest %d) for %d frames",
                    sum(p.halo_rows for p in self.plans), int(np.median([p.halo_rows for p in self.plans])),
                    max(p.halo_rows for p in self.plans), self.n_samples)
        # send_plans[c] = {b: indices of block c's rows that b needs}, built on the workers
        requests = {
            (b, c): client.submit(graph_request, self.graph[b], c, key=f"sae-request-{self.token}-{b}-{c}")
            for b in range(len(bounds)) for c in self.neighbours[b]
        }
        self.send_plans = []
        for c in range(len(bounds)):
            receivers = [b for b in range(len(bounds)) if c in self.neighbours[b]]
            self.send_plans.append(client.submit(send_plan, receivers, [requests[b, c] for b in receivers],
                                                 key=f"sae-plan-{self.token}-{c}"))
        if isinstance(laplacian_norm, (int, float)):
            self.laplacian_norm = float(laplacian_norm)
        elif laplacian_norm == "bound":
            self.laplacian_norm = laplacian_norm_bound(max(summary["bound"] for summary in info),
                                                       getattr(laplacian, "kind", None))
        elif laplacian_norm == "power":
            self.laplacian_norm = client.submit(laplacian_power_norm, *row_blocks).result()
        else:
            raise ValueError(f"laplacian_norm must be 'power', 'bound' or a number, got {laplacian_norm!r}")
        logger.info("||L||_2 = %.6g (%s) over %d blocks", self.laplacian_norm, laplacian_norm, len(bounds))

    def _halo_preview(self, chunks: list) -> list[BlockPlan]:
        """The blocks' plans (`BlockPlan`) from the natural chunks of ``L``, before any row moves (`halo_wants`)."""
        client, block_of = self.client, self._maps_to_blocks()[0]
        parts = [client.submit(halo_wants, chunk, start, block_of, key=f"sae-halowants-{self.token}-{j}")
                 for j, (chunk, (start, _)) in enumerate(zip(chunks, self.bounds))]
        summary = client.submit(halo_plans, len(self.bounds), *parts, key=f"sae-haloplans-{self.token}").result()
        return [BlockPlan(rows=stop - start, graph_nnz=nnz, requests=requests)
                for (start, stop), (nnz, requests) in zip(self.bounds, summary)]

    def refresh_homes(self) -> None:
        """Give every block a home worker (block b -> worker b mod W, workers sorted by address)."""
        workers = sorted(self.client.scheduler_info().get("workers", {}))
        self.homes = [workers[b % len(workers)] if workers else None for b in range(len(self.bounds))]

    def _home(self, b: int) -> dict[str, Any]:
        """``submit`` keywords that run block ``b``'s task on its home worker if it is alive, else anywhere."""
        home = self.homes[b]
        return {} if home is None else {"workers": [home], "allow_other_workers": True}

    # -- the outer loop's backend (C and E are small: they travel inside the task specifications, so that a
    #    task lost with its worker can be recomputed; scattered data would be lost with it)
    def code_step(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, config: ModelConfig,
                  outer: int) -> tuple[list, dict[str, Any]]:
        """The Z step from the code blocks ``Z_blocks`` (futures); returns the new blocks and the step's record.

        With `reload` (how to read the blocks again from the store), the global
        FISTA holds the starting codes, a whole generation, only until its
        first iteration is submitted, and reads them again only if the start
        turns out better than the last iterate.
        """
        self.interrupt(f"outer iteration {outer}, Z step")
        self.refresh_homes()  # workers may have come or gone since the last step
        reload, self.reload = self.reload, None  # the new codes are only in memory until a checkpoint
        if self.graph is None:
            return self._independent_code_step(Z_blocks, C, E, config, outer)
        client = self.client
        tag = f"{self.token}-{outer}"
        params = {"lambda_d": config.lambda_d, "lambda_z": config.lambda_z, "lambda_g": config.lambda_g,
                  "lambda_e": config.lambda_e, "offload_previous": self.offload_previous, "tuning": self.tuning,
                  "step": 1.0 / code_lipschitz(C, lambda_d=config.lambda_d, lambda_e=config.lambda_e,
                                               lambda_g=config.lambda_g, laplacian_norm=self.laplacian_norm)}
        problems = [
            client.submit(code_problem, b, X, C, E, g, params, key=f"sae-zproblem-{tag}-{b}", **self._home(b))
            for b, (X, g) in enumerate(zip(self.X_blocks, self.graph))
        ]
        states = [client.submit(CodeState, Z, key=f"sae-zstate-{tag}-0-{b}", **self._home(b))
                  for b, Z in enumerate(Z_blocks)]
        start = list(Z_blocks) if reload is None else None
        Z_blocks.clear()  # the client lets go of the starting codes (held by the states while needed)
        final, step = block_fista(client, self._home, problems, states, self.neighbours, self.send_plans, config,
                                  tag=tag, outer=outer, lookahead=self.lookahead,
                                  progress_seconds=self.tuning.progress_seconds, n_codes=self.n_samples * C.shape[0],
                                  guard=self.guard, local_states=not self.offload_previous, interrupt=self.interrupt)
        if final is None:  # the start is better than the last iterate
            return (start if reload is None else reload()), step
        return [client.submit(state_solution, s, key=f"sae-Z-{tag}-{b}", **self._home(b))
                for b, s in enumerate(final)], step

    def _independent_code_step(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, config: ModelConfig,
                               outer: int) -> tuple[list, dict[str, Any]]:
        client = self.client
        options = code_step_options(config)
        stop_event = f"sae-zstop-{self.token}-{outer}"
        results = [
            client.submit(solve_block_codes, X, C, E, Z, options, self.tuning.sparse_density, stop_event,
                          key=f"sae-zsolve-{self.token}-{outer}-{b}", **self._home(b))
            for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))
        ]
        new_blocks = [client.submit(itemgetter(0), r, key=f"sae-Z-{self.token}-{outer}-{b}", **self._home(b))
                      for b, r in enumerate(results)]
        self._wait_reporting(results, outer, stop_event)
        infos = client.gather([client.submit(itemgetter(1), r) for r in results])
        n_iter = max(info["n_iter"] for info in infos)
        reasons = sorted({info["stop_reason"] for info in infos})
        return new_blocks, {"n_iter": n_iter, "stop_reason": "+".join(reasons), "graph": float("nan")}

    def _wait_reporting(self, blocks: list, outer: int, stop_event: str) -> None:
        """Wait for the per-block tasks of a Z step without graph term, logging how many blocks are coded every
        ``tuning.progress_seconds`` and when all are (coordinate descent has no iterations to report, and a step
        can take minutes), under the memory guard and the `interrupt`.  When either raises, the blocks not
        started yet are cancelled and the step's ``stop_event`` is set, which the running blocks of coordinate
        descent look at between batches of frames (`solve_block_codes`): a stopped run leaves nothing running."""
        where = f"outer iteration {outer}, Z step"
        period = self.tuning.progress_seconds
        start = reported = time.perf_counter()

        def look() -> None:
            nonlocal reported
            done = sum(future.done() for future in blocks)
            self.interrupt(f"{where} ({done} of {len(blocks)} blocks coded)")
            if self.guard is not None:
                self.guard.check(where)
            now = time.perf_counter()
            if now - reported >= period:
                reported = now
                logger.info("outer %d, Z step: %d of %d blocks coded, %.0f s", outer, done, len(blocks), now - start)

        seconds = period if self.guard is None else min(period, self.guard.seconds)
        try:
            wait_watching(blocks, max(seconds, MIN_WAIT_SECONDS), look)
        except BaseException:
            self.client.cancel(blocks)
            from distributed import Event

            with suppress(Exception):  # a scheduler gone cannot be told, nor can it run anything
                Event(stop_event, client=self.client).set()
            raise
        logger.info("outer %d, Z step: %d of %d blocks coded, %.0f s", outer, len(blocks), len(blocks),
                    time.perf_counter() - start)

    def statistics(self, Z_blocks: list) -> dict[str, Any]:
        stats = self.client.gather([self.client.submit(block_statistics, X, Z, **self._home(b))
                                    for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))])
        out: dict[str, Any] = {name: self._sum_matrices(stats, name) for name in ("ZtZ", "ZtX")}
        for name in ("Z_sq", "l1"):
            out[name] = math.fsum(s[name] for s in stats)
        out["nnz"] = sum(s["nnz"] for s in stats)
        return out

    def _sum_matrices(self, parts: list[dict[str, Any]], name: str) -> np.ndarray:
        """The blocks' ``name`` matrices summed in block order, in float64, then in the fit's dtype."""
        total = np.zeros(parts[0][name].shape, dtype=np.float64)
        for part in parts:
            total += part[name]
        return total.astype(self.dtype)

    def data_statistics(self) -> dict[str, Any]:
        stats = self.client.gather([self.client.submit(block_data_statistics, X) for X in self.X_blocks])
        return {"XtX": self._sum_matrices(stats, "XtX"), "X_sq": math.fsum(s["X_sq"] for s in stats)}

    def terms(self, Z_blocks: list, C: np.ndarray, E: np.ndarray | None, step: dict[str, Any] | None,
              statistics: dict[str, Any] | None) -> dict[str, Any]:
        parts = self.client.gather(
            [self.client.submit(block_residuals, X, Z, C, E, **self._home(b))
             for b, (X, Z) in enumerate(zip(self.X_blocks, Z_blocks))]
        )
        out = {name: math.fsum(p[name] for p in parts) for name in ("reconstruction", "encoder")}
        if step is None:  # the start: all-zero codes
            out.update(sparsity=0.0, graph=0.0 if self.graph is not None else float("nan"), nnz=0)
        else:
            out.update(sparsity=statistics["l1"], graph=step["graph"] if self.graph is not None else float("nan"),
                       nnz=statistics["nnz"])
        return out

    def save(self, iteration: int, Z_blocks: list, C: np.ndarray, E: np.ndarray | None,
             history: list[dict[str, Any]], stop_reason: str) -> list:
        """Write the checkpoint of ``iteration`` (module :mod:`sae.distributed.checkpoints`) and read the codes
        back from it (which cuts the task lineage), unless it is the last; without checkpoint, nothing."""
        last = bool(stop_reason)
        if self.checkpoint is None or not (last or not self.checkpoint_final_only):
            return Z_blocks
        self.interrupt(f"outer iteration {iteration}, before its checkpoint")
        slot = iteration % 2
        if self.checkpoint.attrs.get("last_complete_outer") is not None and \
                self.checkpoint.attrs.get("checkpoint_slot") == slot:
            slot = 1 - slot  # never into the slot of the last complete checkpoint (a fit started again)
        target = checkpoint_slot(self.checkpoint, slot, self.n_samples, C.shape[0], self.n_features, self.block_size,
                                 self.dtype, E is not None)
        # the codes of the blocks in their order while the training goes on (no rows move; the slot records
        # which frame each row holds), in the frames' order at the end (module sae.distributed.checkpoints)
        in_blocks = not self.ordering.identity and not last
        frame_of_row = np.concatenate(self.ordering.members) if in_blocks else None
        write_frame_of_row(target, frame_of_row)
        self.write_codes(target["codes"], Z_blocks, in_blocks=in_blocks)
        target["components"][...] = C
        if E is not None:
            target["encoder"][...] = E
        self.interrupt(f"outer iteration {iteration}, its checkpoint written, before it is recorded")
        self.checkpoint.attrs.update({"history": json_safe(history), "stop_reason": stop_reason,
                                      "checkpoint_slot": slot, "last_complete_outer": iteration})
        self.reload = partial(self.read_codes, target["codes"], iteration, frame_of_row)
        return Z_blocks if last else self.reload()  # after the last iteration nothing reads them

    # -- code blocks
    def zero_codes(self, n_atoms: int) -> list:
        return [
            self.client.submit(zeros, stop - start, n_atoms, self.dtype, key=f"sae-Z0-{self.token}-{b}",
                               **self._home(b))
            for b, (start, stop) in enumerate(self.bounds)
        ]

    def read_codes(self, array: zarr.Array, outer: int, frame_of_row: np.ndarray | None = None) -> list:
        """Futures of the code blocks from stored codes whose row i holds frame ``frame_of_row[i]`` (None: frame i).

        When the stored chunks are the blocks (same frames, same order) each
        block reads its chunk; otherwise the rows move from chunks to blocks.
        """
        stored = np.arange(self.n_samples) if frame_of_row is None else np.asarray(frame_of_row)
        if not np.array_equal(stored, np.concatenate(self.ordering.members)):
            chunks = [self.client.submit(read_block, array, start, stop, self.dtype,
                                         key=f"sae-Zchunk-{self.token}-{outer}-{j}")
                      for j, (start, stop) in enumerate(self.bounds)]
            return move_rows(self.client, chunks, [stored[start:stop] for start, stop in self.bounds],
                             self.ordering.members, self.ordering.block_of, self._maps_to_blocks(),
                             int(array.shape[1]), self.dtype, density=self.tuning.sparse_density,
                             key=f"sae-Zread-{self.token}-{outer}", home=self._home)
        return [
            self.client.submit(read_code_block, array, start, stop, self.dtype, self.tuning.sparse_density,
                               key=f"sae-Zread-{self.token}-{outer}-{b}", **self._home(b))
            for b, (start, stop) in enumerate(self.bounds)
        ]

    def write_codes(self, array: zarr.Array, Z_blocks: list, in_blocks: bool = False) -> None:
        """Write the code blocks to the stored codes, one chunk per task (no lock): in the frames' order, or with
        ``in_blocks`` block b to chunk b (the blocks' order)."""
        if self.ordering.identity or in_blocks:
            written = [
                self.client.submit(write_block, array, start, stop, Z, pure=False, **self._home(b))
                for b, ((start, stop), Z) in enumerate(zip(self.bounds, Z_blocks))
            ]
        else:
            chunks = self._to_chunks(Z_blocks, int(array.shape[1]), f"sae-Zwrite-{uuid.uuid4().hex[:8]}")
            written = [self.client.submit(write_block, array, start, stop, chunk, pure=False)
                       for (start, stop), chunk in zip(self.bounds, chunks)]
        self.client.gather(written)

    def gather_codes(self, Z_blocks: list) -> np.ndarray:
        blocks = [densify(Z) for Z in self.client.gather(Z_blocks)]
        if self.ordering.identity:
            return np.concatenate(blocks, axis=0)
        out = np.empty((self.n_samples, blocks[0].shape[1]), dtype=blocks[0].dtype)
        for rows, block in zip(self.ordering.members, blocks):
            out[rows] = block
        return out


# --------------------------------------------------------------------------- the fit


def _value(value: Any) -> Any:
    """The task behind `ClusterBackend._share`: its argument, kept in the task's specification."""
    return value


def fit_distributed(
    X: Any,
    config: ModelConfig,
    *,
    client: Any,
    laplacian: Any = None,
    block_size: int = 50_000,
    laplacian_norm: float | Literal["power", "bound"] = "power",
    lookahead: int = 2,
    offload_previous: bool = False,
    memory_check: Literal["refuse", "warn"] | None = "refuse",
    order: Literal["cluster", "stored"] = "cluster",
    checkpoint: zarr.Group | None = None,
    checkpoint_final_only: bool = False,
    return_codes: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    tuning: Tuning | None = None,
    interrupt: Interrupt = go_on,
) -> DistributedFit:
    """Fit the structured auto-encoder on a Dask cluster, block by block (see :mod:`sae.distributed`).

    The outer loop, initialisation (``np.random.default_rng(config.random_state)``:
    components then encoder, ``Z = 0``), sub-problems, stopping rules and
    history of :func:`sae.model.fit_sae` (:func:`sae.outer.alternate`).

    Parameters
    ----------
    X : zarr.Array or ndarray (N, n)
        The frames.  A Zarr array is read block by block on the workers (and
        re-read if a worker is lost); an ndarray is cut on the client and
        its blocks travel inside the task graph (small problems only).
    config : ModelConfig
    client : distributed.Client
    laplacian : scipy sparse (N, N), LaplacianRef or None
        Required when ``config.lambda_g > 0``; a ``LaplacianRef`` is read by
        row blocks on the workers.
    block_size : int
        Frames per block (the last block may be shorter); also the chunk of the
        stored codes.
    laplacian_norm : "power", "bound" or float
        How ``||L||_2`` is obtained for the Z step's step size: the power
        iteration of :func:`sae.solvers.spectral_norm` in one task on the
        stacked row blocks (as the in-memory fit), an upper bound from per-block
        scalars (:func:`sae.graph.laplacian_norm_bound`: Gershgorin's
        ``max_i sum_j |L_ij|``, capped at 2 for a `LaplacianRef` of kind
        "normalized"; a smaller step), or its value.
    lookahead : int
        Z-step iterations submitted ahead of the stopping test.
    offload_previous : bool
        Keep each dense block's previous iterate ``x_{k-1}``, ``x_{k-1} C`` and
        ``x_k C`` in a file of its worker (:mod:`sae.distributed.offload`)
        instead of its memory: one generation of iterates in memory, not two.
        Same iterates, to the bit.
    memory_check : "refuse", "warn" or None
        Estimate what each worker will hold and compare it with what it can
        give before Dask spills or pauses (:mod:`sae.distributed.budget`);
        watch the workers' memory during the Z steps.  "refuse": raise
        `sae.distributed.budget.TrainingDoesNotFit` before training when the
        estimate exceeds it, and during training as soon as a worker nears its
        threshold, spills or pauses; "warn": log instead; None: neither.
    order : "cluster" or "stored"
        The order of the frames in the blocks of a Z step with the graph term
        (:mod:`sae.distributed.order`): "cluster" groups them by k-means
        cluster, so that most of a frame's neighbours are in its block (a
        smaller halo); "stored" keeps the store's order.  The codes are
        stored in the store's order either way.
    checkpoint : zarr.Group, optional
        A ``model/<key>`` group: a checkpoint is written after every outer
        iteration and the fit resumes from the last complete one found there.
    checkpoint_final_only : bool
        Write only the checkpoint of the last outer iteration (the result);
        an interrupted fit then starts again from the beginning.
    return_codes : bool
        Without checkpoint, gather the codes into :attr:`DistributedFit.codes`.
    callback : callable, optional
        Called with each outer iteration's history record.
    tuning : Tuning, optional
        How the tasks run (tile, sparse density, array pool, work stealing,
        progress log); never what they compute.
    interrupt : callable
        `sae.progress.Interrupt`, called on the client at the start of every Z
        step, after every Z-step iteration, before every checkpoint is
        written and before it is recorded as the last complete one; it raises
        to stop the training there (e.g. ``flows._dask.RunGone``: the run
        that started it is gone), the last complete checkpoint staying as it was.

    Returns
    -------
    DistributedFit
    """
    tuning = tuning or Tuning()
    if tuning.array_pool:
        try:
            client.run(start_pool_trimming)
        except Exception as error:  # only memory is at stake: the pool is also trimmed by the tasks
            logger.warning("could not start the workers' pool trimming (%s)", error)
    try:
        with without_work_stealing(client) if tuning.pause_work_stealing else _nothing(), \
                one_blas_thread_per_task(client, _n_blocks(X, block_size)):
            return _fit_distributed(X, config, client, laplacian, block_size, laplacian_norm, lookahead,
                                    offload_previous, checkpoint, checkpoint_final_only, return_codes, callback,
                                    tuning, memory_check, order, interrupt)
    finally:
        try:
            if tuning.array_pool:
                client.run(release_pool)
        except Exception:  # the cluster is gone: nothing to release
            logger.debug("could not release the workers' pooled arrays", exc_info=True)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _n_blocks(X: Any, block_size: Any) -> int:
    """How many blocks a training of ``X`` cuts (0 for arguments the training refuses with its own message)."""
    shape = getattr(X, "shape", ())
    if len(shape) != 2 or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        return 0
    return len(block_bounds(int(shape[0]), int(block_size)))


def _fit_distributed(X: Any, config: ModelConfig, client: Any, laplacian: Any, block_size: int,
                     laplacian_norm: float | str, lookahead: int, offload_previous: bool,
                     checkpoint: zarr.Group | None, checkpoint_final_only: bool, return_codes: bool,
                     callback: Callable[[dict[str, Any]], None] | None, tuning: Tuning,
                     memory_check: str | None, order: str,
                     interrupt: Interrupt) -> DistributedFit:
    started = time.perf_counter()
    dtype = config.dtype
    if len(getattr(X, "shape", ())) != 2:
        raise ValueError(f"X must be a 2-D array (n_samples, n_features), got shape {getattr(X, 'shape', None)}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead!r}")
    if memory_check not in ("refuse", "warn", None):
        raise ValueError(f"memory_check must be 'refuse', 'warn' or None, got {memory_check!r}")
    backend = ClusterBackend(client, X, laplacian, config, block_size, laplacian_norm, lookahead, offload_previous,
                             tuning, memory_check, order)
    backend.checkpoint, backend.checkpoint_final_only = checkpoint, checkpoint_final_only
    backend.interrupt = interrupt
    m, use_encoder = config.n_atoms, config.lambda_e > 0
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None and any(record.get("online") for record in state["history"]) != (
        config.fit_method == "online"
    ):
        held = "an alternating" if config.fit_method == "online" else "an online"
        raise ValueError(f"the checkpoint group holds {held} fit and the configuration asks for "
                         f"fit_method={config.fit_method!r}: give another checkpoint group")
    if state is not None and config.fit_method == "online" and not training_done(
        state["history"], state["stop_reason"], config.max_outer
    ):
        logger.info("the online fit keeps no statistics in its checkpoints: it starts again (it ended at "
                    "iteration %d)", state["iteration"])
        state = None
    if state is not None:
        C = np.asarray(state["components"], dtype=dtype)
        E = np.asarray(state["encoder"], dtype=dtype) if use_encoder else None
        start_outer, history = state["iteration"], state["history"]
        logger.info("resuming from the checkpoint of outer iteration %d", start_outer)
        if training_done(history, state["stop_reason"], config.max_outer):
            codes = state["codes"]
            # a run stopped after this checkpoint, resumed with max_outer at most its iteration: its codes become
            # the final ones (in the frames' order), as the last iteration writes them
            if not state["stop_reason"]:
                backend.save(start_outer, backend.read_codes(codes, start_outer, state["frame_of_row"]), C, E, history,
                             "max_outer")
                codes = checkpoint[f"checkpoint_{int(checkpoint.attrs['checkpoint_slot'])}"]["codes"]
            return DistributedFit(components=C, encoder=E, codes=codes, history=history, n_iter=iterations_done(history),
                                  stop_reason=state["stop_reason"] or "max_outer", resumed_from=start_outer)
        backend.reload = partial(backend.read_codes, state["codes"], start_outer, state["frame_of_row"])
    else:
        rng = np.random.default_rng(config.random_state)
        C = initial_dictionary(X, config, rng, dtype)
        E = init_encoder(m, backend.n_features, rng=rng, dtype=dtype) if use_encoder else None
        start_outer, history = 0, None
        backend.reload = partial(backend.zero_codes, m)
    on_record = None if callback is None else (lambda fit_state: callback(fit_state.record))
    if config.fit_method == "online":  # the epochs read the frames here, block by block; the last Z step is the cluster's
        fit = fit_online(backend, lambda start, stop: np.asarray(X[start:stop], dtype=dtype), config, C, E,
                         backend.reload(), rng, callback=on_record, interrupt=interrupt)
    else:
        fit = alternate(backend, config, C, E, backend.reload(), history, callback=on_record)
    if checkpoint is not None:
        codes: Any = checkpoint[f"checkpoint_{int(checkpoint.attrs['checkpoint_slot'])}"]["codes"]
    elif return_codes:
        codes = backend.gather_codes(fit.codes)
    else:
        codes = None
    logger.info("trained in %.1f s: %d outer iterations (%s)", time.perf_counter() - started, fit.n_iter,
                fit.stop_reason)
    return DistributedFit(components=fit.components, encoder=fit.encoder, codes=codes, history=fit.history,
                          n_iter=fit.n_iter, stop_reason=fit.stop_reason, config=fit.config, resumed_from=start_outer)

