"""Stage three: evaluate embeddings (or a run directory / a raw feature cache) with every metric.

:func:`evaluate_embeddings` is the in-memory entry point (used by fit-heads for per-epoch validation);
:func:`evaluate_target` / :func:`run` resolve a run directory or a cache file to test embeddings, add
provenance, and write ``metrics.json``. Retrieval is exact faiss kNN over the test set with each query
excluded from its own neighbours; clustering is faiss k-means with as many clusters as test classes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dvml import runs as R
from dvml.errors import DvmlError
from dvml.retrieval import knn
from dvml.retrieval import metrics as M
from dvml.retrieval.knn import Metric

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)  # CUB-200-2011, Cars196 (the paper's tables)
SOP_KS: tuple[int, ...] = (1, 10, 100, 1000)  # Stanford Online Products

# progress(stage, advance, total): stage is "kNN" (queries) or "k-means" (runs)
ProgressFn = Callable[[str, int, int], None]


class EvaluationError(DvmlError):
    """Embeddings or a target that cannot be evaluated; the message names the problem (and file)."""


def default_ks(dataset: str | None) -> tuple[int, ...]:
    """The paper's K values for a dataset name (``"sop"`` -> 1, 10, 100, 1000; else 1, 2, 4, 8).

    >>> default_ks("sop"), default_ks("cub")
    ((1, 10, 100, 1000), (1, 2, 4, 8))
    """
    return SOP_KS if (dataset or "").lower() == "sop" else DEFAULT_KS


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)`` (sorted, unique, each >= 1).

    >>> parse_ks("8, 1,2,2")
    (1, 2, 8)
    """
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--ks must be comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--ks must be comma-separated positive integers, got {text!r}")
    return tuple(ks)


def _validate(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], where: str) -> tuple:
    emb = np.asarray(embeddings)
    y = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise EvaluationError(f"{where}: embeddings must be a non-empty (N, E) array, got shape {emb.shape}")
    if y.shape != (emb.shape[0],):
        raise EvaluationError(f"{where}: {emb.shape[0]} embeddings but labels have shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise EvaluationError(f"{where}: labels must be integers, got dtype {y.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise EvaluationError(f"{where}: embeddings have NaN or infinite values in {rows.size} of {emb.shape[0]} "
                              f"row(s), first at row {rows[0]}")
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        small = classes[counts < 2]
        shown = ", ".join(map(str, small[:10])) + (" ..." if small.size > 10 else "")
        raise EvaluationError(f"{where}: {small.size} test class(es) have fewer than 2 items, so their queries "
                              f"have no positive to retrieve: class {shown}")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise EvaluationError(f"{where}: K values must be positive integers, got {ks}")
    if ks[-1] > emb.shape[0] - 1:
        raise EvaluationError(f"{where}: K={ks[-1]} is larger than the set: each query has only "
                              f"{emb.shape[0] - 1} other test items (pass smaller --ks)")
    return emb, codes.reshape(-1).astype(np.int32), counts, ks


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = DEFAULT_KS,
                        metric: Metric | str = Metric.cosine, kmeans_runs: int = 1, seed: int = 0,
                        clustering: bool = True, use_gpu: bool | None = None,
                        progress: ProgressFn | None = None, where: str = "embeddings",
                        timings: dict | None = None) -> dict:
    """All metrics of a set of test embeddings retrieved among themselves.

    Args:
        embeddings: (N, E) float array, finite.
        labels: (N,) integer class labels; every class needs >= 2 items.
        ks: Recall@K values; each K <= N - 1.
        metric: ``"cosine"`` (L2-normalised inner product; default) or ``"euclidean"``; k-means clusters
            the normalised vectors under cosine.
        kmeans_runs: k-means repetitions (seeds ``seed .. seed + runs - 1``); NMI/F1/precision/recall are
            averaged over them.
        seed: first k-means seed.
        clustering: compute NMI/F1 (k-means is the slow part on SOP-sized sets).
        use_gpu: ``None`` = faiss GPU when available.
        progress: optional ``progress(stage, advance, total)`` callback.
        where: prefix of error messages (e.g. the target's path).
        timings: if given, filled with ``knn_s`` (search + retrieval metrics) and ``kmeans_s`` seconds, and
            ``kmeans_iterations`` (Lloyd steps per run; fewer than 20 when a fixed point came first).
    Returns:
        ``{"recall@K": ..., ["nmi", "f1", "precision", "recall",] "map@r", "r_precision"}``, fractions in
        [0, 1] (python floats), recall@K in increasing K.
    Raises:
        EvaluationError: bad shapes, NaN/inf embeddings, a class with < 2 items, K larger than the set.
    """
    emb, codes, counts, ks = _validate(embeddings, labels, ks, where)
    if kmeans_runs < 1:
        raise ValueError(f"kmeans_runs must be >= 1, got {kmeans_runs}")
    metric = Metric(metric)
    n = emb.shape[0]
    r = counts[codes] - 1  # R per query: the other members of its class
    k_search = max(ks[-1], int(r.max()))
    t0 = time.perf_counter()
    knn_progress = None if progress is None else (lambda done: progress("kNN", done, n))
    _, idx = knn.search(emb, k_search, metric=metric, exclude_self=True, use_gpu=use_gpu, progress=knn_progress)
    neighbour_codes = codes[idx]  # (N, k) int32
    del idx
    out: dict[str, float] = M.recall_at_k(neighbour_codes, codes, ks)
    map_r = M.map_at_r(neighbour_codes, codes, r)
    r_prec = M.r_precision(neighbour_codes, codes, r)
    del neighbour_codes
    t_knn = time.perf_counter() - t0
    log.debug("kNN (k=%d) + retrieval metrics on %d x %d: %.2fs", k_search, n, emb.shape[1], t_knn)
    if timings is not None:
        timings["knn_s"] = t_knn
    if clustering:
        t0 = time.perf_counter()
        runs = []
        iterations = []
        n_classes = counts.size
        for i in range(kmeans_runs):
            km_stats: dict = {}
            assign = knn.kmeans(emb, n_classes, seed=seed + i, metric=metric, use_gpu=use_gpu, stats=km_stats)
            iterations.append(km_stats["iterations"])
            runs.append({"nmi": M.nmi(assign, codes), **M.pairwise_f1(assign, codes)})
            if progress is not None:
                progress("k-means", 1, kmeans_runs)
        for key in ("nmi", "f1", "precision", "recall"):
            out[key] = float(np.mean([run[key] for run in runs]))
        t_kmeans = time.perf_counter() - t0
        log.debug("k-means (%d clusters) x %d: %.2fs", n_classes, kmeans_runs, t_kmeans)
        if timings is not None:
            timings["kmeans_s"] = t_kmeans
            timings["kmeans_iterations"] = iterations
    out["map@r"] = map_r
    out["r_precision"] = r_prec
    return out


# ----------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class EvalConfig:
    """What ``dvml evaluate`` does. ``ks=None`` picks the paper's Ks from the cache's dataset attribute."""

    target: Path
    ks: tuple[int, ...] | None = None
    metric: Metric = Metric.cosine
    kmeans_runs: int = 1
    seed: int = 0
    clustering: bool = True
    json_path: Path | None = None
    write_metrics: bool = True  # RUN_DIR/metrics.json for a run directory
    use_gpu: bool | None = None
    extra: dict = field(default_factory=dict)  # merged into the provenance

    def __post_init__(self):
        object.__setattr__(self, "target", Path(self.target))
        object.__setattr__(self, "metric", Metric(self.metric))
        if self.ks is not None:
            ks = tuple(sorted({int(k) for k in self.ks}))
            if not ks or ks[0] < 1:
                raise ValueError(f"ks must be positive integers, got {self.ks}")
            object.__setattr__(self, "ks", ks)
        if self.kmeans_runs < 1:
            raise ValueError(f"kmeans_runs must be >= 1, got {self.kmeans_runs}")
        if self.json_path is not None:
            object.__setattr__(self, "json_path", Path(self.json_path))


def _load_cache_test(cache: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Raw test features (view 0, flattened) of a cache file -> (embeddings (N, D), labels (N,), dataset)."""
    from dvml.cache import load_split, read_info

    info = read_info(cache)
    split = load_split(cache, "test", views=[0])
    emb = split.features.reshape(split.features.shape[0], -1)
    return emb, split.labels, info.dataset


def _resolve_run(run_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Test embeddings of a run directory, after checking its cache. Returns (emb, labels, provenance)."""
    if not (run_dir / R.CONFIG_FILE).is_file():
        raise EvaluationError(f"{run_dir}: not a run directory (no {R.CONFIG_FILE}); pass a run directory "
                              "written by `dvml fit-heads` or an HDF5 feature cache")
    info = R.load_run(run_dir)
    prov: dict = {"target_kind": "run", "run_kind": info.kind, "cache": str(info.cache) if info.cache else None,
                  "cache_fingerprint": info.cache_fingerprint, "run_config": info.config}
    if info.kind == R.FINETUNE_KIND:
        from dvml.finetune import embed_test_split  # lazily: heavy (torch), evaluating a cache never needs it

        emb, labels = embed_test_split(run_dir)
        prov["dataset"] = info.config.get("dataset")
        return np.asarray(emb), np.asarray(labels), prov

    from dvml.cache import fingerprint, read_info

    cache = Path(info.cache)
    if not cache.exists():
        raise EvaluationError(f"{run_dir}: its feature cache {cache} no longer exists (recorded in "
                              f"{run_dir / R.CONFIG_FILE}); restore it or re-fit the heads")
    current = fingerprint(cache)
    if current != info.cache_fingerprint:
        raise EvaluationError(f"{run_dir}: feature cache {cache} changed since the heads were fit "
                              f"(fingerprint {current} != recorded {info.cache_fingerprint}); "
                              "re-fit the heads on the current cache or restore the original file")
    feats, labels, dataset = _load_cache_test(cache)
    from dvml.heads import embed  # lazily, as above

    emb = embed(run_dir, feats)
    prov["dataset"] = dataset
    prov["cache"] = str(cache)
    prov["feature_dim"] = int(read_info(cache).feature_dim)
    return np.asarray(emb), labels, prov


def run(cfg: EvalConfig, *, progress: ProgressFn | None = None) -> dict:
    """Evaluate ``cfg.target`` (a run directory or a cache file); returns metrics + provenance.

    A run directory's test split is embedded with its heads (z_I) after checking that its cache still
    exists with the recorded fingerprint; a cache file's raw test features (view 0) are evaluated as is
    (the no-training baseline). Writes ``RUN_DIR/metrics.json`` (run directories, unless
    ``write_metrics=False``) and ``cfg.json_path`` if given.
    """
    target = cfg.target
    if not target.exists():
        raise EvaluationError(f"{target}: no such file or directory")
    t0 = time.perf_counter()
    if target.is_dir():
        emb, labels, prov = _resolve_run(target)
    else:
        from dvml.cache import fingerprint

        emb, labels, dataset = _load_cache_test(target)
        prov = {"target_kind": "cache", "cache": str(target.resolve()), "cache_fingerprint": fingerprint(target),
                "dataset": dataset}
    t_load = time.perf_counter() - t0
    ks = cfg.ks if cfg.ks is not None else default_ks(prov.get("dataset"))
    timings: dict[str, float] = {}
    result = evaluate_embeddings(emb, labels, ks=ks, metric=cfg.metric, kmeans_runs=cfg.kmeans_runs,
                                 seed=cfg.seed, clustering=cfg.clustering, use_gpu=cfg.use_gpu,
                                 progress=progress, where=str(target), timings=timings)
    result.update({
        "target": str(target.resolve()),
        **prov,
        "n_test": int(emb.shape[0]),
        "n_classes": int(np.unique(labels).size),
        "embedding_dim": int(emb.shape[1]),
        "ks": list(ks),
        "metric": cfg.metric.value,
        "clustering": cfg.clustering,
        "kmeans_runs": cfg.kmeans_runs if cfg.clustering else 0,
        "seed": cfg.seed,
        "faiss_gpu": bool(knn.gpu_available() if cfg.use_gpu is None else cfg.use_gpu),
        "seconds": {"load_embed": round(t_load, 3),
                    **{k: round(v, 3) for k, v in timings.items() if k.endswith("_s")}},
        "kmeans_iterations": timings.get("kmeans_iterations", []),
        "versions": R.versions(),
        **cfg.extra,
    })
    if target.is_dir() and cfg.write_metrics:
        R.atomic_write_json(result, target / R.METRICS_FILE, default=str)
        log.info("wrote %s", target / R.METRICS_FILE)
    if cfg.json_path is not None:
        R.atomic_write_json(result, cfg.json_path, default=str)
        log.info("wrote %s", cfg.json_path)
    return result


def evaluate_target(target: str | Path, *, progress: ProgressFn | None = None, **opts) -> dict:
    """``run(EvalConfig(target, **opts))``: metrics + provenance of a run directory or a cache file."""
    return run(EvalConfig(target=Path(target), **opts), progress=progress)
