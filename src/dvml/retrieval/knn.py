"""Exact nearest-neighbour search and k-means: the one module of dvml that imports faiss.

Everything here is exact (flat indexes, no quantisation). Cosine search is an inner product on
L2-normalised copies of the vectors; euclidean search is a flat L2 index. Queries are searched in
batches, and faiss itself blocks the database, so no N x N matrix is ever held: memory is the (N, k)
result plus one (batch, k) block (60,502 x 512 SOP-sized sets with k = 1000 take well under a GB).

When faiss was built with GPU support and a GPU is visible, the flat index and k-means run on it
(``use_gpu=None`` decides automatically; ``False`` forces the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum

import numpy as np

from dvml._lazy import lazy_module

faiss = lazy_module("faiss")  # imported on first use: the CLI reads this module's light parts to declare options

log = logging.getLogger(__name__)

# faiss GPU flat search supports k (and nprobe) up to this many neighbours.
_GPU_MAX_K = 2048
# Below this many multiply-adds (rows x columns x dim) faiss runs single-threaded: OpenMP start-up and
# spin-waiting barriers then cost more than they save, and far more when the cores are shared (e.g. with
# torch's spinning worker threads right after a training step): a k-means of 600 points measured 20x slower.
_SMALL_WORK = 5e8


class Metric(str, Enum):
    """Distance used for retrieval and clustering."""

    cosine = "cosine"  # inner product on L2-normalised vectors; distance = 1 - cos
    euclidean = "euclidean"  # L2; distance = ||q - x||


def gpu_available() -> bool:
    """True when this faiss has GPU support and at least one GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_gpu(use_gpu: bool | None) -> bool:
    """``None`` -> :func:`gpu_available`; ``True`` is checked: a GPU is never silently swapped for the CPU.

    Raises:
        ValueError: ``use_gpu=True`` but this faiss has no GPU support or sees no GPU.
    """
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        why = ("this faiss build has no GPU support (faiss-cpu; install faiss-gpu)"
               if not hasattr(faiss, "StandardGpuResources") else "faiss sees no GPU")
        raise ValueError(f"a faiss GPU was requested but {why}")
    return bool(use_gpu)


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES  # one StandardGpuResources per process: it owns scratch memory
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, E) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{name} has NaN or infinite values in {rows.size} row(s), first at row {rows[0]}")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy of ``x`` (N, E). All-zero rows stay zero (cosine 0 to everything).

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@contextmanager
def _threads_for(work: float) -> Iterator[None]:
    """Run faiss single-threaded inside the block when ``work`` multiply-adds is small (results unchanged)."""
    prev = faiss.omp_get_max_threads()
    if work >= _SMALL_WORK or prev == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _flat_index(dim: int, metric: Metric, use_gpu: bool):
    index = faiss.IndexFlatIP(dim) if metric is Metric.cosine else faiss.IndexFlatL2(dim)
    if use_gpu:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    return index


def search(queries: np.ndarray, k: int, *, database: np.ndarray | None = None,
           metric: Metric | str = Metric.cosine, exclude_self: bool = True, exclude: np.ndarray | None = None,
           batch_size: int = 8192, use_gpu: bool | None = None,
           progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query.

    Args:
        queries: (N, E) float array (converted to float32).
        k: neighbours per query, >= 1.
        database: (M, E) array to search in; ``None`` searches the queries among themselves.
        metric: ``"cosine"`` (default) or ``"euclidean"``.
        exclude_self: only with ``database=None``: query i never appears among its own neighbours. Done by
            searching k + 1 and dropping index i wherever it appears (not by position, so exact duplicates
            of a query are kept as legitimate neighbours); if i is not among the k + 1 (more than k exact
            duplicates tie with it), the (k + 1)-th result is dropped instead.
        exclude: only with a ``database``: (N,) int, the database row each query must not retrieve (the
            query itself when it is also in the database, as in a query/gallery split where some rows are
            both), -1 for none. Dropped exactly like ``exclude_self`` drops the query: by index, searching
            k + 1; a query with -1 loses its (k + 1)-th result.
        batch_size: queries per faiss call (bounds temporary memory; progress granularity).
        use_gpu: ``None`` = use a GPU when faiss has GPU support and one is visible.
        progress: called with the number of queries finished after each batch.
    Returns:
        ``(distances, indices)``: (N, k) float32 and (N, k) int64, nearest first. Distances are
        ``1 - cos`` for cosine and the euclidean distance (not squared) for euclidean. Ties between equal
        distances are broken by faiss (usually lower index first).
    Raises:
        ValueError: bad shapes, NaN/inf values, or ``k`` larger than the number of candidates
            (M, or N - 1 when excluding self; M - 1 when some query has an ``exclude`` row).
    """
    metric = Metric(metric)
    queries = _as_matrix(queries, "queries")
    self_search = database is None
    if self_search:
        if exclude is not None:
            raise ValueError("exclude applies to a search in a separate database; use exclude_self")
        db = queries
    else:
        db = _as_matrix(database, "database")
        if db.shape[1] != queries.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the database has {db.shape[1]}")
    drop = None  # (N,) database row to drop per query, -1 for none
    if self_search and exclude_self:
        drop = np.arange(queries.shape[0])
    elif exclude is not None:
        drop = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if drop.shape != (queries.shape[0],):
            raise ValueError(f"exclude must have one entry per query ({queries.shape[0]}), got shape {drop.shape}")
        if ((drop < -1) | (drop >= db.shape[0])).any():
            raise ValueError(f"exclude entries must be -1 or a database row in [0, {db.shape[0]})")
        if (drop < 0).all():
            drop = None
    drop_self = drop is not None
    n_candidates = db.shape[0] - (1 if drop_self else 0)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_candidates:
        raise ValueError(f"k={k} is larger than the set: only {n_candidates} candidate neighbours "
                         f"({db.shape[0]} items{', query itself excluded' if drop_self else ''})")
    if metric is Metric.cosine:
        db = l2_normalize(db)
        queries = db if self_search else l2_normalize(queries)
    k_search = k + 1 if drop_self else k
    use_gpu = resolve_gpu(use_gpu)
    if use_gpu and k_search > _GPU_MAX_K:
        log.info("k=%d exceeds the faiss GPU limit (%d); searching on the CPU", k_search, _GPU_MAX_K)
        use_gpu = False
    index = _flat_index(db.shape[1], metric, use_gpu)
    index.add(db)

    n = queries.shape[0]
    distances = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    with _threads_for(0 if use_gpu else float(n) * db.shape[0] * db.shape[1]):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            d, i = index.search(queries[start:stop], k_search)
            if drop_self:
                is_self = i == drop[start:stop, None]
                # exactly one column is dropped per row: the query itself, else the last one
                no_self = ~is_self.any(axis=1)
                is_self[no_self, -1] = True
                keep = ~is_self
                d = d[keep].reshape(stop - start, k)
                i = i[keep].reshape(stop - start, k)
            distances[start:stop] = d
            indices[start:stop] = i
            if progress is not None:
                progress(stop - start)
    if metric is Metric.cosine:
        np.subtract(1.0, distances, out=distances)  # inner product of unit vectors -> 1 - cos
    else:
        np.sqrt(np.maximum(distances, 0.0, out=distances), out=distances)  # faiss L2 is squared
    if (indices < 0).any():  # faiss pads with -1 when it finds fewer than k results; cannot happen for flat
        raise RuntimeError("faiss returned fewer neighbours than requested")
    return distances, indices


def kmeans(x: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20,
           metric: Metric | str = Metric.cosine, use_gpu: bool | None = None,
           stats: dict | None = None) -> np.ndarray:
    """Faiss k-means (``faiss.Kmeans``); returns the cluster id of every row.

    Args:
        x: (N, E) float array.
        n_clusters: number of clusters, 1 <= n_clusters <= N.
        seed: seeds faiss' centroid initialisation (same seed, same data -> same clustering).
        niter: Lloyd iterations (20, as in the usual deep-metric-learning evaluation code).
        metric: ``"cosine"`` clusters the L2-normalised rows (what cosine retrieval sees);
            ``"euclidean"`` the raw rows.
        use_gpu: ``None`` = use a GPU when available.
        stats: if given, filled with ``iterations`` (Lloyd steps actually computed) and ``converged``.
    Returns:
        (N,) int64 cluster ids in ``[0, n_clusters)``, the nearest final centroid of each row.

    ``min_points_per_centroid=1`` because SOP has ~5 images per class (the faiss default of 39 only
    warns, but it documents intent) and ``max_points_per_centroid`` is raised so faiss never subsamples.

    The iterations are run one ``Kmeans.train`` call at a time, each starting from the previous centroids,
    which is step for step what faiss' own loop does (its empty-cluster split reseeds its generator with
    1234 every iteration, and input centroids skip the random initialisation). So the loop can stop at a
    fixed point: once an iteration returns exactly the centroids it was given, every later iteration
    would too, and the result equals the full ``niter`` run bit for bit (tested against
    ``faiss.Kmeans(niter=20)``). On SOP-sized sets (~5 points per cluster) this usually happens after a
    handful of iterations, saving most of the k-means time.
    """
    metric = Metric(metric)
    x = _as_matrix(x, "embeddings")
    if not 1 <= n_clusters <= x.shape[0]:
        raise ValueError(f"n_clusters must be in [1, {x.shape[0]}] (the number of points), got {n_clusters}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if metric is Metric.cosine:
        x = l2_normalize(x)
    use_gpu = resolve_gpu(use_gpu)
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=1, seed=int(seed) % (2**31),
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-x.shape[0] // n_clusters)),
                      verbose=False, gpu=bool(use_gpu))
    centroids = None
    converged = False
    iterations = 0
    with _threads_for(0 if use_gpu else float(x.shape[0]) * n_clusters * x.shape[1]):
        while iterations < niter:
            km.train(x, init_centroids=centroids)
            iterations += 1
            if centroids is not None and np.array_equal(km.centroids, centroids):
                converged = True  # a fixed point: the remaining iterations would change nothing
                break
            centroids = km.centroids.copy()
        _, assign = km.index.search(x, 1)
    log.debug("k-means into %d clusters: %d iteration(s)%s", n_clusters, iterations,
              " (fixed point)" if converged else "")
    if stats is not None:
        stats.update(iterations=iterations, converged=converged)
    return assign[:, 0].astype(np.int64)


# ------------------------------------------------------------------------------------- gallery indexes
class IndexKind(str, Enum):
    """A gallery index: ``flat`` is exact; ``ivf`` (inverted lists) and ``hnsw`` (graph) are approximate."""

    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"


class IndexFileError(ValueError):
    """A faiss index file that cannot be read; the message names the file."""


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` gallery items: about 4·√n, with at least 39 items per list (faiss' training minimum).

    >>> default_nlist(60502), default_nlist(100)
    (984, 2)
    """
    return max(1, min(int(f"{4 * n ** 0.5:.0f}"), n // 39))


def build_index(gallery: np.ndarray, *, metric: Metric | str = Metric.cosine, kind: IndexKind | str = IndexKind.flat,
                nlist: int | None = None, hnsw_m: int = 32, seed: int = 0):
    """A faiss index holding the (N, E) ``gallery`` rows as ids 0..N-1.

    Cosine indexes hold L2-normalised copies and use the inner product; euclidean ones use L2. ``ivf``
    trains ``nlist`` lists (default :func:`default_nlist`) with k-means seeded by ``seed``; ``hnsw`` links each
    vector to ``hnsw_m`` neighbours. Search with :func:`search_index` (which applies the same normalisation).
    """
    metric, kind = Metric(metric), IndexKind(kind)
    x = _as_matrix(gallery, "gallery")
    if metric is Metric.cosine:
        x = l2_normalize(x)
    n, d = x.shape
    fm = faiss.METRIC_INNER_PRODUCT if metric is Metric.cosine else faiss.METRIC_L2
    if kind is IndexKind.flat:
        index = faiss.IndexFlatIP(d) if metric is Metric.cosine else faiss.IndexFlatL2(d)
    elif kind is IndexKind.ivf:
        nlist = default_nlist(n) if nlist is None else nlist
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] (the gallery size), got {nlist}")
        quantizer = faiss.IndexFlatIP(d) if metric is Metric.cosine else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
        index.cp.seed = int(seed) % (2**31)
        index.cp.min_points_per_centroid = 1
        with _threads_for(float(n) * nlist * d * 10):
            index.train(x)
        index.own_fields = True  # the quantizer lives as long as the index
        quantizer.this.disown()
    else:
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m must be >= 2, got {hnsw_m}")
        index = faiss.IndexHNSWFlat(d, hnsw_m, fm)
    with _threads_for(float(n) * d * (1 if kind is IndexKind.flat else 100)):
        index.add(x)
    return index


def search_index(index, queries: np.ndarray, k: int, *, metric: Metric | str = Metric.cosine,
                 nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest gallery ids of each query in an index from :func:`build_index` (or :func:`read_index`).

    Returns ``(distances, ids)``, (Q, k) float32 / int64, nearest first, distances in the units of
    :func:`search` (``1 - cos`` or euclidean). An approximate index may find fewer than k: those slots hold
    id -1 and distance +inf. ``nprobe`` (IVF lists visited) and ``ef_search`` (HNSW beam) trade speed for recall.
    """
    metric = Metric(metric)
    q = _as_matrix(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]} but the index holds {index.d}-D vectors")
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in [1, {index.ntotal}] (the gallery size), got {k}")
    if metric is Metric.cosine:
        q = l2_normalize(q)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)
    if isinstance(index, faiss.IndexHNSW) and ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    with _threads_for(float(q.shape[0]) * index.ntotal * index.d):
        d, i = index.search(q, k)
    missing = i < 0
    if metric is Metric.cosine:
        d = 1.0 - d
    else:
        d = np.sqrt(np.maximum(d, 0.0))
    d = d.astype(np.float32)
    d[missing] = np.inf
    return d, i.astype(np.int64)


def index_facts(index) -> dict:
    """``{"kind", "metric", "dim", "n"}`` of a faiss index (what a sidecar file is checked against)."""
    if faiss.try_extract_index_ivf(index) is not None:
        kind = IndexKind.ivf
    elif isinstance(index, faiss.IndexHNSW):
        kind = IndexKind.hnsw
    else:
        kind = IndexKind.flat
    metric = Metric.cosine if index.metric_type == faiss.METRIC_INNER_PRODUCT else Metric.euclidean
    return {"kind": kind.value, "metric": metric.value, "dim": int(index.d), "n": int(index.ntotal)}


def index_nlist(index) -> int | None:
    """The number of inverted lists of an IVF index (None for other kinds)."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else int(ivf.nlist)


def write_index(index, write: Callable[[bytes], object]) -> None:
    """``index`` in faiss' file format (what ``faiss.write_index`` writes), streamed in blocks of up to 1 MiB
    through ``write`` (a binary file's ``write``; the caller makes the file atomic: :func:`dvml.files.write_file`).

    Python does the I/O, so a failed write raises the ``OSError`` of ``write``; faiss' own file writer would turn
    it into a RuntimeError, or ignore it when it only shows at ``fclose``.
    """
    faiss.write_index(index, faiss.PyCallbackIOWriter(write))


def read_index(path):
    """``faiss.read_index``; raises :class:`IndexFileError` naming the file when it is not a faiss index."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:  # faiss raises RuntimeError for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexFileError(f"{path}: not a readable faiss index ({first[:200]})") from None
