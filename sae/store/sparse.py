"""Sparse matrices inside a stage group, as CSR sub-groups of three 1-D arrays."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import zarr

from sae.store.layout import _check_name, create_array


def write_sparse(
    group: zarr.Group,
    name: str,
    matrix: sp.sparray | sp.spmatrix,
    *,
    chunk_entries: int = 1 << 20,
    chunk_rows: int = 1 << 16,
) -> zarr.Group:
    """Store a sparse matrix as CSR: sub-group ``name`` with three 1-D arrays.

    ``indptr`` int64 (n_rows + 1), ``indices`` int32 (nnz), ``data`` float32 (nnz),
    attributes ``shape``, ``nnz`` and ``format`` ("csr").  Row i holds
    ``indices[indptr[i]:indptr[i+1]]``, so `read_sparse` can read a range of
    rows without reading the rest.  Indices are sorted within rows.
    """
    _check_name("name", name)
    csr = sp.csr_array(matrix, copy=True)
    csr.sum_duplicates()
    if csr.shape[1] > np.iinfo(np.int32).max:
        raise ValueError(f"matrix has {csr.shape[1]} columns; at most {np.iinfo(np.int32).max} fit int32 indices")
    if name in group:
        del group[name]
    sub = group.create_group(name)
    for array_name, values, chunk in (
        ("indptr", csr.indptr.astype(np.int64), chunk_rows + 1),
        ("indices", csr.indices.astype(np.int32), chunk_entries),
        ("data", csr.data.astype(np.float32), chunk_entries),
    ):
        create_array(sub, array_name, shape=values.shape, chunks=(max(1, min(chunk, values.size)),),
                     dtype=values.dtype, data=values)
    sub.attrs.update({"format": "csr", "shape": [int(s) for s in csr.shape], "nnz": int(csr.nnz)})
    return sub


def read_sparse(group: zarr.Group, name: str, rows: slice | None = None) -> sp.csr_array:
    """Read a matrix written by `write_sparse`, optionally only the rows ``rows`` (step 1).

    Returns
    -------
    scipy.sparse.csr_array
        float32, of shape (n_rows_selected, n_cols).
    """
    if name not in group:
        raise KeyError(f"group {group.path!r} has no sparse matrix {name!r}")
    sub = group[name]
    if sub.attrs.get("format") != "csr":
        raise ValueError(f"{name!r} is not a CSR matrix written by write_sparse")
    n_rows, n_cols = sub.attrs["shape"]
    start, stop, step = (rows or slice(None)).indices(n_rows)
    if step != 1:
        raise ValueError(f"rows must be a slice with step 1, got step {step}")
    stop = max(start, stop)
    indptr = sub["indptr"][start : stop + 1]
    lo, hi = int(indptr[0]), int(indptr[-1])
    indices = sub["indices"][lo:hi] if hi > lo else np.zeros(0, np.int32)
    data = sub["data"][lo:hi] if hi > lo else np.zeros(0, np.float32)
    return sp.csr_array((data, indices, indptr - lo), shape=(stop - start, n_cols))
