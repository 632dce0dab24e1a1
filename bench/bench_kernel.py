"""Where the time of one graph Z-step iteration goes: the compiled block pass against its matrix products.

One block of the distributed Z step (`sae.distributed.kernel.block_iterate`,
N_b rows, m atoms, n bins, float32, one thread), dense iterates as in the
first outer iterations, timed as a whole and with its parts switched off:

- ``products``: the two (N_b, m) x (m, n) matrix products alone (numpy, the
  same BLAS), i.e. the 4 N_b m n flops the training bench counts;
- ``no graph``: the pass without the graph term (products, residual, forward
  step, threshold, restart sums);
- ``graph, temporal``: with a kNN graph whose neighbours are the nearest
  frames in time (what `bench/bench_train.py` generates: neighbour rows are
  in cache);
- ``graph, scattered``: with neighbours drawn at random within the block (a
  kNN graph of real music links frames far apart in time: neighbour rows come
  from memory).

It prints the median time per call, the share of the products, and the
machine's float32 GEMM throughput (one thread) for reference::

    python bench/bench_kernel.py                     # N_b = 161,000, m = 512 (a block at GTZAN scale)
    python bench/bench_kernel.py --rows 40000 --repeats 3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one worker thread, as the trainer's single-threaded workers
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from _timing import timed  # noqa: E402
from sae.distributed.kernel import (  # noqa: E402
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
from sae.graph import laplacian_from_neighbors  # noqa: E402


def temporal_neighbors(n_rows: int, k: int) -> np.ndarray:
    """Row i's neighbours: the k nearest rows in time (i +- 1, i +- 2, ...), clipped at the ends."""
    offsets = np.array([(j // 2 + 1) * (1 if j % 2 == 0 else -1) for j in range(k)])
    indices = np.arange(n_rows)[:, None] + offsets[None, :]
    return np.where((indices < 0) | (indices >= n_rows), np.arange(n_rows)[:, None] - offsets[None, :], indices)


def scattered_neighbors(n_rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Row i's neighbours: k rows drawn at random (not i)."""
    indices = rng.integers(0, n_rows - 1, size=(n_rows, k))
    return indices + (indices >= np.arange(n_rows)[:, None])


def laplacian(indices: np.ndarray) -> sp.csr_array:
    """The normalised Laplacian of the symmetrised kNN graph of ``indices`` (equal weights, self-loops)."""
    distances = np.ones(indices.shape, dtype=np.float32)  # the exp kernel of equal distances: equal weights
    return laplacian_from_neighbors(indices, distances)


def gemm_gflops(rng: np.random.Generator, size: int = 2048) -> float:
    """The machine's float32 GEMM throughput on one thread (median of 5), GFLOP/s."""
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    seconds, _ = timed(lambda: a @ b, 5)
    return 2 * size ** 3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=161_000, help="rows of the block (N_b)")
    parser.add_argument("--atoms", type=int, default=512)
    parser.add_argument("--bins", type=int, default=96)
    parser.add_argument("--neighbors", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    N, m, n = args.rows, args.atoms, args.bins
    f32 = np.float32
    X = rng.random((N, n), dtype=f32)
    C = (rng.standard_normal((m, n), dtype=f32) / np.sqrt(n)).astype(f32)
    x = rng.standard_normal((N, m), dtype=f32)
    x_prev = x + 0.01 * rng.standard_normal((N, m), dtype=f32)
    P, P_prev = x @ C, x_prev @ C
    none = np.zeros((0, 0), dtype=f32)
    coefficients = Coefficients(f32(0.5), f32(10.0), f32(100.0), f32(0.0), f32(1e-3), f32(1e-3))
    work = Work(np.empty((ITERATE_TILE, n), f32), np.empty((ITERATE_TILE, m), f32), np.empty_like(x),
                np.empty_like(P))
    index = np.zeros(1, dtype=np.int64)
    no_graph = GraphRows(np.zeros(0), index[:0], index, np.zeros(0), index[:0], index, none, none)

    def graph_rows(L: sp.csr_array) -> GraphRows:
        return GraphRows(L.data, L.indices, L.indptr, np.zeros(0), index[:0], np.zeros(N + 1, dtype=L.indptr.dtype),
                         none, none)

    graphs = {
        "graph, temporal": graph_rows(laplacian(temporal_neighbors(N, args.neighbors))),
        "graph, scattered": graph_rows(laplacian(scattered_neighbors(N, args.neighbors, rng))),
    }
    iterates = Iterates(x, x_prev, P, P_prev)
    reconstruction = Reconstruction(X, C, np.ascontiguousarray(C.T))

    def run(rows: GraphRows) -> np.ndarray:
        terms = Terms(True, True, rows.own_data.size > 0, False, False)
        return block_iterate(iterates, reconstruction, rows, none, coefficients, terms, work)

    for rows in (no_graph, *graphs.values()):
        run(rows)  # compile (or load from numba's cache) each signature before timing
    products_out = np.empty((N, m), f32)

    def products() -> None:
        residual = P - X
        np.dot(residual, reconstruction.CT, products_out)
        np.dot(products_out, C, work.P_out)

    flops = 4 * N * m * n
    peak = gemm_gflops(rng)
    print(f"block N_b = {N:,}, m = {m}, n = {n}, K = {args.neighbors}, one thread; float32 GEMM {peak:.1f} GFLOP/s"
          f"; medians of {args.repeats}")
    seconds, _ = timed(products, args.repeats)
    print(f"  {'products':18s} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s "
          f"({100 * flops / seconds / 1e9 / peak:.0f}% of GEMM)")
    base = seconds
    for name, rows in {"no graph": no_graph, **graphs}.items():
        seconds, sums = timed(lambda rows=rows: run(rows), args.repeats)
        assert np.isfinite(sums[SUMS.index("l1")])
        print(f"  {name:18s} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s "
              f"({100 * flops / seconds / 1e9 / peak:.0f}% of GEMM; products {100 * base / seconds:.0f}% of the time)")


if __name__ == "__main__":
    main()
