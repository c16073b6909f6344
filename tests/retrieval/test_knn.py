"""dvml.retrieval.knn against a brute-force distance matrix (numpy argsort) on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from dvml.retrieval import knn


def _brute_force(q, db, metric):
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        dn = db / np.linalg.norm(db, axis=1, keepdims=True)
        dist = 1.0 - qn.astype(np.float64) @ dn.T.astype(np.float64)
    else:
        dist = np.sqrt(((q[:, None, :].astype(np.float64) - db[None, :, :]) ** 2).sum(-1))
    return dist


def _data(n=300, e=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, e)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_self_search_against_bruteforce_argsort(metric):
    x = _data()
    k = 10
    dist = _brute_force(x, x, metric)
    np.fill_diagonal(dist, np.inf)  # exclude self
    ref = np.argsort(dist, axis=1, kind="stable")[:, :k]
    d, i = knn.search(x, k, metric=metric, batch_size=64)  # several batches
    assert i.shape == (300, k) and d.shape == (300, k) and i.dtype == np.int64
    np.testing.assert_array_equal(i, ref)  # continuous random data: no ties
    np.testing.assert_allclose(d, np.take_along_axis(dist, ref, axis=1), rtol=1e-4, atol=1e-5)
    assert (i != np.arange(300)[:, None]).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_database_search_against_bruteforce_argsort(metric):
    q, db = _data(50, 8, seed=1), _data(200, 8, seed=2)
    dist = _brute_force(q, db, metric)
    ref = np.argsort(dist, axis=1, kind="stable")[:, :7]
    d, i = knn.search(q, 7, database=db, metric=metric)
    np.testing.assert_array_equal(i, ref)
    np.testing.assert_allclose(d, np.take_along_axis(dist, ref, axis=1), rtol=1e-4, atol=1e-5)


def test_self_search_without_exclusion_finds_self_first():
    x = _data(100, 8)
    d, i = knn.search(x, 3, exclude_self=False, metric="euclidean")
    np.testing.assert_array_equal(i[:, 0], np.arange(100))
    np.testing.assert_allclose(d[:, 0], 0.0, atol=1e-3)


def test_exact_duplicates_drop_only_the_query_itself():
    # rows 0..4 are identical: each must see the 4 others (not itself) first, whatever faiss' tie order
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[1:5] = x[0]
    d, i = knn.search(x, 4, metric="euclidean")
    for q in range(5):
        assert q not in i[q]
        assert set(i[q]) == set(range(5)) - {q}
        np.testing.assert_allclose(d[q], 0.0, atol=1e-3)


def test_more_duplicates_than_k_still_excludes_self_and_returns_k():
    x = np.ones((12, 4), dtype=np.float32)
    x[-2:] = -1.0
    d, i = knn.search(x, 3, metric="cosine")
    assert i.shape == (12, 3)
    for q in range(10):
        assert q not in i[q] and set(i[q]) <= set(range(10)) - {q}


def test_zero_vector_cosine_is_finite():
    x = _data(20, 4)
    x[3] = 0.0
    d, i = knn.search(x, 5)
    assert np.isfinite(d).all()


@pytest.mark.parametrize("k", [0, 300])
def test_k_out_of_range_is_an_error(k):
    with pytest.raises(ValueError, match="k"):
        knn.search(_data(300, 4), k)


def test_nan_queries_are_an_error():
    x = _data(20, 4)
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        knn.search(x, 2)


def test_kmeans_is_seeded_and_a_lloyd_fixed_point():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 10
    y = np.repeat(np.arange(6), 30)
    x = (centres[y] + rng.normal(size=(180, 8))).astype(np.float32)
    a = knn.kmeans(x, 6, seed=3, metric="euclidean")
    np.testing.assert_array_equal(a, knn.kmeans(x, 6, seed=3, metric="euclidean"))
    assert a.shape == (180,) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 6
    # converged k-means: every point is nearest to the mean of its own cluster (brute force)
    used = np.unique(a)
    means = np.stack([x[a == c].mean(axis=0) for c in used])
    nearest = used[((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)]
    np.testing.assert_array_equal(nearest, a)


def test_kmeans_recovers_two_far_apart_blobs():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    x = (rng.normal(size=(100, 4)) + np.array([[100, 0, 0, 0], [-100, 0, 0, 0]])[y]).astype(np.float32)
    a = knn.kmeans(x, 2, seed=0, metric="euclidean")
    assert len(set(zip(a.tolist(), y.tolist(), strict=True))) == 2


def test_kmeans_with_one_point_per_cluster():
    x = _data(10, 4)
    a = knn.kmeans(x, 10, seed=0)
    assert sorted(a.tolist()) == list(range(10))


@pytest.mark.gpu
def test_gpu_search_matches_cpu():
    if not knn.gpu_available():
        pytest.skip("faiss has no GPU support or no GPU is visible")
    x = _data(500, 32)
    d_cpu, i_cpu = knn.search(x, 10, use_gpu=False)
    d_gpu, i_gpu = knn.search(x, 10, use_gpu=True)
    np.testing.assert_array_equal(i_cpu, i_gpu)
    np.testing.assert_allclose(d_cpu, d_gpu, atol=1e-4)


def test_small_problems_run_single_threaded_with_identical_results(monkeypatch):
    x = _data(400, 16)
    threads = knn.faiss.omp_get_max_threads()
    monkeypatch.setattr(knn, "_SMALL_WORK", float("inf"))  # everything counts as small: 1 thread
    single = knn.search(x, 5), knn.kmeans(x, 20, seed=1)
    assert knn.faiss.omp_get_max_threads() == threads  # restored
    monkeypatch.setattr(knn, "_SMALL_WORK", 0.0)  # nothing is small: all threads
    multi = knn.search(x, 5), knn.kmeans(x, 20, seed=1)
    np.testing.assert_array_equal(single[0][1], multi[0][1])
    np.testing.assert_allclose(single[0][0], multi[0][0], atol=1e-6)
    np.testing.assert_array_equal(single[1], multi[1])


def _native_faiss_kmeans(x, n_clusters, seed, niter=20):
    km = knn.faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, -(-x.shape[0] // n_clusters)), verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assign[:, 0], km


@pytest.mark.parametrize("case", ["blobs", "many_small_clusters", "empty_cluster_splits"])
def test_kmeans_against_native_faiss_20_iterations(case):
    rng = np.random.default_rng(11)
    if case == "blobs":
        x, k = (rng.normal(size=(400, 8)) + 3 * rng.normal(size=(8, 8))[rng.integers(0, 8, 400)]), 8
    elif case == "many_small_clusters":  # SOP-like: ~5 points per cluster
        y = np.repeat(np.arange(80), 5)
        x, k = rng.normal(size=(400, 16)) + 1.5 * rng.normal(size=(80, 16))[y], 80
    else:  # every point 4 times: random init picks duplicate centroids, so clusters empty and get split
        x, k = np.repeat(rng.normal(size=(50, 6)), 4, axis=0), 60
    x = x.astype(np.float32)
    ref, native = _native_faiss_kmeans(x, k, seed=5)
    stats: dict = {}
    got = knn.kmeans(x, k, seed=5, metric="euclidean", stats=stats)
    np.testing.assert_array_equal(got, ref)
    assert 1 <= stats["iterations"] <= 20
    if case == "empty_cluster_splits":
        assert sum(s["nsplit"] for s in native.iteration_stats) > 0  # the split path was exercised
    if case == "many_small_clusters":
        assert stats["converged"] and stats["iterations"] < 20  # the early stop did happen


def test_search_exclude_drops_exactly_the_named_row():
    rng = np.random.default_rng(1)
    q, db = rng.normal(size=(20, 6)), rng.normal(size=(30, 6))
    db[:5] = q[:5]  # queries 0-4 are also database rows 0-4
    exclude = np.where(np.arange(20) < 5, np.arange(20), -1)
    _, idx = knn.search(q, 7, database=db, exclude=exclude, metric="euclidean")
    d = np.sqrt(((q[:, None] - db[None]) ** 2).sum(-1))
    d[np.arange(5), np.arange(5)] = np.inf
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :7])
    with pytest.raises(ValueError, match="exclude must have one entry per query"):
        knn.search(q, 3, database=db, exclude=exclude[:4])
    with pytest.raises(ValueError, match="k=30 is larger than the set: only 29"):
        knn.search(q, 30, database=db, exclude=exclude)


def test_write_index_streams_faiss_format_and_a_failed_write_is_the_oserror(tmp_path):
    """The blocks ``write_index`` hands out are the bytes ``faiss.write_index`` writes to a file (read back as the
    same index); a write that fails raises its own OSError, not faiss' RuntimeError."""
    import errno

    import faiss

    x = _data(n=3000, e=128)  # 1.5 MiB of vectors: more than one block
    index = knn.build_index(x, metric="euclidean")
    blocks: list[bytes] = []
    knn.write_index(index, lambda b: blocks.append(bytes(b)) or len(b))
    faiss.write_index(index, str(tmp_path / "native.faiss"))
    assert len(blocks) > 1 and b"".join(blocks) == (tmp_path / "native.faiss").read_bytes()
    (tmp_path / "streamed.faiss").write_bytes(b"".join(blocks))
    _, ids = knn.search_index(knn.read_index(tmp_path / "streamed.faiss"), x[:5], 3, metric="euclidean")
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]

    def full(b: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        knn.write_index(index, full)
    assert type(e.value) is OSError and e.value.errno == errno.ENOSPC
