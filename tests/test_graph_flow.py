"""The graph flow: stored Laplacian equals the in-memory one from exact kNN on the same frames."""

import numpy as np
import pytest
import scipy.sparse as sp
from prefect_dask import DaskTaskRunner
from sklearn.neighbors import NearestNeighbors

from flows._dask import LOOPBACK
from flows.graph import run_graph_flow
from sae import store
from sae.config import CQTConfig, GraphConfig, PreprocessConfig
from sae.graph import laplacian_from_neighbors, open_graph
from sae.preprocess import open_preprocessed

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def store_path(tmp_path, rng):
    """A store of 12 clips of low-rank + noise CQT-like frames, one clip failed."""
    cqt = CQTConfig(clip_samples=22050, n_bins=16)
    labels = ("blues", "jazz")
    clips = [(f"{labels[i % 2]}/c{i}", f"c{i}.wav", labels[i % 2]) for i in range(12)]
    path = tmp_path / "g.zarr"
    group = store.create_store(path, cqt, clips, chunk_clips=5)
    n_frames = store.store_frames_per_clip(group)
    basis = np.abs(rng.standard_normal((4, 16)))
    for chunk in range(store.n_chunks(group)):
        n = len(store.chunk_clips_range(group, chunk)) * n_frames
        frames = np.abs(rng.random((n, 4)) @ basis + 0.1 * rng.standard_normal((n, 16)))
        store.write_chunk_frames(group, chunk, frames.astype(np.float32))
    store.update_clips(
        group,
        [{"index": i, "status": "error" if i == 3 else "ok", "n_frames": 0 if i == 3 else n_frames,
          "error_kind": "corrupt" if i == 3 else "", "error": ""} for i in range(12)],
    )
    return str(path)


def _in_memory_laplacian(X, config):
    distances, indices = NearestNeighbors(n_neighbors=config.n_neighbors, algorithm="brute").fit(X).kneighbors()
    return laplacian_from_neighbors(
        indices, distances, kernel=config.kernel, sigma_factor=config.sigma_factor,
        self_loops=config.self_loops, laplacian=config.laplacian,
    )


@pytest.mark.parametrize(
    "graph",
    [
        GraphConfig(method="exact", block_size=100),
        GraphConfig(method="exact", block_size=64, n_neighbors=5, kernel="gaussian", laplacian="combinatorial",
                    self_loops=False),
    ],
)
def test_stored_laplacian_equals_in_memory(store_path, graph):
    preprocess = PreprocessConfig(frames_per_clip=20)
    out = run_graph_flow(store_path, preprocess, graph)
    assert out["preprocess"]["n_rows"] == 11 * 20
    X = open_preprocessed(store_path, out["preprocess"]["key"])["X"][:].astype(np.float64)
    group = open_graph(store_path, out["graph"]["key"])
    L = store.read_sparse(group, "laplacian")
    expected = _in_memory_laplacian(X, graph)
    assert L.shape == (220, 220) and L.dtype == np.float32
    np.testing.assert_allclose(L.toarray(), expected.toarray(), atol=1e-5)
    assert abs(L - L.T).max() == 0
    dense = L.toarray().astype(np.float64)
    if graph.laplacian == "combinatorial":
        np.testing.assert_allclose(dense.sum(axis=1), 0, atol=1e-4)
    else:
        eigenvalues = np.linalg.eigvalsh(dense)
        assert eigenvalues.min() > -1e-4 and eigenvalues.max() < 2 + 1e-4
    W = store.read_sparse(group, "adjacency")
    assert abs(W - W.T).max() == 0
    assert np.all(W.diagonal() == (1.0 if graph.self_loops else 0.0))
    assert group["indices"].shape == (220, graph.n_neighbors)
    assert group.attrs["config"] == graph.model_dump(mode="json")
    assert group.attrs["recall"] is None  # exact: nothing to measure
    again = run_graph_flow(store_path, preprocess, graph)
    assert again["preprocess"]["skipped"] and again["graph"]["skipped"]


@pytest.mark.slow
def test_approximate_on_dask_task_runner(store_path):
    # pynndescent compiles on first use in the process; the Dask cluster runs threads in this process
    runner = DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": False, **LOOPBACK},
    )
    preprocess = PreprocessConfig(frames_per_clip=30, noise_std=0.05, noise_seed=1)
    graph = GraphConfig(method="approximate", block_size=130, recall_sample=100)  # 3 blocks
    out = run_graph_flow(store_path, preprocess, graph, task_runner=runner)
    group = open_graph(store_path, out["graph"]["key"])
    assert group.attrs["recall_queries"] == 100
    assert out["graph"]["recall"] == group.attrs["recall"] >= 0.9
    X = open_preprocessed(store_path, out["preprocess"]["key"])["X"][:].astype(np.float64)
    L = store.read_sparse(group, "laplacian")
    # the stored Laplacian is the one of the stored neighbour lists
    indices, distances = group["indices"][:], group["distances"][:]
    expected = laplacian_from_neighbors(indices, distances)
    assert abs(sp.csr_array(L) - expected).max() < 1e-6
    # and those lists are true neighbour distances
    true = np.linalg.norm(X[:, None, :] - X[indices], axis=-1)
    np.testing.assert_allclose(distances, true, rtol=1e-4, atol=1e-5)
    exact = _in_memory_laplacian(X, graph)
    assert abs(L - exact).max() < 0.5  # close to the exact graph's Laplacian


def test_faiss_graph_stage_stores_the_laplacian_of_its_neighbours(store_path):
    pytest.importorskip("faiss")
    preprocess = PreprocessConfig(frames_per_clip=20)
    graph = GraphConfig(method="faiss", block_size=64, recall_sample=60)  # 4 blocks added, then searched
    out = run_graph_flow(store_path, preprocess, graph)
    group = open_graph(store_path, out["graph"]["key"])
    assert group.attrs["config"]["method"] == "faiss"
    assert group.attrs["recall_queries"] == 60
    assert out["graph"]["recall"] == group.attrs["recall"] >= 0.99
    X = open_preprocessed(store_path, out["preprocess"]["key"])["X"][:].astype(np.float64)
    indices, distances = group["indices"][:], group["distances"][:]
    assert indices.shape == (220, graph.n_neighbors)
    assert not np.any(indices == np.arange(220)[:, None])
    np.testing.assert_allclose(distances, np.linalg.norm(X[:, None, :] - X[indices], axis=-1), rtol=1e-4, atol=1e-5)
    # the stored Laplacian is the one built in memory from the same neighbours
    L = store.read_sparse(group, "laplacian")
    expected = laplacian_from_neighbors(indices, distances, **{name: getattr(graph, name) for name in
                                                               ("kernel", "sigma_factor", "self_loops", "laplacian")})
    assert L.shape == (220, 220) and L.dtype == np.float32
    assert abs(sp.csr_array(L) - expected).max() < 1e-6
    # at this size HNSW finds the exact neighbours: the exact graph's Laplacian
    np.testing.assert_allclose(L.toarray(), _in_memory_laplacian(X, graph).toarray(), atol=1e-5)
    again = run_graph_flow(store_path, preprocess, graph)
    assert again["graph"]["skipped"]


@pytest.mark.parametrize("stop", ["before it writes", "before it is marked complete"])
def test_an_interrupted_preprocess_or_graph_is_never_complete_and_its_rerun_completes_it(store_path, stop):
    """``interrupt`` (the run gone: flows._dask.run_gone_check) is asked before the group is replaced and before
    it is marked complete; when it raises there, the stage is not complete and the next run computes it."""
    from sae.graph import run_graph
    from sae.preprocess import run_preprocess
    from sae.store.keys import GRAPH, PREPROCESS, graph_key, preprocess_key

    class Gone(RuntimeError):
        pass

    asked = []

    def interrupt(where):
        asked.append(where)
        if where.endswith(stop):
            raise Gone(where)

    preprocess, graph = PreprocessConfig(frames_per_clip=20), GraphConfig(method="exact", block_size=100)
    keys = {PREPROCESS: preprocess_key(preprocess)}
    keys[GRAPH] = graph_key(keys[PREPROCESS], graph)
    for stage, compute in ((PREPROCESS, lambda **kw: run_preprocess(store_path, preprocess, **kw)),
                           (GRAPH, lambda **kw: run_graph(store_path, keys[PREPROCESS], graph, **kw))):
        with pytest.raises(Gone):
            compute(interrupt=interrupt)
        assert asked[-1].startswith(f"{stage} {keys[stage]},") and asked[-1].endswith(stop)
        assert not store.is_complete(store_path, stage, keys[stage])
        out = compute()
        assert out["key"] == keys[stage] and not out["skipped"] and store.is_complete(store_path, stage, keys[stage])


def test_exact_tiles_on_local_threads_run_blas_on_one_thread_each(store_path, task_run_messages):
    """Several exact tiles on Dask's local threads at once: BLAS on one thread each while the graph stage runs
    (29,800 frames in blocks of 8,192: 7.7 -> 5.0 s), lifted after; one tile keeps every core."""
    from sae.blas import blas_threads

    before = blas_threads()
    if before == [1]:
        pytest.skip("BLAS runs on one thread in this process already (OPENBLAS_NUM_THREADS=1?)")
    preprocess = PreprocessConfig(frames_per_clip=20)
    run_graph_flow(store_path, preprocess, GraphConfig(method="exact", block_size=64))  # 220 rows: 16 tiles
    several = [m for m in task_run_messages if m.startswith("kNN (exact")]
    task_run_messages.clear()
    run_graph_flow(store_path, preprocess, GraphConfig(method="exact", block_size=256))  # one tile
    alone = [m for m in task_run_messages if m.startswith("kNN (exact")]
    assert several == ["kNN (exact, euclidean) on threads; BLAS on 1 thread(s) per product"]
    assert alone == [f"kNN (exact, euclidean) on threads; BLAS on {'/'.join(map(str, before))} thread(s) per product"]
    assert blas_threads() == before
