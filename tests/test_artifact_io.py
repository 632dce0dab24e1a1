"""The model folder's large arrays are exported by blocks: the same files as whole-array writes, never whole in
memory (`sae.artifact.save_rows`, the degrees of a stored graph by blocks of rows)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from sae.artifact import _degrees, save_rows
from sae.graph import degree_vector
from sae.store import write_sparse


@pytest.mark.parametrize("shape, dtype, chunks", [((1000, 7), np.float32, (33, 7)), ((1001,), np.float64, (250,)),
                                                  ((0, 5), np.float32, (10, 5))])
@pytest.mark.parametrize("block_bytes", [1, 97 * 7 * 4, 1 << 30])
def test_a_stored_array_is_written_by_blocks_as_numpy_saves_it_whole(rng, tmp_path, shape, dtype, chunks,
                                                                      block_bytes):
    values = rng.normal(size=shape).astype(dtype)
    stored = zarr.create_array(str(tmp_path / "x.zarr"), shape=shape, chunks=chunks, dtype=dtype)
    stored[...] = values
    save_rows(tmp_path / "blocks.npy", stored, block_bytes=block_bytes)
    np.save(tmp_path / "whole.npy", values)
    assert (tmp_path / "blocks.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    loaded = np.load(tmp_path / "blocks.npy", allow_pickle=False)
    assert loaded.dtype == dtype and loaded.shape == shape
    np.testing.assert_array_equal(loaded, values)


@pytest.mark.parametrize("block_rows", [1, 7, 1 << 20])
def test_the_degrees_of_a_stored_graph_read_by_blocks_are_those_of_the_whole(rng, tmp_path, block_rows):
    adjacency = sp.random_array((50, 50), density=0.2, random_state=0, format="csr", dtype=np.float32)
    adjacency = (adjacency + adjacency.T).tocsr()
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    write_sparse(group, "adjacency", adjacency, chunk_entries=16, chunk_rows=8)
    np.testing.assert_array_equal(_degrees(group, "adjacency", block_rows=block_rows), degree_vector(adjacency))
