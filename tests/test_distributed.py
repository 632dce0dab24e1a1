"""Distributed training against the in-memory reference `sae.model.fit_sae`.

Real Dask clusters on 127.0.0.1 (threads for speed, processes where the
number of processes matters, real ``dask scheduler`` / ``dask worker``
processes for the failure test); the reference is the in-memory fit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from distributed import Client, LocalCluster
from sklearn.neighbors import kneighbors_graph

from flows._dask import LOOPBACK
from sae.blas import blas_threads
from sae.config import ModelConfig
from sae.distributed import LaplacianRef, Tuning, block_bounds, fit_distributed, read_checkpoint
from sae.distributed import blocks, kernel, memory, offload, zstep
from sae.distributed.trainer import ClusterBackend, without_work_stealing
from sae.model import code_step_options, fit_sae, init_dictionary, init_encoder, solve_codes
from sae.solvers import GAP_EVERY
from sae.store import write_sparse


def make_data(n_samples: int, n_features: int = 12, n_true: int = 6, seed: int = 0):
    """Sparse combinations of a random dictionary plus noise, min-max scaled, and a normalised kNN Laplacian."""
    rng = np.random.default_rng(seed)
    D = rng.random((n_true, n_features))
    Z = rng.random((n_samples, n_true)) * (rng.random((n_samples, n_true)) < 0.3)
    X = Z @ D + 0.05 * rng.standard_normal((n_samples, n_features))
    X = (X - X.min(0)) / (X.max(0) - X.min(0))
    W = kneighbors_graph(X, 5, mode="connectivity")
    W = W.maximum(W.T)
    d = np.asarray(W.sum(axis=1)).ravel()
    Dm = sp.diags(1 / np.sqrt(d))
    L = sp.csr_array(sp.eye(n_samples) - Dm @ W @ Dm)
    return X.astype(np.float32), L


@pytest.fixture(scope="module")
def small():
    return make_data(300)


def _blocks(n: int, k: int) -> int:
    return -(-n // k)


def test_block_bounds_cover_rows():
    bounds = block_bounds(10, 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        block_bounds(10, 0)


def _check_close(result, reference):
    final, ref = result.history[-1], reference.history[-1]
    assert abs(final["total"] - ref["total"]) <= 5e-3 * abs(ref["total"])
    assert abs(final["sparsity_percent"] - ref["sparsity_percent"]) <= 1.0
    for name in ("reconstruction", "sparsity", "graph", "encoder"):
        assert np.isnan(final[name]) == np.isnan(ref[name])


@pytest.mark.parametrize("n_blocks", [1, 3, 7])
@pytest.mark.parametrize("lambda_e", [0.0, 1.0])
def test_independent_blocks_match_reference(thread_client, n_blocks, lambda_e):
    X, _ = make_data(700)
    config = ModelConfig(n_atoms=10, lambda_e=lambda_e, max_outer=8, max_inner=100, random_state=1)
    reference = fit_sae(X, config)
    result = fit_distributed(X, config, client=thread_client, block_size=_blocks(len(X), n_blocks),
                             return_codes=True)
    _check_close(result, reference)
    assert result.codes.shape == reference.codes.shape and result.codes.dtype == np.float32
    assert np.all(np.linalg.norm(result.components, axis=1) <= 1 + 1e-5)
    assert (result.encoder is None) == (lambda_e == 0)


@pytest.mark.slow
@pytest.mark.parametrize("n_blocks", [1, 3, 7])
@pytest.mark.parametrize("lambda_e", [0.0, 1.0])
def test_global_fista_with_graph_matches_reference(thread_client, small, n_blocks, lambda_e):
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=5.0, lambda_e=lambda_e, max_outer=2, max_inner=10, random_state=0,
                         fista_restart=bool(lambda_e))  # both FISTA variants
    reference = fit_sae(X, config, L)
    result = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=_blocks(len(X), n_blocks),
                             lookahead=3, return_codes=True)
    _check_close(result, reference)
    # the same global FISTA: same inner iteration counts, and the codes agree
    assert [r["inner_codes"] for r in result.history] == [r["inner_codes"] for r in reference.history]
    np.testing.assert_allclose(result.codes @ result.components, reference.codes @ reference.components,
                               atol=1e-3)


def test_a_fit_from_sampled_frames_of_a_stored_array_matches_the_reference(thread_client, small, tmp_path):
    """init='frames' on the cluster reads the same frames from the store as in memory, then the encoder draw."""
    X, L = small
    config = ModelConfig(n_atoms=8, init="frames", lambda_g=5.0, lambda_e=1.0, max_outer=2, max_inner=10,
                         random_state=5)
    reference = fit_sae(X, config, L)
    result = fit_distributed(_store_array(tmp_path / "data.zarr", X), config, client=thread_client, laplacian=L,
                             block_size=_blocks(len(X), 3), return_codes=True)
    _check_close(result, reference)
    np.testing.assert_allclose(result.codes @ result.components, reference.codes @ reference.components, atol=1e-3)


@pytest.mark.parametrize("lambda_e", [0.0, 1.0])
def test_the_online_fit_of_a_stored_array_is_the_in_memory_one(thread_client, tmp_path, lambda_e, monkeypatch):
    """fit_method='online': the epochs read the stored frames block by block in the in-memory fit's order
    (blocks of the order smaller than the data here), the last Z step runs on the cluster's blocks; then a
    rerun of the finished training returns at once."""
    from sae import online

    monkeypatch.setattr(online, "ORDER_BLOCK", 96)
    X, _ = make_data(500)
    assert len(list(online.epoch_order(len(X), np.random.default_rng(0)))) == 6
    config = ModelConfig(n_atoms=8, lambda_e=lambda_e, max_outer=3, rtol=1e-9, random_state=4, init="frames",
                         fit_method="online", batch_size=40, z_solver="lars")
    reference = fit_sae(X, config)
    group = zarr.open_group(str(tmp_path / "model.zarr"), mode="w")
    records = []
    result = fit_distributed(_store_array(tmp_path / "data.zarr", X), config, client=thread_client, block_size=128,
                             checkpoint=group, callback=records.append)
    unfinished = zarr.open_group(str(tmp_path / "unfinished.zarr"), mode="w")
    fit_distributed(X, config.model_copy(update={"max_outer": 1}), client=thread_client, block_size=128,
                    checkpoint=unfinished)
    longer = fit_distributed(X, config, client=thread_client, block_size=128, checkpoint=unfinished)
    assert longer.resumed_from == 0  # a longer online fit starts again: its statistics are not kept
    np.testing.assert_array_equal(longer.components, reference.components)
    np.testing.assert_array_equal(result.components, reference.components)
    np.testing.assert_allclose(result.codes[:], reference.codes, rtol=1e-6, atol=1e-7)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and records[-1]["online"] is False
    np.testing.assert_allclose([r["total"] for r in result.history], [r["total"] for r in reference.history],
                               rtol=1e-6)
    assert read_checkpoint(group)["iteration"] == 4 and read_checkpoint(group)["stop_reason"] == "max_outer"
    again = fit_distributed(_store_array(tmp_path / "data.zarr", X), config, client=thread_client, block_size=128,
                            checkpoint=group)
    assert again.resumed_from == 4 and again.n_iter == result.n_iter == reference.n_iter == 3
    # 3 epochs done are fewer than 5: trained again; its checkpoint (iteration 6) does not go into the slot of
    # the one still recorded as complete (iteration 4, slot 0), which a crash would have left half-written
    slot = group.attrs["checkpoint_slot"]
    more = fit_distributed(X, config.model_copy(update={"max_outer": 5}), client=thread_client, block_size=128,
                           checkpoint=group)
    assert more.resumed_from == 0 and more.n_iter == 5 and group.attrs["checkpoint_slot"] == 1 - slot == 1
    with pytest.raises(ValueError, match="holds an online fit and the configuration asks for "
                                         "fit_method='alternating'"):
        fit_distributed(X, config.model_copy(update={"fit_method": "alternating"}), client=thread_client,
                        block_size=128, checkpoint=group)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_and_dense_code_blocks_give_the_same_iterates(thread_client, small, density):
    """Code blocks kept as CSR (density 1.0: always) or dense (0.0: never) follow the same global FISTA."""
    tuning = Tuning(sparse_density=density, tile=7)  # tile: several tiles per block, the last one shorter
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_z=6.0, lambda_g=5.0, max_outer=2, max_inner=10, random_state=0)
    reference = fit_sae(X, config, L)
    result = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=_blocks(len(X), 3),
                             return_codes=True, tuning=tuning)
    assert 0 < reference.history[-1]["sparsity_percent"] < 40  # sparse: CSR blocks when the threshold allows
    # the workers' pooled arrays are released once Dask has released the last results (the periodic trimming)
    assert memory.pool.trainings == 0
    assert all("sae-pool-trim" in w.periodic_callbacks for w in thread_client.cluster.workers.values())
    deadline = time.monotonic() + 10
    while memory.pool.arrays and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not memory.pool.arrays
    assert [r["inner_codes"] for r in result.history] == [r["inner_codes"] for r in reference.history]
    np.testing.assert_allclose(result.codes, reference.codes, atol=1e-4)


def test_long_z_steps_log_their_progress(thread_client, small, caplog):
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=5.0, max_outer=1, max_inner=3, rtol=1e-9, random_state=0)
    with caplog.at_level("INFO", logger="sae.distributed"):
        fit_distributed(X, config, client=thread_client, laplacian=L, block_size=_blocks(len(X), 2),
                        tuning=Tuning(progress_seconds=0.0))  # every iteration
    progress = [r.getMessage() for r in caplog.records if "Z step: iteration" in r.getMessage()]
    assert [message.split(",")[1] for message in progress] == [f" Z step: iteration {k}" for k in range(4)]
    assert all("% non-zeros" in message and "s per iteration" in message for message in progress)


def test_z_steps_without_graph_log_the_blocks_they_have_coded(thread_client, small, caplog):
    """Coordinate descent reports no iterations: the step logs how many blocks are done meanwhile, and at its end."""
    X, _ = small
    config = ModelConfig(n_atoms=8, lambda_g=0.0, max_outer=2, rtol=1e-9, random_state=0)
    n_blocks = 3
    with caplog.at_level("INFO", logger="sae.distributed"):
        fit_distributed(X, config, client=thread_client, block_size=_blocks(len(X), n_blocks),
                        tuning=Tuning(progress_seconds=0.0))
    progress = [r.getMessage() for r in caplog.records if "blocks coded" in r.getMessage()]
    for outer in (1, 2):
        done = [int(m.split(": ")[1].split(" of ")[0]) for m in progress if m.startswith(f"outer {outer},")]
        assert done[-1] == n_blocks and done == sorted(done)
        assert all(f" of {n_blocks} blocks coded, " in m for m in progress)


def _hold(name: str) -> bool:
    from distributed import Event

    return Event(name).wait()


def _tasks_named(prefix: str, dask_scheduler=None) -> list[str]:
    return [str(key) for key in dask_scheduler.tasks if str(key).startswith(prefix)]


def test_an_interrupt_stops_a_z_step_without_graph_while_it_waits_and_its_waiting_blocks_are_cancelled(
        thread_client, small):
    """Coordinate descent is one task per block, minutes long at scale: the wait for them asks ``interrupt`` too,
    and the blocks not started when it raises do not run for a run that is gone."""
    from distributed import Event

    X, _ = small
    config = ModelConfig(n_atoms=8, lambda_g=0.0, max_outer=2, random_state=0)
    gate, asked = Event("sae-test-gate", client=thread_client), []
    holders = []

    class Gone(RuntimeError):
        pass

    def interrupt(where):
        asked.append(where)
        if where == "outer iteration 1, Z step":  # both workers busy before the blocks are submitted
            holders.extend(thread_client.submit(_hold, "sae-test-gate", pure=False) for _ in range(2))
        elif "blocks coded" in where:
            raise Gone

    opener = threading.Timer(30.0, gate.set)  # without the check, the fit ends (and the test fails) instead of hanging
    opener.start()
    try:
        stopped = None
        try:
            fit_distributed(X, config, client=thread_client, block_size=_blocks(len(X), 3),
                            tuning=Tuning(progress_seconds=0.0), interrupt=interrupt)
        except Gone as error:  # kept with its traceback, as a task's failure is (its frames hold the blocks)
            stopped = error
        assert isinstance(stopped, Gone) and stopped.__traceback__ is not None
        assert asked[-1].startswith("outer iteration 1, Z step (") and asked[-1].endswith("of 3 blocks coded)")
        deadline = time.monotonic() + 10
        while thread_client.run_on_scheduler(_tasks_named, "sae-zsolve") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread_client.run_on_scheduler(_tasks_named, "sae-zsolve") == []
    finally:
        opener.cancel()
        gate.set()
        thread_client.gather(holders)


def test_coordinate_descent_by_batches_gives_the_codes_of_one_call(monkeypatch, rng):
    """A block is coded by batches of frames (to look at its stop event between them): bit for bit the codes,
    iterations and stop reason of one call (coordinate descent and the homotopy path), and FISTA (one problem
    over the block) is left whole."""
    monkeypatch.setattr(zstep, "CD_FIRST_BATCH", 7)  # uneven batches: 7, 14, 28, ... (or halved when slow)
    X = rng.random((300, 12)).astype(np.float32)
    C = init_dictionary(20, 12, rng=rng, dtype=np.float32)
    for method in ("cd", "lars", "fista"):
        options = dict(lambda_d=10.0, lambda_z=0.5, rtol=1e-6, max_iter=300, method=method)
        reference = solve_codes(X, C, None, None, np.zeros((300, 20), np.float32), n_threads=1, **options)
        codes, info = zstep.solve_block_codes(X, C, None, np.zeros((300, 20), np.float32), options)
        np.testing.assert_array_equal(blocks.densify(codes), reference.solution)
        assert (info["n_iter"], info["stop_reason"]) == (reference.n_iter, reference.stop_reason)


def test_a_running_block_of_coordinate_descent_ends_soon_after_its_run_is_stopped(thread_client, rng):
    """A block of coordinate descent can run for minutes (small lambda_z): when its run is stopped, the trainer
    sets the step's stop event and the running block ends within seconds, leaving nothing on the cluster."""
    X = rng.random((1200, 96)).astype(np.float32)
    config = ModelConfig(n_atoms=256, lambda_d=10.0, lambda_z=0.03, lambda_g=0.0, max_outer=2, random_state=0)
    started, timing = [], {}

    class Gone(RuntimeError):
        pass

    def interrupt(where):
        if "blocks coded" in where:
            started.append(time.monotonic())
            if started[-1] - started[0] > 2.0:  # both blocks have been running for 2 s
                timing["stopped"] = time.monotonic()
                raise Gone

    with pytest.raises(Gone):  # each block alone takes about 30 s
        fit_distributed(X, config, client=thread_client, block_size=600, tuning=Tuning(progress_seconds=0.0),
                        interrupt=interrupt)
    # The scheduler forgets a cancelled task at once, but its worker's one thread is free only when it has ended.
    workers = list(thread_client.scheduler_info()["workers"])
    probes = [thread_client.submit(time.monotonic, workers=[w], allow_other_workers=False, pure=False)
              for w in workers]
    assert max(thread_client.gather(probes)) - timing["stopped"] < 10
    assert thread_client.run_on_scheduler(_tasks_named, "sae-zsolve") == []


def _stealing(dask_scheduler) -> bool:
    return "stealing" in dask_scheduler.periodic_callbacks


def test_work_stealing_is_paused_during_a_training(thread_client, small):
    """Block states stay on their home workers: the scheduler's work stealing is off while a fit runs, then back."""
    X, L = small
    seen = []
    config = ModelConfig(n_atoms=4, lambda_g=1.0, max_outer=2, max_inner=3, random_state=0)
    assert thread_client.run_on_scheduler(_stealing)
    fit_distributed(X, config, client=thread_client, laplacian=L, block_size=100,
                    callback=lambda record: seen.append(thread_client.run_on_scheduler(_stealing)))
    assert seen == [False, False] and thread_client.run_on_scheduler(_stealing)
    with pytest.raises(ValueError):  # restarted after a failed fit too
        fit_distributed(X, config, client=thread_client, block_size=100)
    assert thread_client.run_on_scheduler(_stealing)
    with without_work_stealing(thread_client):  # overlapping trainings: restarted when the last one ends
        with without_work_stealing(thread_client):
            assert not thread_client.run_on_scheduler(_stealing)
        assert not thread_client.run_on_scheduler(_stealing)
    assert thread_client.run_on_scheduler(_stealing)


def test_blas_runs_on_one_thread_while_a_training_runs_on_threads_of_this_process(thread_client, small):
    """Workers that are threads of this process share its BLAS: one thread per product while a fit of several
    blocks runs (each task a core, as in Dask's worker processes), as it was afterwards; a fit that fails lifts
    it too; a fit of one block leaves it alone."""
    X, L = small
    before = blas_threads()
    if before == [1]:
        pytest.skip("BLAS already runs on one thread here")
    seen = []
    config = ModelConfig(n_atoms=4, lambda_g=1.0, max_outer=2, max_inner=3, random_state=0)
    fit_distributed(X, config, client=thread_client, laplacian=L, block_size=100,
                    callback=lambda record: seen.append(blas_threads()))
    assert seen == [[1], [1]] and blas_threads() == before
    with pytest.raises(ValueError):
        fit_distributed(X, config, client=thread_client, block_size=100)
    assert blas_threads() == before
    alone = []  # one block: one task at a time, its products keep every core
    fit_distributed(X, config, client=thread_client, laplacian=L, block_size=len(X),
                    callback=lambda record: alone.append(blas_threads()))
    assert alone == [before, before]


def test_graph_term_needs_a_laplacian(thread_client, small):
    X, L = small
    config = ModelConfig(n_atoms=4, lambda_g=1.0, max_outer=1)
    with pytest.raises(ValueError, match="laplacian is required when lambda_g > 0"):
        fit_distributed(X, config, client=thread_client, block_size=100)
    with pytest.raises(ValueError, match=r"laplacian must have shape \(n_samples, n_samples\) = \(300, 300\)"):
        fit_distributed(X, config, client=thread_client, laplacian=L[:100, :100], block_size=100)


def test_laplacian_bound_is_an_upper_bound(thread_client, small):
    X, L = small
    config = ModelConfig(n_atoms=6, lambda_g=5.0, max_outer=1, max_inner=5, random_state=0)
    # the Gershgorin bound (max absolute row sum) is >= the spectral norm, which the power iteration finds
    exact = ClusterBackend(thread_client, X, L, config, 100, "power", 1).laplacian_norm
    bound = ClusterBackend(thread_client, X, L, config, 100, "bound", 1).laplacian_norm
    absolute_row_sums = np.abs(L).sum(axis=1)
    assert exact <= bound and np.isclose(bound, absolute_row_sums.max(), rtol=1e-5)
    np.testing.assert_allclose(exact, np.abs(np.linalg.eigvalsh(L.toarray())).max(), rtol=1e-4)


def test_the_bound_of_a_normalised_laplacian_is_at_most_2(thread_client, small, tmp_path):
    X, L = small  # a normalised kNN Laplacian: its Gershgorin bound exceeds 2 where degrees differ
    group = zarr.open_group(str(tmp_path / "graph.zarr"), mode="w")
    write_sparse(group, "laplacian", sp.csr_array(L, dtype=np.float32))
    config = ModelConfig(n_atoms=6, lambda_g=5.0, max_outer=1, max_inner=5, random_state=0)
    norms = {kind: ClusterBackend(thread_client, X, LaplacianRef(group, "laplacian", kind=kind), config, 100, "bound",
                                  1).laplacian_norm
             for kind in (None, "combinatorial", "normalized")}
    assert norms[None] == norms["combinatorial"] == pytest.approx(np.abs(L).sum(axis=1).max(), rel=1e-5)
    assert norms[None] > 2 and norms["normalized"] == 2.0


@pytest.mark.parametrize("dtype, precision", [("float32", 1e-5), ("float64", 1e-10)])
def test_the_z_step_stops_at_the_same_certified_gap_in_memory_and_on_blocks(thread_client, small, dtype, precision):
    X, L = (np.asarray(small[0], dtype=dtype), small[1])
    config = ModelConfig(n_atoms=8, lambda_g=5.0, lambda_e=1.0, rtol=1e-4, max_inner=300, random_state=0, dtype=dtype,
                         z_stop="gap")
    rng = np.random.default_rng(0)
    C, E = init_dictionary(8, X.shape[1], rng=rng, dtype=dtype), init_encoder(8, X.shape[1], rng=rng, dtype=dtype)
    reference = solve_codes(X, C, E, L, np.zeros((len(X), 8), dtype), **code_step_options(config))
    backend = ClusterBackend(thread_client, X, L, config, _blocks(len(X), 3), "power", 2)
    blocks_, step = backend.code_step(backend.zero_codes(8), C, E, config, 1)
    assert step["stop_reason"] == reference.stop_reason == "rtol"
    assert step["n_iter"] == reference.n_iter and reference.n_iter % GAP_EVERY == 0
    F = reference.objective[-1]
    assert 0 < reference.gap <= 1e-4 * F and step["gap"] == pytest.approx(reference.gap, abs=precision * F)
    np.testing.assert_allclose(backend.gather_codes(blocks_), reference.solution, atol=1e-4)


@pytest.mark.slow
def test_same_result_whatever_the_number_of_workers(small):
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=5.0, lambda_e=1.0, max_outer=2, max_inner=8, random_state=3)
    totals = []
    for n_workers in (1, 2):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          **LOOPBACK) as cluster, Client(cluster) as client:
            blas = []  # workers in other processes: this process's BLAS is left as it is
            fit = fit_distributed(X, config, client=client, laplacian=L, block_size=100,
                                  callback=lambda record, blas=blas: blas.append(blas_threads()))
            totals.append([r["total"] for r in fit.history])
            assert blas and all(threads == blas_threads() for threads in blas)
    np.testing.assert_allclose(totals[0], totals[1], rtol=1e-5)


def _store_array(path, X) -> zarr.Array:
    group = zarr.open_group(str(path), mode="w")
    array = group.create_array("X", shape=X.shape, chunks=(100, X.shape[1]), dtype=X.dtype)
    array[:] = X
    return array


def test_resume_from_checkpoint_ends_where_an_uninterrupted_run_ends(thread_client, tmp_path):
    X, _ = make_data(500)
    X_stored = _store_array(tmp_path / "data.zarr", X)
    config = ModelConfig(n_atoms=8, lambda_e=1.0, max_outer=4, max_inner=50, rtol=1e-9, random_state=2)
    straight = fit_distributed(X_stored, config, client=thread_client, block_size=128,
                               checkpoint=zarr.open_group(str(tmp_path / "a.zarr"), mode="w"))

    group = zarr.open_group(str(tmp_path / "b.zarr"), mode="w")
    first = fit_distributed(X_stored, config.model_copy(update={"max_outer": 2}), client=thread_client,
                            block_size=128, checkpoint=group)
    assert first.n_iter == 2 and read_checkpoint(group)["iteration"] == 2

    class Interrupt(RuntimeError):
        pass

    def interrupt(record):  # a real exception in the middle of the run
        if record["iteration"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit_distributed(X_stored, config, client=thread_client, block_size=128, checkpoint=group, callback=interrupt)
    assert read_checkpoint(group)["iteration"] == 3
    resumed = fit_distributed(X_stored, config, client=thread_client, block_size=128, checkpoint=group)
    assert resumed.resumed_from == 3 and resumed.n_iter == 4
    np.testing.assert_allclose([r["total"] for r in resumed.history], [r["total"] for r in straight.history],
                               rtol=1e-6)
    np.testing.assert_allclose(resumed.components, straight.components, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed.codes[:], straight.codes[:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop_at", ["outer iteration 2, before its checkpoint", "outer iteration 2, Z step iteration 3"])
def test_an_interrupt_stops_the_fit_before_it_writes_and_the_last_checkpoint_stays(thread_client, small, tmp_path,
                                                                                   stop_at):
    """``interrupt(where)`` is asked at every Z-step iteration and before every checkpoint; when it raises, nothing
    more is written (the run that started a training on a worker is gone: flows._dask.run_gone_check)."""
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=10.0, max_outer=4, max_inner=20, rtol=1e-9, random_state=0)
    group = zarr.open_group(str(tmp_path / "model.zarr"), mode="w")
    asked = []

    class Gone(RuntimeError):
        pass

    def interrupt(where):
        asked.append(where)
        if where == stop_at:
            raise Gone

    with pytest.raises(Gone):
        fit_distributed(X, config, client=thread_client, laplacian=L, block_size=100, checkpoint=group,
                        interrupt=interrupt)
    state = read_checkpoint(group)
    assert state["iteration"] == 1 and state["stop_reason"] == "" and len(state["history"]) == 2
    assert asked[0] == "outer iteration 1, Z step" and "outer iteration 1, before its checkpoint" in asked
    assert asked[-1] == stop_at
    z_iterations = [w for w in asked if w.startswith("outer iteration 1, Z step iteration")]
    assert z_iterations == [f"outer iteration 1, Z step iteration {k}" for k in range(len(z_iterations))]
    assert len(z_iterations) == state["history"][1]["inner_codes"] + 1  # the start, then every iteration


def test_a_stopped_fit_resumed_with_max_outer_at_its_checkpoint_ends_with_the_codes_in_the_frames_order(
        thread_client, small, tmp_path):
    """Stopped after the checkpoint of outer iteration 1 (its codes in the blocks' k-means order), then asked for
    max_outer = 1: nothing to train, but the codes must become the final ones, as a run ended at 1 writes them (a
    classification read None codes from that model before)."""
    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=10.0, max_outer=1, max_inner=20, rtol=1e-9, random_state=0)
    straight = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=100,
                               checkpoint=zarr.open_group(str(tmp_path / "a.zarr"), mode="w"))
    group = zarr.open_group(str(tmp_path / "b.zarr"), mode="w")

    class Gone(RuntimeError):
        pass

    def interrupt(where):
        if where == "outer iteration 2, before its checkpoint":
            raise Gone

    with pytest.raises(Gone):
        fit_distributed(X, config.model_copy(update={"max_outer": 4}), client=thread_client, laplacian=L,
                        block_size=100, checkpoint=group, interrupt=interrupt)
    stopped = read_checkpoint(group)
    assert stopped["iteration"] == 1 and stopped["stop_reason"] == "" and stopped["frame_of_row"] is not None
    assert not np.array_equal(stopped["frame_of_row"], np.arange(X.shape[0]))  # the blocks' order indeed

    resumed = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=100, checkpoint=group)
    assert resumed.resumed_from == 1 and resumed.n_iter == 1 and resumed.stop_reason == "max_outer"
    final = read_checkpoint(group)
    assert final["stop_reason"] == "max_outer" and final["frame_of_row"] is None
    np.testing.assert_array_equal(final["codes"][:], straight.codes[:])
    np.testing.assert_array_equal(resumed.codes[:], straight.codes[:])
    np.testing.assert_array_equal(final["components"], straight.components)


def _start(args, **kw):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


@pytest.mark.slow
@pytest.mark.integration
def test_killed_worker_does_not_change_the_result(tmp_path, small):
    X, L = small
    X_stored = _store_array(tmp_path / "data.zarr", X)
    config = ModelConfig(n_atoms=8, lambda_g=5.0, max_outer=2, max_inner=10, random_state=4)
    scheduler_file = str(tmp_path / "scheduler.json")
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    processes = [_start(dask + ["--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                "--scheduler-file", scheduler_file])]
    try:
        for _ in range(2):
            processes.append(_start([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                     scheduler_file, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1",
                                     "--no-dashboard"]))
        deadline = time.time() + 60
        while not os.path.exists(scheduler_file) and time.time() < deadline:
            time.sleep(0.2)
        with Client(scheduler_file=scheduler_file, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            undisturbed = fit_distributed(X_stored, config, client=client, laplacian=L, block_size=100,
                                          checkpoint=zarr.open_group(str(tmp_path / "a.zarr"), mode="w"))
            victim = processes[1]
            killed = threading.Event()

            def kill_soon(record):
                if record["iteration"] == 1:  # kill during the next Z step
                    def kill():
                        victim.send_signal(signal.SIGKILL)
                        killed.set()
                    threading.Timer(0.2, kill).start()

            disturbed = fit_distributed(X_stored, config, client=client, laplacian=L, block_size=100,
                                        checkpoint=zarr.open_group(str(tmp_path / "b.zarr"), mode="w"),
                                        callback=kill_soon)
            assert killed.is_set() and victim.wait(timeout=10) == -signal.SIGKILL
            assert len(client.scheduler_info()["workers"]) == 1
        np.testing.assert_allclose([r["total"] for r in disturbed.history],
                                   [r["total"] for r in undisturbed.history], rtol=1e-6)
        np.testing.assert_allclose(disturbed.codes[:], undisturbed.codes[:], atol=1e-5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _inputs_without_a_task(dask_scheduler=None):
    """Keys of data with no task to make it (scattered) that a training's task depends on."""
    return sorted({str(d.key) for ts in dask_scheduler.tasks.values() if str(ts.key).startswith("sae-")
                   for d in ts.dependencies if d.run_spec is None})


def test_a_lost_worker_cannot_take_an_input_of_the_training_with_it(thread_client, small):
    """Every input of the training's tasks is made by a task the scheduler can run again.

    Scattered data is forgotten with its last copy, and the active memory
    manager drops a broadcast's extra copies: a killed worker then took the
    cluster order's index maps, and with them every task of the Z step that
    needed them ('already forgotten', tests/test_distributed.py's killed-worker
    test failed about one run in seven).
    """
    X, L = small
    seen = []
    fit_distributed(X, ModelConfig(n_atoms=8, lambda_g=5.0, max_outer=2, max_inner=5, random_state=4),
                    client=thread_client, laplacian=L, block_size=100, order="cluster",
                    callback=lambda record: seen.append(thread_client.run_on_scheduler(_inputs_without_a_task)))
    assert len(seen) == 2 and seen == [[], []]


def test_pooled_arrays_are_reused_only_once_nothing_references_them():
    pool = memory.ArrayPool()  # not the module's: the in-process workers of this module trim theirs periodically
    first = pool.empty((5, 3), np.float32)
    address = first.ctypes.data
    second = pool.empty((5, 3), np.float32)  # the first is still held
    assert second.ctypes.data != address and first.shape == (5, 3) and first.dtype == np.float32
    view = first[1:]
    del first
    assert pool.empty((5, 3), np.float32).ctypes.data != address  # a view keeps it in use
    del view
    assert pool.empty((5, 3), np.float32).ctypes.data == address  # free again: handed out again
    assert pool.empty((5, 3), np.float64).dtype == np.float64  # one list per shape and dtype
    key = ((4, 2), np.dtype(np.float32).str)
    held = [pool.empty((4, 2), np.float32) for _ in range(6)]
    del held
    pool.empty((4, 2), np.float32)
    assert len(pool.arrays[key]) == 1 + memory.POOL_SPARE  # spare free arrays only
    held = [pool.empty((4, 2), np.float32) for _ in range(6)]
    kept = held[0]
    del held
    pool.trainings = 1
    assert pool.trim() == 3 * 8 * 4  # during a training, without a request: the free arrays beyond the spare ones
    assert len(pool.arrays[key]) == 1 + memory.POOL_SPARE
    assert any(kept.base is a for a in pool.arrays[key])  # one in use is never dropped
    pool.trainings = 0
    del kept, second
    assert pool.trim() == (1 + memory.POOL_SPARE) * 8 * 4 + 3 * 5 * 3 * 4 + 5 * 3 * 8 and not pool.arrays  # after: all


def test_a_block_iteration_is_the_same_from_csr_and_dense_iterates():
    """CSR iterates (densified into pooled arrays) whose next iterate is dense give the dense path's state."""
    X, L = make_data(60)
    rng = np.random.default_rng(1)
    C = rng.random((8, X.shape[1]), dtype=np.float32)
    graph = blocks.graph_block(sp.csr_array(L, dtype=np.float32), [(0, 60)], 0)
    params = dict(lambda_d=1.0, lambda_z=0.01, lambda_g=2.0, lambda_e=0.0, step=1e-3, tuning=Tuning(tile=16))
    problem = zstep.code_problem(0, X, C, None, graph, params)
    x, x_prev = (rng.random((60, 8), dtype=np.float32) * (rng.random((60, 8)) < 0.3) for _ in range(2))
    states = {}
    for name, wrap in (("dense", np.asarray), ("csr", sp.csr_array)):
        start = zstep.CodeState(x=wrap(x), x_prev=wrap(x_prev), P=x @ C, P_prev=x_prev @ C)
        states[name] = zstep.code_iterate(problem, start, [], [], (2.0, 0.4))
    dense, csr = states["dense"], states["csr"]
    assert not sp.issparse(csr.x) and np.count_nonzero(csr.x) > blocks.SPARSE_STATE_DENSITY * csr.x.size
    assert any(csr.x.base is a for a in memory.pool.arrays[(x.shape, x.dtype.str)])  # the state's array: pooled
    np.testing.assert_array_equal(csr.x, dense.x)
    np.testing.assert_array_equal(csr.P, dense.P)
    assert csr.scalars == pytest.approx(dense.scalars, rel=1e-6)


def test_the_stacked_halo_is_its_pieces_one_after_the_other_whatever_they_are():
    """Same-worker states (dense or CSR, x_k or x_{k-1}) cut by their plan, and packs (dense or CSR), written in
    place into one pooled array: equal to stacking the pieces, bit for bit."""
    rng = np.random.default_rng(5)

    def sparse_codes(n):
        codes = rng.standard_normal((n, 6)).astype(np.float32)
        codes[rng.random(codes.shape) < 0.7] = 0
        return codes

    dense, thin = sparse_codes(40), sparse_codes(30)
    dense_prev, thin_prev = sparse_codes(40), sparse_codes(30)
    plan_a, plan_b = {3: np.array([5, 1, 39, 7])}, {3: np.array([0, 29, 4])}
    pack_dense, pack_sparse = {3: sparse_codes(5)}, {3: sp.csr_array(sparse_codes(2))}
    states = (zstep.CodeState(dense, dense_prev), zstep.CodeState(sp.csr_array(thin), sp.csr_array(thin_prev)))
    sources = [(states[0], plan_a), pack_dense, (states[1], plan_b), pack_sparse]
    for previous, (a, b) in ((False, (dense, thin)), (True, (dense_prev, thin_prev))):
        expected = np.vstack([a[plan_a[3]], pack_dense[3], b[plan_b[3]], pack_sparse[3].toarray()])
        for empty in (np.empty, memory.pooled_empty):
            got = zstep._stacked_halo(sources, 3, 6, np.float32, previous=previous, empty=empty)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected)
    assert zstep._stacked_halo([], 3, 6, np.float32).shape == (0, 6)


def test_a_graph_row_is_the_row_of_the_sparse_products():
    """`kernel.graph_row` (neighbour rows added four at a time, then the rest) against scipy's L_own x + L_halo h,
    for rows of 0 to 9 or more entries in each part."""
    rng = np.random.default_rng(3)
    n_rows, n_halo, m = 48, 20, 37
    own = sp.csr_array(sp.random(n_rows, n_rows, density=0.12, random_state=4, dtype=np.float32))
    halo_part = sp.csr_array(sp.random(n_rows, n_halo, density=0.2, random_state=5, dtype=np.float32))
    lengths = np.concatenate([np.diff(own.indptr), np.diff(halo_part.indptr)])
    assert lengths.min() == 0 and lengths.max() >= 9  # empty rows, the four-at-a-time loop and remainders
    x = rng.standard_normal((n_rows, m), dtype=np.float32)
    halo = rng.standard_normal((n_halo, m), dtype=np.float32)
    rows = kernel.GraphRows(own.data, own.indices, own.indptr, halo_part.data, halo_part.indices,
                            halo_part.indptr, halo, halo)
    expected = own @ x + halo_part @ halo
    out = np.empty(m, dtype=np.float32)
    for i in range(n_rows):
        kernel.graph_row(rows, i, x, halo, out)
        np.testing.assert_allclose(out, expected[i], rtol=1e-5, atol=1e-5)


def test_dask_counts_the_memory_of_block_states():
    # Dask spills results to disk by their dask.sizeof: a block state must count its arrays, CSR ones included
    from dask.sizeof import sizeof

    dense = np.ones((100, 64), np.float32)
    sparse = sp.csr_array(np.eye(100, 64, dtype=np.float32))
    state = zstep.CodeState(x=sparse, x_prev=dense, P=np.ones((100, 8), np.float32))
    expected = dense.nbytes + state.P.nbytes + sparse.data.nbytes + sparse.indices.nbytes + sparse.indptr.nbytes
    assert expected <= sizeof(state) <= expected + 4096


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compact_code_blocks_equal_scipy_csr(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 40)) * (rng.random((50, 40)) < 0.05)).astype(dtype)
    x[7] = 0  # an empty row
    compact = blocks.compact(x)
    expected = sp.csr_array(x)
    assert sp.issparse(compact) and compact.dtype == dtype
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(compact, name), getattr(expected, name))
    dense = rng.standard_normal((5, 4)).astype(dtype)
    assert blocks.compact(dense) is dense  # denser than SPARSE_STATE_DENSITY: kept as it is
    with pytest.raises(ValueError, match="not the number of non-zeros"):
        blocks.compact(x, nnz=3)


def test_offloaded_arrays_come_back_from_their_file_and_the_file_is_recycled():
    import pickle

    from dask.sizeof import sizeof

    # not the module's files: the in-process workers trim theirs; chunk: several calls per array, a partial last one
    files = offload.OffloadFiles(memory.ArrayPool(), chunk=2 * memory.DIRECT_ALIGN)
    files.pool.trainings = 1  # free files are kept during a training
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 29)).astype(np.float32)  # 4292 bytes: not a multiple of the alignment
    P = rng.standard_normal((37, 5))
    offloaded = offload.Offloaded((x, P), files)
    capacity = 2 * memory.DIRECT_ALIGN + memory.DIRECT_ALIGN
    assert offloaded.slot.capacity == capacity and files.in_use == 1
    loaded = offloaded.load()
    np.testing.assert_array_equal(loaded[0], x)
    np.testing.assert_array_equal(loaded[1], P)
    assert any(loaded[0].base is a for a in memory.pool.arrays[(x.shape, x.dtype.str)])  # read into a pooled array
    # pickled (a state moved or spilled by Dask): the arrays themselves, and Dask counts them
    resident = pickle.loads(pickle.dumps(offloaded))
    assert isinstance(resident, offload.Resident) and resident.specs == offloaded.specs
    np.testing.assert_array_equal(resident.load()[1], P)
    assert sizeof(resident) >= x.nbytes + P.nbytes
    # the file is free once the object is gone, and written again by the next one of its size
    fd = offloaded.slot.fd
    del offloaded
    assert files.in_use == 0 and [s.fd for s in files.free[capacity]] == [fd]
    again = offload.Offloaded((x[::-1].copy(), P), files)
    assert again.slot.fd == fd and not files.free.get(capacity)
    np.testing.assert_array_equal(again.load()[0], x[::-1])
    del again
    assert files.trim(0) == capacity and not files.free
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the unlinked file is gone
    # pooled arrays go to and from the file directly (page-aligned, whole), others through a buffer
    assert offload.direct_extent(loaded[0]).nbytes == 2 * memory.DIRECT_ALIGN and offload.direct_extent(x) is None
    assert offload.direct_extent(loaded[0].base[:10]) is None  # a part: the rounded-up read would write past it
    copy = offload.Offloaded(loaded, files)
    np.testing.assert_array_equal(copy.load(prefetch_next=False)[0], x)
    # arrays appended later (x_{k+1} C, after the kernel), in the room reserved; read ahead only once complete
    grown = offload.Offloaded((x,), files, reserve=P.nbytes, complete=False)
    with pytest.raises(ValueError, match="no room left"):
        grown.append(np.zeros(P.size + 1024))
    grown.append(P)
    assert not grown.sequence
    grown.complete()
    assert grown.sequence > copy.sequence
    np.testing.assert_array_equal(grown.load()[1], P)
    with pytest.raises(ValueError, match="cannot append to a complete"):
        grown.append(P)


@pytest.mark.parametrize("lambda_d", [1.0, 0.0])
def test_a_block_iteration_is_the_same_with_the_previous_iterate_on_disk(lambda_d):
    """FISTA iterations with x_{k-1} (and x_{k-1} C) offloaded give the in-memory states bit for bit."""
    X, L = make_data(60)
    rng = np.random.default_rng(1)
    C = rng.random((8, X.shape[1]), dtype=np.float32)
    E = rng.random((8, X.shape[1]), dtype=np.float32)
    graph = blocks.graph_block(sp.csr_array(L, dtype=np.float32), [(0, 60)], 0)
    assert graph.own.indices.dtype == graph.own.indptr.dtype == np.int32  # the blocks stay in memory: narrow
    states = {}
    for on_disk in (False, True):
        params = dict(lambda_d=lambda_d, lambda_z=1e-3, lambda_g=2.0, lambda_e=0.5, step=1e-2,
                      offload_previous=on_disk)
        problem = zstep.code_problem(0, X, C, E, graph, params)
        state, momentum, trail = zstep.CodeState(x=np.zeros((60, 8), np.float32)), zstep.first_momentum(), []
        for _ in range(5):
            state = zstep.code_iterate(problem, state, [], [], momentum)
            momentum = zstep.block_momentum(momentum, [state.scalars])
            trail.append((state.x.copy(), state.scalars))
        states[on_disk] = (state, trail)
    (in_memory, memory_trail), (disk, disk_trail) = states[False], states[True]
    assert isinstance(disk.x_prev, offload.Offloaded) and disk.P is None and disk.P_prev is None
    assert len(disk.x_prev.specs) == (3 if lambda_d else 1)  # x_{k-1}, and x_{k-1} C, x_k C
    assert memory_trail[-1][1]["momentum_used"]  # the loaded x_{k-1} was used
    for (x_memory, scalars_memory), (x_disk, scalars_disk) in zip(memory_trail, disk_trail):
        np.testing.assert_array_equal(x_disk, x_memory)
        assert scalars_disk == scalars_memory
    np.testing.assert_array_equal(zstep.state_solution(disk), in_memory.x_prev)
    if lambda_d:
        np.testing.assert_array_equal(disk.x_prev.load()[1], in_memory.P_prev)
        np.testing.assert_array_equal(disk.x_prev.load()[2], in_memory.P)


def test_previous_iterates_on_disk_give_the_same_fit(thread_client, small):
    from sae.config import TrainConfig
    from sae.store.keys import model_key

    X, L = small
    config = ModelConfig(n_atoms=8, lambda_g=5.0, lambda_e=1.0, max_outer=2, max_inner=10, random_state=0)
    kwargs = dict(client=thread_client, laplacian=L, block_size=_blocks(len(X), 3), return_codes=True)
    memory = fit_distributed(X, config, **kwargs)
    disk = fit_distributed(X, config, offload_previous=True, **kwargs)
    assert len(memory.history) == len(disk.history)
    for a, b in zip(memory.history, disk.history):
        timeless = [{k: v for k, v in record.items() if "seconds" not in k} for record in (a, b)]
        assert timeless[0].keys() == timeless[1].keys()
        for name, value in timeless[0].items():  # equal to the bit (NaN where a term is off)
            other = timeless[1][name]
            assert value == other or (value != value and other != other), (name, value, other)
    np.testing.assert_array_equal(disk.codes, memory.codes)
    np.testing.assert_array_equal(disk.components, memory.components)
    # how the training runs, not what it computes: the same stored model
    assert model_key(TrainConfig(offload_previous=True), "p") == model_key(TrainConfig(), "p")


def test_loading_an_offloaded_block_reads_the_next_one_ahead():
    files = offload.OffloadFiles(memory.ArrayPool())
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((40, 16)).astype(np.float32) for _ in range(3)]
    first, second, third = (offload.Offloaded((x,), files) for x in blocks)
    assert first.sequence < second.sequence < third.sequence
    np.testing.assert_array_equal(first.load()[0], blocks[0])
    # the next one in order of creation is read by the I/O thread, not the one after
    assert second.prefetched is not None and third.prefetched is None
    ahead = second.prefetched.result()[0]
    loaded = second.load()[0]
    assert loaded is ahead and second.prefetched is None  # the read-ahead arrays are handed over once
    np.testing.assert_array_equal(loaded, blocks[1])
    assert third.prefetched is not None
    del second, loaded, ahead
    np.testing.assert_array_equal(third.load(prefetch_next=False)[0], blocks[2])
    np.testing.assert_array_equal(third.load()[0], blocks[2])  # read again when nothing was read ahead
    assert first.prefetched is None  # only later ones are read ahead
    first.load()  # the next one was loaded already: not read again
    assert third.prefetched is None


def _offload_file_and_worker_directory() -> tuple[str, str]:
    from distributed import get_worker

    offloaded = offload.offload_async((np.ones((10, 3), np.float32),)).result()
    return os.readlink(f"/proc/self/fd/{offloaded.slot.fd}"), get_worker().local_directory


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_offload_files_go_to_the_worker_local_directory(thread_client):
    # written by the I/O thread, which does not know the worker: the task's thread picks the directory
    path, directory = thread_client.submit(_offload_file_and_worker_directory, pure=False).result()
    assert path.startswith(directory + os.sep) and path.endswith("(deleted)")  # unlinked
