"""The training's memory estimate, the workers' budgets and the guard, on real Dask clusters on 127.0.0.1."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from distributed import Client, LocalCluster

from flows._dask import LOOPBACK
from sae.config import ModelConfig
from sae.distributed import LaplacianRef, blocks, fit_distributed, read_checkpoint
from sae.distributed.budget import (
    BlockPlan,
    MemoryGuard,
    TrainingDoesNotFit,
    WorkerBudget,
    check_estimate,
    fitting_plan,
    training_estimate,
    worker_budgets,
)
from sae.store import write_sparse
from tests.test_distributed import make_data


def test_the_halo_plan_counts_the_rows_each_block_receives_and_sends():
    """`graph_summary` against a direct count: the distinct columns of a block's rows of L outside the block."""
    _, L = make_data(300)
    bounds = blocks.block_bounds(300, 70)
    summaries = [blocks.graph_summary(blocks.graph_block(L[start:stop], bounds, b))
                 for b, (start, stop) in enumerate(bounds)]
    coo = sp.coo_array(L)
    owner = np.searchsorted([stop for _, stop in bounds], np.arange(300), side="right")
    for b, summary in enumerate(summaries):
        outside = coo.col[(owner[coo.row] == b) & (owner[coo.col] != b)]
        assert summary["halo_rows"] == np.unique(outside).size
        assert summary["nnz"] == L[bounds[b][0]:bounds[b][1]].nnz
        for c in range(len(bounds)):  # rows of c that b wants
            wanted = np.unique(outside[owner[outside] == c]).size
            assert summary["requests"].get(c, 0) == wanted
            assert (c in summary["neighbours"]) == (wanted > 0)


def test_the_estimate_adds_up_what_each_worker_holds():
    """Three blocks on two workers, counted by hand (float32, n = 10, m = 8, lookahead 2)."""
    plans = [BlockPlan(100, graph_nnz=500, requests={1: 30}),
             BlockPlan(100, graph_nnz=600, requests={0: 20, 2: 20}),
             BlockPlan(50, graph_nnz=200, requests={1: 20, 0: 10})]
    homes = ["a", "b", "a"]  # a: blocks 0 and 2 (150 rows); block 2 reads block 0's rows from its state
    estimate = training_estimate(plans, homes, n_features=10, n_atoms=8, itemsize=4, encoder=True, graph=True,
                                 lookahead=2, nthreads={"a": 1, "b": 1})
    a = estimate["a"]
    assert a["frames X"] == 150 * 10 * 4
    assert a["encoder targets X E^T"] == 150 * 8 * 4
    assert a["rows of L"] == (500 + 200) * 8 + 8 * (101 + 51)
    assert a["code iterates"] == 4 * 150 * 8 * 4  # lookahead + 1 generations held, one being written
    assert a["products x C"] == 4 * 150 * 10 * 4
    # 3 generations of: the packs of blocks 0 and 2 for block 1 (20 + 20 rows), block 1's for them (30 + 20)
    assert a["halo packs"] == 3 * (20 + 20 + 30 + 20) * 8 * 4
    assert a["halo rows of the running tasks"] == 2 * 30 * 8 * 4  # one thread: the largest halo, x_k and x_{k-1}
    # dense states need no densified copies; the pool's spare arrays are those the next iterates take
    assert "work arrays of the running tasks" not in a and "spare pooled arrays" not in a
    b = estimate["b"]
    assert b["halo packs"] == 3 * (30 + 20 + 20 + 20) * 8 * 4
    offloaded = training_estimate(plans, homes, n_features=10, n_atoms=8, itemsize=4, encoder=False, graph=True,
                                  lookahead=1, offload_previous=True)["a"]
    assert "encoder targets X E^T" not in offloaded
    assert offloaded["code iterates"] == 2 * 150 * 8 * 4 and offloaded["products x C"] == 150 * 10 * 4
    assert offloaded["halo packs"] == 2 * (90 + 10) * 8 * 4  # block 0's rows for block 2 are packed too
    assert offloaded["previous iterates read back"] == 2 * 100 * (8 + 2 * 10) * 4  # this one and the next block's
    # two threads run both blocks at once: CSR states (10 % non-zeros, 8 bytes each) and both blocks' densified
    # x_k and x_{k-1} are more than two dense generations
    both = training_estimate(plans, homes, n_features=10, n_atoms=8, itemsize=4, encoder=False, graph=True,
                             lookahead=1, offload_previous=True, nthreads={"a": 2})["a"]
    assert both["code iterates"] == int(2 * 150 * 8 * 4 * 0.1 * 2) + 2 * (100 + 50) * 8 * 4
    independent = training_estimate(plans, homes, n_features=10, n_atoms=8, itemsize=4, encoder=False, graph=False,
                                    lookahead=2, nthreads={"a": 2})["a"]
    assert independent == {"frames X": 150 * 10 * 4, "codes before and after the step": 2 * 150 * 8 * 4,
                           "work arrays of the running tasks": 3 * 150 * 8 * 4}


def test_an_estimate_over_the_budget_is_refused_with_the_ways_to_fit(caplog):
    estimate = {"w": {"code iterates": 3 * 2**30, "halo packs": 5 * 2**30}}
    budgets = {"w": WorkerBudget(limit=10 * 2**30, fraction=0.6, threshold="target", start=2**30)}
    with pytest.raises(TrainingDoesNotFit) as raised:
        check_estimate(estimate, budgets, "the training")
    message = str(raised.value)
    assert "worker w would hold up to 8.00 GiB (halo packs 5.00 GiB, code iterates 3.00 GiB)" in message
    assert "can give 5.00 GiB" in message and "distributed.worker.memory.target = 60%" in message
    assert "train.lookahead=1" in message and "train.offload_previous=true" in message
    with caplog.at_level(logging.WARNING, logger="sae.distributed"):
        check_estimate(estimate, budgets, "the training", refuse=False)
    assert "may not fit" in caplog.text
    check_estimate(estimate, {"w": WorkerBudget(20 * 2**30, 0.6, "target", 2**30)}, "the training")  # 11 GiB: fits


def test_what_does_not_fit_gives_way_to_one_generation_fewer_then_to_offloaded_iterates(caplog):
    """The plans above and 5 more blocks on worker "a": lookahead 2 holds a generation of iterates and of halo
    packs more than lookahead 1, which holds more than lookahead 1 with the previous iterates offloaded (the
    same iterates in all three: a worker of many blocks keeps one copy fewer of each, for read-back buffers of
    its largest running block); the training takes the first that fits, and says so."""
    plans = [BlockPlan(100, graph_nnz=500, requests={1: 30}),
             BlockPlan(100, graph_nnz=600, requests={0: 20, 2: 20}),
             BlockPlan(50, graph_nnz=200, requests={1: 20, 0: 10})] + [BlockPlan(100, graph_nnz=300)] * 5
    homes = ["a", "b", "a"] + ["a"] * 5

    def estimate_at(ahead, offload):
        return training_estimate(plans, homes, n_features=10, n_atoms=64, itemsize=4, encoder=False, graph=True,
                                 lookahead=ahead, offload_previous=offload)

    offloaded, one, two = (sum(estimate_at(*plan)["a"].values()) for plan in ((1, True), (1, False), (2, False)))
    assert offloaded < one < two

    def budgets(available):  # "b" always fits
        return {"a": WorkerBudget(limit=available, fraction=1.0, threshold="limit", start=0),
                "b": WorkerBudget(limit=10 * two, fraction=1.0, threshold="limit", start=0)}

    with caplog.at_level(logging.WARNING, logger="sae.distributed"):
        assert fitting_plan(estimate_at, budgets(two), 2, False, "the training") == (2, False, estimate_at(2, False))
        assert not caplog.text
        assert fitting_plan(estimate_at, budgets(two - 1), 2, False, "the training") == (1, False,
                                                                                         estimate_at(1, False))
        assert "the training: train.lookahead = 1 instead of 2, so that it fits" in caplog.text
        caplog.clear()
        assert fitting_plan(estimate_at, budgets(one - 1), 2, False, "the training") == (1, True,
                                                                                        estimate_at(1, True))
        assert ("the training: train.lookahead = 1 instead of 2 and train.offload_previous = true (the previous "
                "iterates on the workers' disks), so that it fits" in caplog.text)
        caplog.clear()
        # what the user chose already is kept
        assert fitting_plan(estimate_at, budgets(two), 1, True, "the training") == (1, True, estimate_at(1, True))
        assert not caplog.text
        # nothing fits: the smallest estimate is refused, without what was taken among the remedies
        lookahead, offload, estimate = fitting_plan(estimate_at, budgets(offloaded - 1), 2, False, "the training")
        assert (lookahead, offload, estimate) == (1, True, estimate_at(1, True))
        assert "the least memory it can take" in caplog.text
    with pytest.raises(TrainingDoesNotFit) as raised:
        check_estimate(estimate, budgets(offloaded - 1), "the training", lookahead=lookahead, offload=offload)
    assert "train.lookahead" not in str(raised.value) and "train.offload_previous" not in str(raised.value)
    assert "fewer atoms (train.model.n_atoms)" in str(raised.value)


@pytest.fixture(scope="module")
def process_client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB", **LOOPBACK) as cluster, \
            Client(cluster) as client:
        yield client


def test_the_budgets_are_the_workers_limits_and_dask_thresholds(process_client):
    budgets = worker_budgets(process_client)
    assert set(budgets) == set(process_client.scheduler_info(n_workers=-1)["workers"])
    for budget in budgets.values():
        assert budget.limit == 2**30 and budget.threshold == "target" and budget.fraction == 0.6
        assert 10 * 2**20 < budget.start < 2**30  # a Python process with Dask loaded
        assert budget.available == int(0.6 * 2**30) - budget.start


def test_a_training_that_cannot_fit_is_refused_before_any_iteration(process_client, tmp_path, caplog):
    """20,000 frames on two workers of 1 GiB: with 8,192 atoms the iterates alone need more than 60 % of 1 GiB,
    even one generation fewer (lookahead 1) and the previous ones offloaded; 2,048 atoms fit with lookahead 1,
    which the training takes."""
    X, L = make_data(20_000, n_features=16)
    group = zarr.open_group(str(tmp_path / "model"), mode="w")
    config = ModelConfig(n_atoms=8192, lambda_g=1.0, max_outer=1, max_inner=2, random_state=0)
    with pytest.raises(TrainingDoesNotFit, match=r"does not fit in the workers' memory: worker tcp://127\.0\.0\.1") \
            as raised:
        fit_distributed(X, config, client=process_client, laplacian=L, block_size=5000, checkpoint=group)
    assert read_checkpoint(group) is None  # nothing was trained
    assert "train.lookahead" not in str(raised.value)  # tried already
    assert "train.offload_previous" not in str(raised.value)
    # From a stored Laplacian, refused before its rows move to the blocks (minutes at scale): the halo is
    # known from the stored rows, and the blocks' graph (logged with its halo) is never built.
    write_sparse(group, "laplacian", sp.csr_array(L))
    caplog.clear()  # the refusal above (L in memory) built the blocks' graph first
    with caplog.at_level(logging.INFO, logger="sae.distributed"), pytest.raises(TrainingDoesNotFit):
        fit_distributed(X, config, client=process_client, laplacian=LaplacianRef(group, "laplacian"),
                        block_size=5000, order="cluster")
    assert "frames ordered by k-means cluster" in caplog.text and "halo:" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="sae.distributed"):
        fit = fit_distributed(X, config.model_copy(update={"n_atoms": 2048}), client=process_client, laplacian=L,
                              block_size=5000, lookahead=2)
    assert fit.n_iter == 1 and "train.lookahead = 1 instead of 2, so that it fits" in caplog.text
    # the same without the graph term holds one generation of codes more than the input: it fits
    small = ModelConfig(n_atoms=16, lambda_g=0.0, max_outer=1, random_state=0)
    fit = fit_distributed(X, small, client=process_client, block_size=5000)
    assert fit.n_iter == 1


def test_the_guard_stops_when_a_worker_nears_its_threshold_or_spills(process_client):
    workers = sorted(process_client.scheduler_info(n_workers=-1)["workers"])
    generous = {w: WorkerBudget(2**40, 0.6, "target", 0) for w in workers}
    guard = MemoryGuard(process_client, generous, seconds=0.0)
    guard.check("nowhere")  # nothing to say
    tight = {w: WorkerBudget(2**20, 0.6, "target", 0) for w in workers}  # a process of Dask holds more than 1 MiB
    with pytest.raises(TrainingDoesNotFit, match="outer iteration 3, Z step iteration 7, it holds"):
        MemoryGuard(process_client, tight, seconds=0.0).check("outer iteration 3, Z step iteration 7")
    MemoryGuard(process_client, tight, seconds=0.0, refuse=False).check("here")  # warn: goes on
    # a result spilled to disk after the guard's first look trips it
    future = process_client.submit(np.ones, 2**20, workers=[workers[0]])
    future.result()
    guard = MemoryGuard(process_client, generous, seconds=0.0)
    assert process_client.run(_evict, workers=[workers[0]])[workers[0]] > 0
    deadline = time.monotonic() + 10  # the scheduler hears of it with the next heartbeat
    with pytest.raises(TrainingDoesNotFit, match="Dask spilled"):
        while time.monotonic() < deadline:
            guard.check("after the spill")
            time.sleep(0.2)
    del future


def test_waiting_under_the_guard_keeps_nothing_of_the_caller_alive(process_client):
    """The guard's timeouts leave no reference cycle through the caller's frame: what the caller held (a Z step's
    last iterates, its halo packs and block problems) is freed when it returns, not at some later collection."""
    import gc
    import weakref

    workers = sorted(process_client.scheduler_info(n_workers=-1)["workers"])
    guard = MemoryGuard(process_client, {w: WorkerBudget(2**40, 0.6, "target", 0) for w in workers}, seconds=0.05)

    class Held:
        pass

    def caller() -> weakref.ref:
        held = Held()
        guard.wait([process_client.submit(time.sleep, 0.5, pure=False)], "a Z step")  # several timeouts
        return weakref.ref(held)

    collecting = gc.isenabled()
    gc.disable()
    try:
        assert caller()() is None
    finally:
        if collecting:
            gc.enable()


def _evict(dask_worker):
    return dask_worker.data.evict()


def test_a_training_that_does_not_fit_is_not_retried_by_its_flow():
    """The train task retries once after a lost worker (it resumes from its checkpoint), not after a refusal."""
    from prefect.states import Failed

    from flows.train import train_task, worth_retrying

    assert train_task.retry_condition_fn is worth_retrying and train_task.retries == 1
    assert not worth_retrying(None, None, Failed(data=TrainingDoesNotFit("does not fit")))
    assert worth_retrying(None, None, Failed(data=OSError("connection lost")))
