"""Blocked kNN (sae.knn) against scikit-learn's brute force."""

import dask.array as da
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from sae.knn import (
    approximate_neighbors,
    exact_neighbors,
    exact_neighbors_of,
    nearest_neighbors,
    recall_at_k,
    sample_recall,
)


def _reference(X, k, metric="euclidean"):
    distances, indices = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(X).kneighbors()
    return indices, distances


def _assert_same_neighbors(indices, distances, ref_indices, ref_distances, atol=1e-5):
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-5, atol=atol)
    # indices must agree wherever the distance is not tied with another one of the row
    d = ref_distances
    tied = np.zeros(d.shape, dtype=bool)
    tied[:, 1:] |= np.isclose(d[:, 1:], d[:, :-1], rtol=1e-6, atol=atol)
    tied[:, :-1] |= np.isclose(d[:, :-1], d[:, 1:], rtol=1e-6, atol=atol)
    tied[:, -1] = True  # the K-th may tie with the (K+1)-th, which we do not see
    assert np.array_equal(indices[~tied], ref_indices[~tied])
    # and as sets per row up to the ties at the K-th distance
    for row, ref_row, dist in zip(indices, ref_indices, d):
        strict = dist < dist[-1] - atol
        assert set(ref_row[strict]) <= set(row)


@pytest.fixture
def data(rng):
    return rng.random((97, 5))


@pytest.mark.parametrize("block_size", [97, 200, 40, 17, 16])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_equals_sklearn_brute(data, block_size, metric):
    k = 6
    indices, distances = exact_neighbors(data, k, metric=metric, block_size=block_size)
    assert indices.shape == (97, k) and indices.dtype == np.int64
    assert distances.dtype == np.float32
    assert np.all(np.diff(distances, axis=1) >= 0)
    _assert_same_neighbors(indices, distances, *_reference(data, k, metric))


@pytest.mark.parametrize("chunks", [97, 30, 13])
def test_exact_dask_input_any_chunking(data, chunks):
    expected = exact_neighbors(data, 4, block_size=25)
    got = exact_neighbors(da.from_array(data, chunks=(chunks, -1)), 4, block_size=25)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_exact_duplicates_exclude_self_by_index(rng):
    X = rng.random((40, 3))
    X[10:20] = 0.0  # ten identical silent frames
    indices, distances = exact_neighbors(X, 5, block_size=7)
    assert not np.any(indices == np.arange(40)[:, None])
    for i in range(10, 20):
        assert np.all(distances[i] == 0)
        assert set(indices[i]) <= set(range(10, 20)) - {i}
    _assert_same_neighbors(indices, distances, *_reference(X, 5))


def test_exact_neighbors_of_sample(data, rng):
    ids = np.sort(rng.choice(97, size=20, replace=False))
    full_i, full_d = exact_neighbors(data, 5, block_size=30)
    sub_i, sub_d = exact_neighbors_of(data, ids, 5, block_size=23)
    np.testing.assert_array_equal(sub_i, full_i[ids])
    np.testing.assert_allclose(sub_d, full_d[ids], rtol=1e-6)


def test_recall_at_k_counts_and_ties():
    true = np.array([[1, 2, 3], [0, 2, 3]])
    found = np.array([[1, 2, 4], [-1, 5, 0]])
    manual = (2 + 1) / 6
    assert recall_at_k(found, true) == pytest.approx(manual)
    # with distances: found 4 ties with the true 3rd neighbour, so it counts
    true_d = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    found_d = np.array([[0.1, 0.2, 0.3], [np.inf, 0.5, 0.1]])
    assert recall_at_k(found, true, found_distances=found_d, true_distances=true_d) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="found_indices must have the shape"):
        recall_at_k(found[:, :2], true)


def test_sample_recall_of_exact_is_one(data):
    indices, distances = exact_neighbors(data, 4, block_size=50)
    out = sample_recall(data, indices, distances, n_queries=30, block_size=40, random_state=3)
    assert out == {"recall": 1.0, "n_queries": 30, "random_state": 3}
    shuffled = np.roll(indices, 1, axis=0)
    assert sample_recall(data, shuffled, n_queries=30, block_size=40)["recall"] < 0.5


def test_errors_name_the_parameter(data):
    with pytest.raises(ValueError, match=r"n_neighbors must be in \[1, n_samples - 1\]"):
        exact_neighbors(data, 97)
    with pytest.raises(ValueError, match="method must be one of"):
        nearest_neighbors(data, 3, method="flann")
    with pytest.raises(ValueError, match="metric must be one of"):
        exact_neighbors(data, 3, metric="manhattan")
    with pytest.raises(ValueError, match="n_neighbors_build must be >= n_neighbors"):
        approximate_neighbors(data, 10, n_neighbors_build=5)


def _clustered(rng, n, n_features=24, n_clusters=12):
    centers = rng.random((n_clusters, n_features)) * 4
    labels = rng.integers(0, n_clusters, size=n)
    X = centers[labels] + 0.3 * rng.standard_normal((n, n_features))
    X[:25] = 0.0  # duplicated silent frames
    return np.abs(X).astype(np.float32)


@pytest.mark.slow
def test_approximate_blocked_recall(rng):
    # pynndescent compiles its kernels on first use in a process (tens of seconds)
    X = _clustered(rng, 3000)
    k = 10
    indices, distances = nearest_neighbors(
        X, k, method="approximate", block_size=1100, n_neighbors_build=30, random_state=0
    )  # 3 blocks: 3 builds, 6 cross-block queries
    assert indices.shape == (3000, k)
    assert not np.any(indices == np.arange(3000)[:, None])
    assert np.all(indices >= 0)
    assert np.all(np.diff(distances, axis=1) >= -1e-6)
    # the reported distances are the true distances of the reported pairs
    true_pair = np.linalg.norm(X[:, None, :].astype(np.float64) - X[indices].astype(np.float64), axis=-1)
    np.testing.assert_allclose(distances, true_pair, rtol=1e-4, atol=1e-4)
    ref_i, ref_d = _reference(X.astype(np.float64), k)
    recall = recall_at_k(indices, ref_i, found_distances=distances, true_distances=ref_d)
    assert recall >= 0.95
    # the silent frames find each other at distance 0, self excluded
    assert np.all(distances[:25] == 0)


# --------------------------------------------------------------------------- faiss HNSW (optional backend)


def test_faiss_missing_message_says_how_to_install():
    from sae.knn import faiss_missing_message, missing_backend

    message = faiss_missing_message(ImportError("No module named 'faiss'"))
    assert "graph.method 'faiss'" in message
    assert "pip install 'sae[faiss]'" in message and "faiss-cpu" in message
    assert "No module named 'faiss'" in message and "'approximate'" in message
    assert missing_backend("approximate") is None and missing_backend("exact") is None
    with pytest.raises(ValueError, match="method must be one of"):
        missing_backend("annoy")


faiss = pytest.importorskip("faiss")


def _true_distances(X, indices):
    return np.linalg.norm(X[:, None, :].astype(np.float64) - X[indices].astype(np.float64), axis=-1)


@pytest.mark.parametrize("block_size", [3000, 700])
def test_faiss_against_sklearn_on_clustered_frames(rng, block_size):
    X = _clustered(rng, 3000)
    k = 10
    indices, distances = nearest_neighbors(X, k, method="faiss", block_size=block_size, random_state=0)
    assert indices.shape == (3000, k) and indices.dtype == np.int64
    assert distances.shape == (3000, k) and distances.dtype == np.float32
    assert not np.any(indices == np.arange(3000)[:, None])  # self never a neighbour
    assert np.all(indices >= 0)
    assert np.all(np.diff(distances, axis=1) >= 0)  # sorted ascending
    # ties by index: equal distances come in increasing index order
    tied = np.diff(distances, axis=1) == 0
    assert np.all(np.diff(indices, axis=1)[tied] > 0)
    # the distances are the euclidean distances of the returned pairs
    np.testing.assert_allclose(distances, _true_distances(X, indices), rtol=1e-4, atol=1e-5)
    ref_i, ref_d = _reference(X.astype(np.float64), k)
    recall = recall_at_k(indices, ref_i, found_distances=distances, true_distances=ref_d)
    assert recall >= 0.99
    # the 25 duplicated silent frames find each other at distance 0, self excluded
    assert np.all(distances[:25] == 0)
    assert all(set(indices[i]) <= set(range(25)) - {i} for i in range(25))


def test_faiss_many_duplicates_exclude_self_by_index(rng):
    X = rng.random((300, 6))
    X[100:160] = X[100]  # sixty identical frames: more than K + 1
    X[[205, 250, 251]] = X[5]  # four identical frames in different blocks
    indices, distances = nearest_neighbors(X, 8, method="faiss", block_size=128)
    assert not np.any(indices == np.arange(300)[:, None])
    assert np.all(distances[100:160] == 0)
    # ties by index: the sixty list the first others of the group
    assert all(list(indices[i]) == [j for j in range(100, 160) if j != i][:8] for i in range(100, 160))
    group = [5, 205, 250, 251]
    for i in group:
        assert list(indices[i, :3]) == [j for j in group if j != i] and np.all(distances[i, :3] == 0)
    np.testing.assert_allclose(distances, _true_distances(X, indices), rtol=1e-4, atol=1e-6)
    ref_i, ref_d = _reference(X, 8)
    assert recall_at_k(indices, ref_i, found_distances=distances, true_distances=ref_d) >= 0.99


@pytest.mark.parametrize("chunks", [500, 170, 64])
def test_faiss_dask_input_equals_numpy_input(rng, chunks):
    X = _clustered(rng, 500, n_features=8)
    expected = nearest_neighbors(X, 6, method="faiss", block_size=200, n_jobs=1)
    got = nearest_neighbors(da.from_array(X, chunks=(chunks, -1)), 6, method="faiss", block_size=200, n_jobs=1)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_faiss_cosine_against_exact(rng):
    X = _clustered(rng, 800, n_features=8)
    indices, distances = nearest_neighbors(X, 5, method="faiss", metric="cosine", block_size=300)
    ref_i, ref_d = exact_neighbors(X, 5, metric="cosine")
    assert not np.any(indices == np.arange(800)[:, None])
    assert recall_at_k(indices, ref_i, found_distances=distances, true_distances=ref_d) >= 0.99
    # the zero (silent) frames are at distance 1 of everything, as in the exact method
    np.testing.assert_allclose(distances[:25], 1.0, atol=1e-6)


def test_faiss_threads_are_restored_and_sample_recall_works(rng):
    X = _clustered(rng, 600, n_features=8)
    before = faiss.omp_get_max_threads()
    indices, distances = nearest_neighbors(X, 4, method="faiss", block_size=250, n_jobs=1)
    assert faiss.omp_get_max_threads() == before
    out = sample_recall(X, indices, distances, n_queries=100, block_size=128, random_state=2)
    assert out["n_queries"] == 100 and out["recall"] >= 0.99


def test_faiss_errors_name_the_parameter(data):
    with pytest.raises(ValueError, match="hnsw_m must be >= 2"):
        nearest_neighbors(data, 3, method="faiss", hnsw_m=1)
    with pytest.raises(ValueError, match=r"n_neighbors must be in \[1, n_samples - 1\]"):
        nearest_neighbors(data, 97, method="faiss")
    with pytest.raises(ValueError, match="n_jobs must be >= 1 or None"):
        nearest_neighbors(data, 3, method="faiss", n_jobs=0)


def test_graph_config_defaults_are_the_documented_constants():
    from sae.config import GraphConfig
    from sae.knn import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    config = GraphConfig(method="faiss")
    assert (config.hnsw_m, config.hnsw_ef_construction, config.hnsw_ef_search) == (
        HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
