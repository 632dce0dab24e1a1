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

With ``--store`` (and ``--graph KEY``, default the store's only graph), the
block is a real one: the frames of the stored graph ordered by k-means
cluster as the trainer orders them (`sae.distributed.order.cluster_order`,
blocks of ``--block-size``), block ``--block`` of them, with its own rows of
the stored Laplacian, timed in the block's order (the store's within it) and
in a bandwidth-reducing order (scipy's reverse Cuthill-McKee), alone and two
passes at once on two threads (what two single-threaded workers, or an
in-process cluster of two threads, run).

It prints the median time per call, the share of the products, and the
machine's float32 GEMM throughput (one thread) for reference::

    python bench/bench_kernel.py                     # N_b = 161,000, m = 512 (a block at GTZAN scale)
    python bench/bench_kernel.py --rows 40000 --repeats 3
    python bench/bench_kernel.py --store dev.zarr    # a block of real music (the development set)
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


def stored_block(store: str, graph: str | None, block_size: int, block: int | None) -> sp.csr_array:
    """The own rows of L of one block of a stored graph's frames in the trainer's cluster order (sorted frames)."""
    from sae.distributed.order import Ordering, cluster_order
    from sae.preprocess import open_preprocessed
    from sae.store import open_store, stage_group
    from sae.store.sparse import read_sparse

    graphs = sorted(open_store(store)["graph"].group_keys()) if graph is None else [graph]
    if len(graphs) != 1:
        raise SystemExit(f"--store has graphs {graphs}: name one with --graph")
    group = stage_group(store, "graph", graphs[0], mode="r")
    L = read_sparse(group, "laplacian")
    X = open_preprocessed(store, group.attrs["preprocess"])["X"]
    n_blocks = -(-L.shape[0] // block_size)
    members = Ordering(L.shape[0], block_size, cluster_order(X, n_blocks)).members
    rows = members[n_blocks // 2 if block is None else block]
    own = sp.csr_array(L[rows][:, rows])
    own.sort_indices()
    print(f"graph/{graphs[0]}: {L.shape[0]:,} frames, {n_blocks} blocks of {block_size:,}; block "
          f"{n_blocks // 2 if block is None else block}: {len(rows):,} frames, {100 * own.nnz / L[rows].nnz:.0f} % "
          f"of its links inside it")
    return own


def in_rows_of(matrix: sp.csr_array, width: int) -> float:
    """The share of the off-diagonal non-zeros of ``matrix`` within ``width`` rows of the diagonal."""
    coo = sp.coo_array(matrix)
    off = coo.row != coo.col
    return float(np.mean(np.abs(coo.row[off] - coo.col[off]) < width))


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
    parser.add_argument("--store", default=None, help="time a real block: the graph of this store (see above)")
    parser.add_argument("--graph", default=None, help="key of graph/<key> in --store (default: its only graph)")
    parser.add_argument("--block-size", type=int, default=50_000, help="frames per block (the trainer's default)")
    parser.add_argument("--block", type=int, default=None, help="which block (default: the middle one)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stored = None
    if args.store is not None:
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        stored = stored_block(args.store, args.graph, args.block_size, args.block)
        order = reverse_cuthill_mckee(stored, symmetric_mode=True)
        reordered = sp.csr_array(stored[order][:, order])
        reordered.sort_indices()
        args.rows = stored.shape[0]
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
    if stored is not None:
        for name, matrix in (("stored", stored), ("stored, RCM", reordered)):
            print(f"  {name}: {100 * in_rows_of(matrix, 64):.0f} % of the links within 64 rows")
        graphs = {"graph, stored": graph_rows(stored), "graph, stored, RCM": graph_rows(reordered)}
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
    if stored is not None:  # two passes at once, each on its own copy of the iterates and buffers (two workers)
        from concurrent.futures import ThreadPoolExecutor

        copies = [(Iterates(*(a.copy() for a in iterates)),
                   Work(*(np.empty_like(a) for a in work))) for _ in range(2)]
        rows = graphs["graph, stored"]
        terms = Terms(True, True, True, False, False)

        def pair(pool: ThreadPoolExecutor) -> None:
            for future in [pool.submit(block_iterate, state, reconstruction, rows, none, coefficients, terms, buffers)
                           for state, buffers in copies]:
                future.result()

        with ThreadPoolExecutor(2) as pool:
            seconds, _ = timed(lambda: pair(pool), args.repeats)
        print(f"  {'two at once':18s} {seconds * 1e3:8.1f} ms  for the pair (graph, stored; two threads)")


if __name__ == "__main__":
    main()
