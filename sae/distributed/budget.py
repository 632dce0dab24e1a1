"""What a training holds in each worker's memory, and a guard that stops it before Dask spills or pauses.

**The estimate** (`training_estimate`) adds up, for each worker, the arrays
the training keeps for the blocks homed there (:mod:`sae.distributed.zstep`'s
module docstring lists them), with the codes counted dense (an upper bound:
a code block is stored as CSR only when that is smaller):

- the frames ``X_b`` and, with the encoder, ``X_b E^T``; the block's rows of ``L``;
- with the graph term, the iterates: the states of the ``lookahead``
  iterations the client holds, each sharing its ``x_k`` with the next one's
  ``x_{k-1}`` (``lookahead + 1`` generations), plus the iterate being written
  (one generation fewer with ``offload_previous``); the products ``x C`` alike;
- the halo packs: a block's pack for each other worker holds the rows its
  neighbours there want, and lives on both workers (a neighbour on the same
  worker reads the block's state itself, but with ``offload_previous``);
  packs live from the iteration that cuts them until the one after next reads
  them as ``x_{k-1}`` (``lookahead + 1`` generations);
- the halo rows stacked by each running block task (``x_k``'s and
  ``x_{k-1}``'s), one task per worker thread; when the states are CSR (at most
  `SPARSE_STATE_DENSITY` non-zero), each running task's densified ``x_k`` and
  ``x_{k-1}``, counted with the CSR iterates when those are more than the
  dense iterates; with
  ``offload_previous``, the previous iterates each running task reads back
  from its file and the next block's, read ahead. The pool's spare arrays
  (:mod:`sae.distributed.memory`) are not counted apart: they are the arrays
  the next iterates take (measured: a worker's pool of (N_b, m) arrays never
  held more than the generations counted);
- without the graph term: the codes before and after the step, and the
  solver's work arrays of each running task.

It leaves out Dask's own memory and the arrays a task makes and drops: the
worker's memory at the start of the training is taken off its budget instead.
Measured against the growth of each worker's memory (README, "Benchmarks"),
2 workers, m = 512, on kNN graphs of the built-in data: at 206,080 frames (8
blocks) the estimate is 37 % over it with ``lookahead=2`` (1.56 against 1.14
GiB: the fourth generation of iterates it counts was never seen alive), 5-7 %
with ``lookahead=1`` (1.10 against 1.02-1.05) and 10-13 % with
``offload_previous`` too (1.08 against 0.95-0.98); from the items, about 20 %
over at 1,288,000 frames (26 blocks, ``lookahead=1``: ~7.3 against ~6.1 GiB)
and 1 % under at 300,000 (6 blocks, ``lookahead=1``, ``offload_previous``: ~1.41
against 1.42-1.43), where the guard's margin takes over.

**The budget** of a worker (`worker_budgets`) is the memory it can give the
training before Dask acts: its memory limit times the lowest of Dask's
enabled thresholds (``distributed.worker.memory.target``, ``spill``,
``pause``; 60 % by default), less what the worker holds when the training
starts.  Past ``target`` Dask spills results to disk, past ``pause`` it runs
no task; block states that spill can stall the training (a fetch of spilled
results failed inside Dask's spill buffer and left an iteration waiting
forever), and a paused worker whose memory is held by the training never
resumes.

**The guard** (`MemoryGuard`) is polled by the training's loops: it raises
`TrainingDoesNotFit` as soon as a worker's memory passes its budget's
threshold, results are spilled or a worker pauses, instead of letting the
training stall or the system kill a worker.  The checkpoint of the last
complete outer iteration stays in the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sae.distributed.blocks import SPARSE_STATE_DENSITY

logger = logging.getLogger("sae.distributed")

__all__ = ["BlockPlan", "WorkerBudget", "TrainingDoesNotFit", "training_estimate", "worker_budgets",
           "check_estimate", "fitting_plan", "over_budget", "MemoryGuard"]

#: Seconds between two looks of the guard at the workers' memory (the scheduler hears from them every ~1 s).
GUARD_SECONDS = 1.0

#: The guard stops the training at this fraction of a worker's threshold (Dask acts at the threshold itself).
GUARD_MARGIN = 0.95

GIB = 2**30


class TrainingDoesNotFit(RuntimeError):
    """The training needs (or reached) more memory than the workers can give it before Dask spills or pauses."""


@dataclass(frozen=True)
class BlockPlan:
    """What one row block brings to the memory of its home worker.

    ``rows``: N_b; ``graph_nnz``: non-zeros of its rows of ``L`` (0 without the
    graph term); ``requests``: ``{c: rows of block c it receives per iteration}``.
    """

    rows: int
    graph_nnz: int = 0
    requests: Mapping[int, int] = field(default_factory=dict)

    @property
    def halo_rows(self) -> int:
        return sum(self.requests.values())


@dataclass(frozen=True)
class WorkerBudget:
    """A worker's memory limit, the threshold at which Dask acts, and what it held at the start.

    ``threshold`` names the lowest enabled threshold (``target``, ``spill`` or
    ``pause``; ``"limit"`` when none is enabled; ``"memory"`` when the worker
    has no limit and the machine's memory is shared among the workers on it);
    ``fraction`` is its value (1 for the last two).
    """

    limit: int
    fraction: float
    threshold: str
    start: int
    nthreads: int = 1

    @property
    def available(self) -> int:
        """Bytes the training may hold on this worker."""
        return max(int(self.limit * self.fraction) - self.start, 0)


def training_estimate(
    blocks: Sequence[BlockPlan],
    homes: Sequence[str | None],
    *,
    n_features: int,
    n_atoms: int,
    itemsize: int,
    encoder: bool,
    graph: bool,
    lookahead: int,
    offload_previous: bool = False,
    nthreads: Mapping[str, int] | None = None,
) -> dict[str, dict[str, int]]:
    """Bytes the training holds on each worker, by item (module docstring); ``homes[b]``: block b's worker."""
    out: dict[str, dict[str, int]] = {}
    code_row, frame_row = n_atoms * itemsize, n_features * itemsize
    generations = lookahead + 1
    iterate_copies = generations + (0 if offload_previous else 1)
    for worker in sorted({h for h in homes if h is not None}):
        mine = [b for b, h in enumerate(homes) if h == worker]
        rows = sum(blocks[b].rows for b in mine)
        threads = max((nthreads or {}).get(worker, 1), 1)
        largest = sorted((blocks[b].rows for b in mine), reverse=True)[:threads]
        items = {"frames X": rows * frame_row}
        if encoder:
            items["encoder targets X E^T"] = rows * code_row
        if graph:
            # CSR: the values, an int32 column index each, and the own and halo parts' row pointers
            items["rows of L"] = sum(blocks[b].graph_nnz * (itemsize + 4) + 8 * (blocks[b].rows + 1) for b in mine)
            # dense, or CSR (<= SPARSE_STATE_DENSITY non-zeros, a column index each) with the running tasks'
            # x_k and x_{k-1} densified: whichever is larger
            dense = iterate_copies * rows * code_row
            compact = int(dense * SPARSE_STATE_DENSITY * (itemsize + 4) / itemsize) + 2 * sum(largest) * code_row
            items["code iterates"] = max(dense, compact)
            items["products x C"] = (iterate_copies if not offload_previous else 1) * rows * frame_row
            # packs cut for the receivers on each worker: those of its blocks for the other workers (and for
            # its own, with offload_previous), and those of the other workers' blocks for its blocks
            own = set(mine)
            pack_rows = sum(wanted for b, plan in enumerate(blocks) for c, wanted in plan.requests.items()
                            if (c in own and (b not in own or offload_previous)) or (c not in own and b in own))
            items["halo packs"] = generations * pack_rows * code_row
            items["halo rows of the running tasks"] = 2 * sum(
                sorted((blocks[b].halo_rows for b in mine), reverse=True)[:threads]) * code_row
            if offload_previous:  # x_{k-1}, x_{k-1} C and x_k C read back by each running task, and the next
                items["previous iterates read back"] = 2 * sum(largest) * (code_row + 2 * frame_row)  # read ahead
        else:
            items["codes before and after the step"] = 2 * rows * code_row
            # coordinate descent or FISTA on one block: a few (N_b, m) work arrays per running task
            items["work arrays of the running tasks"] = 3 * sum(largest) * code_row
        out[worker] = items
    return out


def worker_budgets(client: Any) -> dict[str, WorkerBudget]:
    """Each worker's `WorkerBudget`, asked of the workers (their Dask memory configuration and memory now)."""
    found = client.run(_worker_memory)
    counts: dict[str, int] = {}
    for address in found:
        host = address.rsplit(":", 1)[0]
        counts[host] = counts.get(host, 0) + 1
    budgets = {}
    for address, (limit, fractions, memory, machine, nthreads) in found.items():
        enabled = {name: value for name, value in fractions.items() if value}
        if limit and enabled:
            threshold = min(enabled, key=enabled.get)
            budgets[address] = WorkerBudget(int(limit), float(enabled[threshold]), threshold, int(memory), nthreads)
        elif limit:  # no threshold enabled: the nanny still kills the worker at its limit
            budgets[address] = WorkerBudget(int(limit), 1.0, "limit", int(memory), nthreads)
        else:  # no limit: the machine's memory, shared by the workers on it
            share = machine // counts[address.rsplit(":", 1)[0]]
            budgets[address] = WorkerBudget(share, 1.0, "memory", int(memory), nthreads)
    return budgets


def _worker_memory(dask_worker: Any) -> tuple[int, dict[str, float | bool], int, int, int]:
    """On a worker: its memory limit, thresholds, process memory, the machine's memory and its threads."""
    import psutil

    manager = dask_worker.memory_manager
    fractions = {"target": manager.memory_target_fraction, "spill": manager.memory_spill_fraction,
                 "pause": manager.memory_pause_fraction}
    return (manager.memory_limit or 0, fractions, psutil.Process().memory_info().rss,
            psutil.virtual_memory().total, dask_worker.state.nthreads)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _itemised(items: Mapping[str, int]) -> str:
    """The items of at least 1 % of the total, largest first."""
    total = sum(items.values())
    return ", ".join(f"{name} {_gib(size)}" for name, size in sorted(items.items(), key=lambda kv: -kv[1])
                     if size >= 0.01 * total)


def remedies(lookahead: int | None = None, offload: bool = False) -> str:
    """The ways to make a training fit, but those already taken: lookahead 1, previous iterates offloaded."""
    return ("Ways to fit: more workers or memory per worker (deploy/cluster.py --memory-limit), "
            + ("" if lookahead == 1 else "train.lookahead=1 (one generation of iterates and halo packs fewer), ")
            + ("" if offload else "train.offload_previous=true (the previous iterates on the workers' disks), ")
            + "fewer atoms (train.model.n_atoms), or no graph term (train.model.lambda_g=0).")


REMEDIES = remedies()


def over_budget(estimate: Mapping[str, Mapping[str, int]],
                budgets: Mapping[str, WorkerBudget]) -> list[tuple[str, int, WorkerBudget, Mapping[str, int]]]:
    """The workers whose estimate exceeds what their budget makes available: (worker, bytes, budget, items)."""
    over = []
    for worker, items in estimate.items():
        total, budget = sum(items.values()), budgets.get(worker)
        if budget is not None and total > budget.available:
            over.append((worker, total, budget, items))
    return over


def fitting_plan(estimate_at: Callable[[int, bool], dict[str, dict[str, int]]],
                 budgets: Mapping[str, WorkerBudget], lookahead: int, offload: bool,
                 what: str) -> tuple[int, bool, dict[str, dict[str, int]]]:
    """The lookahead and ``offload_previous`` to train with, and their estimate (``estimate_at(lookahead,
    offload)``): as given if they fit, else lookahead 1, else lookahead 1 with the previous iterates offloaded;
    the one that misses by the least when none fits.

    Each compute the same iterates: fewer iterations submitted ahead of the
    stopping test hold a generation of iterates (and halo packs) fewer, the
    workers only waiting longer for the client between iterations; offloaded
    previous iterates are written to the workers' disks and read back, to the
    bit (~20 % slower).
    """
    tries = [(lookahead, offload)] + ([(1, offload)] if lookahead != 1 else []) + ([(1, True)] if not offload else [])
    estimates = {}
    for ahead, off in tries:
        estimates[ahead, off] = estimate = estimate_at(ahead, off)
        if not over_budget(estimate, budgets):
            break
    else:  # none fits: the one that misses by the least (offloading costs read-back buffers: not always less)
        ahead, off = min(estimates, key=lambda plan: max(o[1] - o[2].available for o in over_budget(
            estimates[plan], budgets)))
        estimate = estimates[ahead, off]
    if (ahead, off) != (lookahead, offload):
        taken = ([f"train.lookahead = 1 instead of {lookahead}"] if ahead != lookahead else []) + (
            ["train.offload_previous = true (the previous iterates on the workers' disks)"] if off != offload else [])
        logger.warning("%s: %s, %s (the same result; %s)", what, " and ".join(taken),
                       "so that it fits in the workers' memory" if not over_budget(estimate, budgets)
                       else "the least memory it can take",
                       "slower" if off != offload else "the workers wait for the client between iterations")
    return ahead, off, estimate


def check_estimate(estimate: Mapping[str, Mapping[str, int]], budgets: Mapping[str, WorkerBudget],
                   what: str, refuse: bool = True, lookahead: int | None = None, offload: bool = False) -> None:
    """Log the estimate; when a worker's exceeds what its budget makes available, raise `TrainingDoesNotFit`
    (``refuse``) or log a warning (``lookahead``, ``offload``: the estimate's, to leave out of the remedies
    what is taken already)."""
    for worker, items in estimate.items():
        budget = budgets.get(worker)
        logger.info("%s: at most %s on worker %s (%s)%s", what, _gib(sum(items.values())), worker,
                    _itemised(items), "" if budget is None else f"; it can give {_gib(budget.available)}")
    over = over_budget(estimate, budgets)
    if over and not refuse:
        logger.warning("%s may not fit in the workers' memory: %s (train.memory_check=warn: going on)", what,
                       "; ".join(f"worker {w} up to {_gib(t)} for {_gib(b.available)}" for w, t, b, _ in over))
    elif over:
        worker, total, budget, items = max(over, key=lambda o: o[1] - o[2].available)
        raise TrainingDoesNotFit(
            f"{what} does not fit in the workers' memory: worker {worker} would hold up to {_gib(total)} "
            f"({_itemised(items)}), and it can give {_gib(budget.available)} before Dask acts "
            f"({_threshold_text(budget)}, less the {_gib(budget.start)} it holds already). "
            f"Nothing was trained. {remedies(lookahead, offload)} "
            f"To try anyway (Dask may then spill block states or pause the worker): train.memory_check=warn."
        )


def _threshold_text(budget: WorkerBudget) -> str:
    if budget.threshold == "memory":
        return f"its share of the machine's memory, {_gib(budget.limit)}"
    if budget.threshold == "limit":
        return f"its {_gib(budget.limit)} limit"
    return (f"distributed.worker.memory.{budget.threshold} = {budget.fraction:.0%} of its "
            f"{_gib(budget.limit)} limit")


class MemoryGuard:
    """Polled by the training's loops (`check`): raises `TrainingDoesNotFit` before Dask spills or pauses.

    A worker trips the guard when its process memory passes `GUARD_MARGIN` of
    its threshold (``limit * fraction``), when its spilled bytes grow or when
    it is paused.  Workers that join during the training are watched from
    their first look; ``estimate`` is quoted in the message.
    """

    def __init__(self, client: Any, budgets: Mapping[str, WorkerBudget],
                 estimate: Mapping[str, Mapping[str, int]] | None = None, seconds: float = GUARD_SECONDS,
                 refuse: bool = True) -> None:
        self.client = client
        self.budgets = dict(budgets)
        self.estimate = estimate or {}
        self.seconds = seconds
        self.refuse = refuse
        self.warned: set[str] = set()
        self.last = 0.0
        self.spilled: dict[str, int] = {}
        self.look()

    def look(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of the workers; records the spilled bytes of workers seen for the first time."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        for address, info in workers.items():
            self.spilled.setdefault(address, _spilled(info))
        return workers

    def check(self, where: str) -> None:
        """Raise `TrainingDoesNotFit` if a worker is past its threshold, spilling or paused (at most every
        ``seconds``); ``where``: the point of the training, for the message."""
        now = time.monotonic()
        if now - self.last < self.seconds:
            return
        self.last = now
        for address, info in self.look().items():
            budget = self.budgets.get(address)
            metrics = info.get("metrics", {})
            memory = int(metrics.get("memory", 0))
            reason = None
            if info.get("status") == "paused":
                reason = f"Dask paused it at {_gib(memory)}"
            elif _spilled(info) > self.spilled[address]:
                reason = f"Dask spilled {_gib(_spilled(info) - self.spilled[address])} of its results to disk"
            elif budget is not None and memory > GUARD_MARGIN * budget.limit * budget.fraction:
                reason = f"it holds {_gib(memory)}, near {_threshold_text(budget)}"
            if reason is None:
                continue
            expected = self.estimate.get(address)
            need = ("" if expected is None else
                    f" Estimated need on that worker: up to {_gib(sum(expected.values()))} ({_itemised(expected)}).")
            if not self.refuse:
                if address not in self.warned:
                    self.warned.add(address)
                    logger.warning("the training may not fit in the workers' memory: on worker %s, %s, %s "
                                   "(train.memory_check=warn: going on).%s", address, where, reason, need)
                continue
            raise TrainingDoesNotFit(
                f"the training does not fit in the workers' memory: on worker {address}, {where}, {reason}. "
                f"Stopped before Dask's spilling stalls the training or a worker is killed; the checkpoint of the "
                f"last complete outer iteration is kept in the store.{need} {REMEDIES}"
            )

    def wait(self, futures: Sequence[Any], where: str) -> None:
        """Wait for ``futures``, looking at the workers' memory every ``seconds`` meanwhile (`check`).

        The timeout's traceback is dropped at once: distributed's ``wait`` raises
        it from a frame that refers to it, a reference cycle through every frame
        up to the caller's. The caller's locals (a Z step's last iterates, halo
        packs and block problems) would then stay alive on the workers until the
        next full garbage collection, minutes into the next outer iteration.
        """
        wait_watching(futures, self.seconds, lambda: self.check(where))


def wait_watching(futures: Sequence[Any], seconds: float, look: Callable[[], None]) -> None:
    """Wait for ``futures``, calling ``look`` every ``seconds`` meanwhile (it may raise to stop the wait).

    The timeout's traceback is dropped at once (see `MemoryGuard.wait`).
    """
    from distributed import wait

    while True:
        try:
            wait(futures, timeout=seconds)
            return
        except TimeoutError as error:
            error.__traceback__ = None
        look()


def _spilled(info: Mapping[str, Any]) -> int:
    spilled = info.get("metrics", {}).get("spilled_bytes", {})
    return int(spilled.get("disk", 0)) if isinstance(spilled, Mapping) else 0
