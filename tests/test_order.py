"""The order of the frames in the blocks of a graph training (`sae.distributed.order`), on real Dask clusters."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from sae.config import ModelConfig
from sae.distributed import LaplacianRef, fit_distributed, read_checkpoint
from sae.distributed.blocks import graph_block, graph_summary, read_laplacian_rows
from sae.distributed.order import (
    Ordering,
    assemble_sparse_rows,
    cluster_order,
    halo_plans,
    halo_wants,
    laplacian_rows,
    move_rows,
)
from sae.model import fit_sae
from sae.store import write_sparse
from tests.test_distributed import make_data


@pytest.fixture(scope="module")
def shuffled():
    """Frames whose stored order says nothing of their neighbours (as clips of different music), with their
    normalised kNN Laplacian."""
    X, L = make_data(600, seed=3)
    perm = np.random.default_rng(0).permutation(600)
    return X[perm], sp.csr_array(L[perm][:, perm])


def _halo_rows(L, ordering):
    """Halo rows of the blocks as the trainer would build them from ``ordering``."""
    relabel = ordering.relabel()
    bounds = list(zip(np.cumsum([0] + ordering.sizes[:-1]), np.cumsum(ordering.sizes)))
    return sum(graph_summary(graph_block(laplacian_rows(L, rows, relabel, "float32"), bounds, b))["halo_rows"]
               for b, rows in enumerate(ordering.members))


def test_cluster_order_puts_neighbours_in_the_same_block(shuffled):
    X, L = shuffled
    order = cluster_order(X, 4, random_state=0)
    assert np.array_equal(np.sort(order), np.arange(len(X)))
    stored, clustered = Ordering(len(X), 150), Ordering(len(X), 150, order)
    assert [len(rows) for rows in clustered.members] == [150] * 4
    # a random order keeps ~1/4 of the links in their block; the clusters keep most of them
    assert stored.in_block_share(L) < 0.35
    assert clustered.in_block_share(L) > 0.6
    assert _halo_rows(L, clustered) < 0.6 * _halo_rows(L, stored)


def test_the_halo_known_before_the_rows_move_is_the_halo_of_the_blocks(shuffled):
    """`halo_wants` on the stored (natural) chunks of L, then `halo_plans`, give each block the non-zeros and
    the rows of every other block that `graph_block` finds once the rows are in the blocks' order."""
    X, L = shuffled
    ordering = Ordering(600, 150, cluster_order(X, 4, random_state=0))
    relabel, bounds = ordering.relabel(), [(start, start + 150) for start in range(0, 600, 150)]
    chunks = [(L[start:stop], start) for start, stop in [(0, 100), (100, 350), (350, 351), (351, 600)]]
    preview = halo_plans(4, *[halo_wants(rows, start, ordering.block_of) for rows, start in chunks])
    after = [graph_summary(graph_block(laplacian_rows(L, rows, relabel, "float32"), bounds, b))
             for b, rows in enumerate(ordering.members)]
    assert preview == [(summary["nnz"], summary["requests"]) for summary in after]
    assert sum(sum(requests.values()) for _, requests in preview) == _halo_rows(L, ordering) > 0


def test_the_maps_of_an_ordering_agree_with_its_blocks():
    order = np.random.default_rng(1).permutation(23)
    ordering = Ordering(23, 5, order)
    assert [rows.tolist() for rows in ordering.members] == [sorted(order[s:s + 5].tolist()) for s in range(0, 23, 5)]
    relabel = ordering.relabel()
    blocked = np.concatenate(ordering.members)
    assert np.array_equal(relabel[blocked], np.arange(23))  # natural row -> its row in the blocks' order
    chunk, position = ordering.chunk_maps()
    assert np.array_equal(chunk * 5 + position, np.arange(23))
    with pytest.raises(ValueError, match="permutation"):
        Ordering(23, 5, np.zeros(23, dtype=int))


def test_the_rows_of_the_laplacian_in_the_blocks_order_are_those_of_p_l_pt(thread_client, shuffled, tmp_path):
    """In memory (`laplacian_rows`) and from the store, read by chunks and moved to the blocks (`move_rows`)."""
    _, L = shuffled
    ordering = Ordering(600, 150, cluster_order(shuffled[0], 4, random_state=0))
    blocked = np.concatenate(ordering.members)
    permuted = sp.csr_array(L[blocked][:, blocked], dtype=np.float32)  # P L P^T, directly
    relabel = ordering.relabel()
    in_memory = sp.vstack([laplacian_rows(L, members, relabel, "float32") for members in ordering.members])
    assert abs(in_memory - permuted).max() == 0
    group = zarr.open_group(str(tmp_path / "graph.zarr"), mode="w")
    write_sparse(group, "laplacian", L)
    bounds = [(start, start + 150) for start in range(0, 600, 150)]
    chunks = [thread_client.submit(read_laplacian_rows, LaplacianRef(group, "laplacian"), start, stop, "float32")
              for start, stop in bounds]
    moved = move_rows(thread_client, chunks, [np.arange(start, stop) for start, stop in bounds], ordering.members,
                      ordering.block_of, thread_client.scatter([ordering.block_of, ordering.position], broadcast=True),
                      600, "float32", density=None, key="test-L", relabel=thread_client.scatter(relabel))
    blocks = thread_client.gather(moved)
    assert all(sp.issparse(block) and block.has_sorted_indices for block in blocks)
    assert abs(sp.vstack(blocks) - permuted).max() == 0
    # pieces in any order land at their positions; a missing row is an error, not a row of zeros
    rows = sp.random_array((5, 6), density=0.5, format="csr", dtype=np.float32, rng=0)
    pieces = [(np.array([3, 0]), rows[[3, 0]]), (np.array([4, 1, 2]), rows[[4, 1, 2]])]
    assert abs(assemble_sparse_rows(5, 6, np.arange(6), "float32", *pieces) - rows).max() == 0
    with pytest.raises(ValueError, match="not the 5 rows"):
        assemble_sparse_rows(5, 6, np.arange(6), "float32", *pieces[:1])
    with pytest.raises(ValueError, match="not the 5 rows"):
        assemble_sparse_rows(5, 6, np.arange(6), "float32")
    assert assemble_sparse_rows(0, 6, np.arange(6), "float32").shape == (0, 6)


def test_rows_moved_between_chunks_and_blocks_land_where_numpy_puts_them(thread_client):
    rng = np.random.default_rng(2)
    values = rng.random((23, 4)).astype(np.float32)
    ordering = Ordering(23, 5, rng.permutation(23))
    chunks_rows = [np.arange(s, min(s + 5, 23)) for s in range(0, 23, 5)]
    chunks = [thread_client.scatter(values[rows]) for rows in chunks_rows]
    to_blocks = thread_client.scatter([ordering.block_of, ordering.position], broadcast=True)
    blocks = move_rows(thread_client, chunks, chunks_rows, ordering.members, ordering.block_of, to_blocks, 4,
                       "float32", density=None, key="test-blocks")
    for rows, block in zip(ordering.members, thread_client.gather(blocks)):
        np.testing.assert_array_equal(block, values[rows])
    back = move_rows(thread_client, blocks, ordering.members, chunks_rows, ordering.chunk_maps()[0],
                     thread_client.scatter(list(ordering.chunk_maps()), broadcast=True), 4, "float32", density=1.0,
                     key="test-chunks")
    np.testing.assert_array_equal(np.vstack([b.toarray() for b in thread_client.gather(back)]), values)


def test_a_fit_in_cluster_order_is_the_fit_in_stored_order(thread_client, shuffled, tmp_path, caplog):
    """Same objective as in memory and in the stored order; codes checkpointed and resumed in the store's order."""
    X, L = shuffled
    stored_X = zarr.open_group(str(tmp_path / "data.zarr"), mode="w").create_array(
        "X", shape=X.shape, chunks=(150, X.shape[1]), dtype=X.dtype)
    stored_X[:] = X
    graph = zarr.open_group(str(tmp_path / "graph.zarr"), mode="w")
    write_sparse(graph, "laplacian", L)
    laplacian = LaplacianRef(graph, "laplacian", kind="normalized")
    config = ModelConfig(n_atoms=8, lambda_g=5.0, lambda_e=1.0, max_outer=3, max_inner=30, rtol=1e-9, random_state=0)
    reference = fit_sae(X, config, L)
    with caplog.at_level(logging.INFO, logger="sae.distributed"):
        clustered = fit_distributed(stored_X, config, client=thread_client, laplacian=laplacian, block_size=150,
                                    laplacian_norm="power", return_codes=True)
    assert "frames ordered by k-means cluster for 4 blocks" in caplog.text
    halo = [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("halo:")]
    stored = fit_distributed(stored_X, config, client=thread_client, laplacian=laplacian, block_size=150,
                             laplacian_norm="power", order="stored", return_codes=True)
    for fit in (clustered, stored):
        np.testing.assert_allclose([r["total"] for r in fit.history], [r["total"] for r in reference.history],
                                   rtol=1e-4)
    np.testing.assert_allclose(clustered.codes, reference.codes, atol=1e-3)  # natural order
    np.testing.assert_allclose(clustered.codes, stored.codes, atol=1e-4)

    group = zarr.open_group(str(tmp_path / "model.zarr"), mode="w")
    fit_distributed(stored_X, config.model_copy(update={"max_outer": 2}), client=thread_client, laplacian=laplacian,
                    block_size=150, laplacian_norm="power", checkpoint=group)
    resumed = fit_distributed(stored_X, config, client=thread_client, laplacian=laplacian, block_size=150,
                              laplacian_norm="power", checkpoint=group)
    assert resumed.resumed_from == 2 and read_checkpoint(group)["iteration"] == 3
    np.testing.assert_allclose([r["total"] for r in resumed.history], [r["total"] for r in clustered.history],
                               rtol=1e-6)
    np.testing.assert_allclose(resumed.codes[:], clustered.codes, atol=1e-5)
    with caplog.at_level(logging.INFO, logger="sae.distributed"):
        caplog.clear()
        fit_distributed(stored_X, config.model_copy(update={"max_outer": 1}), client=thread_client,
                        laplacian=laplacian, block_size=150, order="stored")
    halo_stored = [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("halo:")]
    assert halo[0] < 0.6 * halo_stored[0]


def test_checkpoints_keep_the_blocks_order_until_the_last_which_is_in_the_frames_order(thread_client, shuffled,
                                                                                       tmp_path):
    """No row moves between outer iterations; an interrupted run resumes from them, in any order; the result and
    `open_model` see the frames' order."""
    from sae.distributed import open_model

    X, L = shuffled
    config = ModelConfig(n_atoms=8, lambda_g=5.0, max_outer=3, max_inner=30, rtol=1e-9, random_state=0)
    straight = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=150, laplacian_norm="power",
                               return_codes=True)

    class Interrupt(RuntimeError):
        pass

    def interrupt(record):
        if record["iteration"] == 2:
            raise Interrupt

    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    group = root.require_group("model").require_group("k")
    with pytest.raises(Interrupt):
        fit_distributed(X, config, client=thread_client, laplacian=L, block_size=150, laplacian_norm="power",
                        checkpoint=group, callback=interrupt)
    state = read_checkpoint(group)
    assert state["iteration"] == 2 and state["frame_of_row"] is not None
    members = Ordering(600, 150, cluster_order(X, 4, random_state=0)).members
    assert np.array_equal(state["frame_of_row"], np.concatenate(members))
    # the stored rows are the blocks' rows: row i holds frame frame_of_row[i]
    codes = state["codes"][:]
    assert np.abs(codes).sum() > 0
    assert open_model(root, "k")["codes"] is None  # not in the frames' order: no reader may take them as such

    for order in ("stored", "cluster"):  # resumed in another order (rows move), or in the same (they do not)
        resumed_group = root["model"].require_group(f"k-{order}")
        for name, value in group.attrs.items():
            resumed_group.attrs[name] = value
        for slot in ("checkpoint_0", "checkpoint_1"):
            if slot in group:
                target = resumed_group.require_group(slot)
                for array in group[slot].array_keys():
                    source = group[slot][array]
                    target.create_array(array, shape=source.shape, chunks=source.chunks, dtype=source.dtype)[...] = \
                        source[...]
        resumed = fit_distributed(X, config, client=thread_client, laplacian=L, block_size=150,
                                  laplacian_norm="power", order=order, checkpoint=resumed_group)
        assert resumed.resumed_from == 2 and resumed.n_iter == 3
        final = read_checkpoint(resumed_group)
        assert final["frame_of_row"] is None  # the last one: the frames' order
        np.testing.assert_allclose(resumed.history[-1]["total"], straight.history[-1]["total"], rtol=1e-5)
        np.testing.assert_allclose(final["codes"][:], straight.codes, atol=1e-4)
