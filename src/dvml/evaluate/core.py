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

from dvml import files
from dvml import runs as R
from dvml.errors import DvmlError, FieldError

# The Recall@K values are the datasets' registry entries' (DEFAULT_KS: CUB-200-2011, Cars196); re-exported here.
from dvml.extract.registry import DEFAULT_KS as DEFAULT_KS
from dvml.extract.registry import INSHOP_KS as INSHOP_KS
from dvml.extract.registry import SOP_KS as SOP_KS
from dvml.extract.registry import default_ks as registered_ks
from dvml.retrieval import knn
from dvml.retrieval import metrics as M
from dvml.retrieval.knn import Metric
from dvml.retrieval.protocol import query_gallery

log = logging.getLogger(__name__)

PER_CLASS_COLUMNS = ("class", "count", "recall@1", "map@r")

# progress(stage, advance, total): stage is "kNN" (queries) or "k-means" (runs)
ProgressFn = Callable[[str, int, int], None]


class EvaluationError(DvmlError):
    """Embeddings or a target that cannot be evaluated; the message names the problem (and file)."""


def default_ks(dataset: str | None) -> tuple[int, ...]:
    """The K values of a registered dataset (its entry's ``ks``: ``"sop"`` -> 1, 10, 100, 1000; ``"inshop"`` ->
    1, 10, 20, ..., 50; CUB, Cars196 and ``folder`` 1, 2, 4, 8), 1, 2, 4, 8 for an unknown name.

    >>> default_ks("sop"), default_ks("cub"), default_ks("inshop")
    ((1, 10, 100, 1000), (1, 2, 4, 8), (1, 10, 20, 30, 40, 50))
    """
    return registered_ks(dataset)


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)`` (sorted, unique, each >= 1).

    >>> parse_ks("8, 1,2,2")
    (1, 2, 8)
    """
    try:
        ks = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise FieldError(f"`ks` must be comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise FieldError(f"`ks` must be comma-separated positive integers, got {text!r}")
    return tuple(ks)


def _check_arrays(embeddings: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
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
    return emb, y


def _check_ks(ks: Sequence[int], n_candidates: int, where: str, what: str) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise EvaluationError(f"{where}: K values must be positive integers, got {ks}")
    if ks[-1] > n_candidates:
        raise EvaluationError(f"{where}: K={ks[-1]} is larger than the set: each query has only "
                              f"{n_candidates} {what} (pass smaller `ks`)")
    return ks


def _validate(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], where: str) -> tuple:
    emb, y = _check_arrays(embeddings, labels, where)
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        small = classes[counts < 2]
        shown = ", ".join(map(str, small[:10])) + (" ..." if small.size > 10 else "")
        raise EvaluationError(f"{where}: {small.size} test class(es) have fewer than 2 items, so their queries "
                              f"have no positive to retrieve: class {shown}")
    ks = _check_ks(ks, emb.shape[0] - 1, where, "other test items")
    return emb, codes.reshape(-1).astype(np.int32), counts, ks


def _per_class_rows(classes: np.ndarray, query_codes: np.ndarray, hit1: np.ndarray, ap: np.ndarray) -> list[dict]:
    """One row per class that has queries: class id, count (queries), recall@1, map@r."""
    g = M.per_class_means(query_codes, hit=hit1, ap=ap)
    return [{"class": int(classes[c]), "count": int(n), "recall@1": float(h), "map@r": float(a)}
            for c, n, h, a in zip(g["class"], g["count"], g["hit"], g["ap"], strict=True)]


def _retrieval_metrics(neighbour_codes: np.ndarray, query_codes: np.ndarray, r: np.ndarray, ks: tuple[int, ...],
                       classes: np.ndarray | None) -> tuple[dict, list[dict] | None]:
    """Recall@K, MAP@R, R-precision (and per-class rows when ``classes`` is given) from neighbour class codes."""
    out: dict = M.recall_at_k(neighbour_codes, query_codes, ks)
    rows = None
    if classes is None:
        out["map@r"] = M.map_at_r(neighbour_codes, query_codes, r)
    else:
        ap = M.average_precision_at_r(neighbour_codes, query_codes, r)
        out["map@r"] = float(np.mean(ap))  # exactly what map_at_r returns
        rows = _per_class_rows(classes, query_codes, M.hits_at_k(neighbour_codes, query_codes, 1), ap)
    out["r_precision"] = M.r_precision(neighbour_codes, query_codes, r)
    return out, rows


def _clustering_metrics(emb: np.ndarray, codes: np.ndarray, n_classes: int, *, metric: Metric, kmeans_runs: int,
                        seed: int, use_gpu: bool | None, progress: ProgressFn | None,
                        timings: dict | None) -> dict:
    t0 = time.perf_counter()
    runs = []
    iterations = []
    for i in range(kmeans_runs):
        km_stats: dict = {}
        assign = knn.kmeans(emb, n_classes, seed=seed + i, metric=metric, use_gpu=use_gpu, stats=km_stats)
        iterations.append(km_stats["iterations"])
        runs.append({"nmi": M.nmi(assign, codes), **M.pairwise_f1(assign, codes)})
        if progress is not None:
            progress("k-means", 1, kmeans_runs)
    out = {key: float(np.mean([run[key] for run in runs])) for key in ("nmi", "f1", "precision", "recall")}
    t_kmeans = time.perf_counter() - t0
    log.debug("k-means (%d clusters) x %d: %.2fs", n_classes, kmeans_runs, t_kmeans)
    if timings is not None:
        timings["kmeans_s"] = t_kmeans
        timings["kmeans_iterations"] = iterations
    return out


def evaluate_embeddings(embeddings: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = DEFAULT_KS,
                        metric: Metric | str = Metric.cosine, kmeans_runs: int = 1, seed: int = 0,
                        clustering: bool = True, use_gpu: bool | None = None,
                        progress: ProgressFn | None = None, where: str = "embeddings",
                        timings: dict | None = None, roles: np.ndarray | None = None,
                        per_class: bool = False) -> dict:
    """All metrics of a set of test embeddings: each query retrieved among the others, or against a gallery.

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
        roles: optional (N,) ``schema.ROLE_*`` per row (a schema-2 cache's ``/test/roles``): queries are
            ranked against the gallery rows only, a row that is both never retrieving itself; R counts the
            query's class in the gallery; NMI/F1 cluster the gallery. ``None``: every row is both (the v1
            protocol, computed exactly as before).
        per_class: also return ``per_class``: one dict per class with queries (``class``, ``count`` of
            queries, ``recall@1``, ``map@r``); the count-weighted means equal the overall values.
    Returns:
        ``{"recall@K": ..., ["nmi", "f1", "precision", "recall",] "map@r", "r_precision"}``, fractions in
        [0, 1] (python floats), recall@K in increasing K; with roles also ``n_query``/``n_gallery``; with
        ``per_class`` also ``per_class``.
    Raises:
        EvaluationError: bad shapes, NaN/inf embeddings, a class with < 2 items (a query class with no other
        gallery item), K larger than the set, bad roles.
    """
    if kmeans_runs < 1:
        raise ValueError(f"kmeans_runs must be >= 1, got {kmeans_runs}")
    metric = Metric(metric)
    if roles is not None:
        return _evaluate_query_gallery(embeddings, labels, roles, ks=ks, metric=metric, kmeans_runs=kmeans_runs,
                                       seed=seed, clustering=clustering, use_gpu=use_gpu, progress=progress,
                                       where=where, timings=timings, per_class=per_class)
    emb, codes, counts, ks = _validate(embeddings, labels, ks, where)
    n = emb.shape[0]
    r = counts[codes] - 1  # R per query: the other members of its class
    k_search = max(ks[-1], int(r.max()))
    t0 = time.perf_counter()
    knn_progress = None if progress is None else (lambda done: progress("kNN", done, n))
    _, idx = knn.search(emb, k_search, metric=metric, exclude_self=True, use_gpu=use_gpu, progress=knn_progress)
    neighbour_codes = codes[idx]  # (N, k) int32
    del idx
    classes = np.unique(np.asarray(labels)) if per_class else None
    out, rows = _retrieval_metrics(neighbour_codes, codes, r, ks, classes)
    del neighbour_codes
    t_knn = time.perf_counter() - t0
    log.debug("kNN (k=%d) + retrieval metrics on %d x %d: %.2fs", k_search, n, emb.shape[1], t_knn)
    if timings is not None:
        timings["knn_s"] = t_knn
    result = {key: out[key] for key in out if key.startswith("recall@")}
    if clustering:
        result.update(_clustering_metrics(emb, codes, counts.size, metric=metric, kmeans_runs=kmeans_runs,
                                          seed=seed, use_gpu=use_gpu, progress=progress, timings=timings))
    result["map@r"] = out["map@r"]
    result["r_precision"] = out["r_precision"]
    if rows is not None:
        result["per_class"] = rows
    return result


def _evaluate_query_gallery(embeddings, labels, roles, *, ks, metric: Metric, kmeans_runs, seed, clustering,
                            use_gpu, progress, where, timings, per_class) -> dict:
    """:func:`evaluate_embeddings` with a query/gallery split (see its ``roles``)."""
    from dvml.cache import schema as S

    emb, y = _check_arrays(embeddings, labels, where)
    roles = np.asarray(roles)
    if roles.shape != y.shape or not np.isin(roles, S.ROLE_VALUES).all():
        raise EvaluationError(f"{where}: roles must be one of {S.ROLE_VALUES} per row "
                              f"({y.shape[0]} rows, roles of shape {roles.shape})")
    q_rows, g_rows, exclude = query_gallery(roles)  # a query that is also in the gallery must not retrieve itself
    if not q_rows.size or not g_rows.size:
        raise EvaluationError(f"{where}: {q_rows.size} query and {g_rows.size} gallery rows; need both")
    classes, codes = np.unique(y, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int32)
    q_codes, g_codes = codes[q_rows], codes[g_rows]
    gallery_counts = np.bincount(g_codes, minlength=classes.size)
    r = gallery_counts[q_codes] - (exclude >= 0)
    if (r < 1).any():
        bad = np.unique(classes[q_codes[r < 1]])
        shown = ", ".join(map(str, bad[:10])) + (" ..." if bad.size > 10 else "")
        raise EvaluationError(f"{where}: {bad.size} query class(es) have no (other) gallery item, so their queries "
                              f"have no positive to retrieve: class {shown}")
    ks = _check_ks(ks, g_rows.size - (1 if (exclude >= 0).any() else 0), where, "gallery items")
    k_search = max(ks[-1], int(r.max()))
    t0 = time.perf_counter()
    knn_progress = None if progress is None else (lambda done: progress("kNN", done, q_rows.size))
    _, idx = knn.search(emb[q_rows], k_search, database=emb[g_rows], metric=metric, exclude=exclude,
                        use_gpu=use_gpu, progress=knn_progress)
    neighbour_codes = g_codes[idx]
    del idx
    out, rows = _retrieval_metrics(neighbour_codes, q_codes, r, ks, classes if per_class else None)
    del neighbour_codes
    t_knn = time.perf_counter() - t0
    if timings is not None:
        timings["knn_s"] = t_knn
    result = {key: out[key] for key in out if key.startswith("recall@")}
    if clustering:
        g_classes, g_local = np.unique(g_codes, return_inverse=True)
        result.update(_clustering_metrics(emb[g_rows], g_local.reshape(-1), g_classes.size, metric=metric,
                                          kmeans_runs=kmeans_runs, seed=seed, use_gpu=use_gpu, progress=progress,
                                          timings=timings))
    result["map@r"] = out["map@r"]
    result["r_precision"] = out["r_precision"]
    result["n_query"], result["n_gallery"] = int(q_rows.size), int(g_rows.size)
    if rows is not None:
        result["per_class"] = rows
    return result


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
    per_class: bool = False  # return per-class rows (result["per_class"]; never in metrics.json)
    per_class_csv: Path | None = None  # write them here (implies per_class)

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
        if self.per_class_csv is not None:
            object.__setattr__(self, "per_class_csv", Path(self.per_class_csv))
            object.__setattr__(self, "per_class", True)


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
    # (without heads.pt the embedding below says so, naming the file)
    checkpoint = R.checkpoint_facts(run_dir) if (run_dir / R.HEADS_FILE).is_file() else None
    if checkpoint is not None and checkpoint["status"] != "finished":
        log.warning("%s: unfinished run: scoring its checkpoint of epoch %d of %s, unfinished (continue it with "
                    "--resume; metrics.json records which checkpoint was scored)", run_dir,
                    checkpoint["epochs_done"], checkpoint["epochs"])
    prov: dict = {"target_kind": "run", "run_kind": info.kind, "cache": str(info.cache) if info.cache else None,
                  "cache_fingerprint": info.cache_fingerprint, "run_config": info.config, "checkpoint": checkpoint}
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


def _test_roles(target: Path, prov: dict) -> np.ndarray | None:
    """Query/gallery roles of the evaluated test rows: the cache's ``/test/roles`` (schema 2), or for a finetune
    run on a dataset with roles (In-Shop) the dataset index's; None for the all-vs-all protocol."""
    from dvml.cache import load_test_roles

    if prov.get("cache") and (target.is_file() or prov.get("run_kind") != R.FINETUNE_KIND):
        return load_test_roles(Path(prov["cache"]))
    config = prov.get("run_config") or {}
    if config.get("dataset") and config.get("root"):
        from dvml.extract.datasets import read_dataset

        index = read_dataset(config["dataset"], config["root"], train_classes=config.get("train_classes"))
        return None if index.test_roles is None else np.asarray(index.test_roles, dtype=np.int8)
    return None


def write_per_class_csv(rows: Sequence[dict], path: Path) -> Path:
    """``class,count,recall@1,map@r`` rows (one per class with queries), written by :func:`dvml.files.write_file`
    (atomically, through a symlink)."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS)
    w.writeheader()
    for row in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    files.write_text(buf.getvalue(), path)
    return path


def worst_classes(rows: Sequence[dict], n: int) -> list[dict]:
    """The ``n`` classes with the lowest Recall@1 (ties: lower MAP@R, then more queries, then class id)."""
    return sorted(rows, key=lambda r: (r["recall@1"], r["map@r"], -r["count"], r["class"]))[:max(n, 0)]


def run(cfg: EvalConfig, *, progress: ProgressFn | None = None) -> dict:
    """Evaluate ``cfg.target`` (a run directory or a cache file); returns metrics + provenance.

    A run directory's test split is embedded with its heads (z_I) after checking that its cache still
    exists with the recorded fingerprint; a cache file's raw test features (view 0) are evaluated as is
    (the no-training baseline). A schema-2 cache's test split is scored as queries against the gallery
    (see :func:`evaluate_embeddings`). Writes ``RUN_DIR/metrics.json`` (run directories, unless
    ``write_metrics=False``), ``cfg.json_path`` and ``cfg.per_class_csv`` if given; the per-class rows are
    returned under ``per_class`` (with ``cfg.per_class``) but not written into the JSON files.
    """
    target = cfg.target
    if not target.exists():
        raise EvaluationError(f"{target}: no such file or directory")
    if cfg.use_gpu:  # an explicit GPU request is never silently run on the CPU (slow, and mis-recorded)
        try:
            knn.resolve_gpu(True)
        except ValueError as e:
            raise EvaluationError(f"use_gpu: {e}; search on the CPU (use_gpu=False), or let dvml choose "
                                  "(use_gpu=None: the GPU when faiss has one)") from None
    for out in (cfg.json_path, cfg.per_class_csv):
        if out is not None:
            files.check_target(out)  # a directory or an impossible path fails now, not after the scoring
    if target.is_dir() and cfg.write_metrics:
        with R.run_lock(target):  # metrics.json goes into the run: one writer at a time
            return _run(cfg, progress)
    if target.is_dir():
        files.check_not_busy(target)
    return _run(cfg, progress)


def _run(cfg: EvalConfig, progress: ProgressFn | None) -> dict:
    target = cfg.target
    t0 = time.perf_counter()
    if target.is_dir():
        emb, labels, prov = _resolve_run(target)
    else:
        from dvml.cache import fingerprint

        emb, labels, dataset = _load_cache_test(target)
        prov = {"target_kind": "cache", "cache": str(target.resolve()), "cache_fingerprint": fingerprint(target),
                "dataset": dataset}
    roles = _test_roles(target, prov)
    if roles is not None and roles.shape[0] != emb.shape[0]:
        raise EvaluationError(f"{target}: {roles.shape[0]} query/gallery roles for {emb.shape[0]} test embeddings "
                              "(the dataset index changed since the run?)")
    t_load = time.perf_counter() - t0
    ks = cfg.ks if cfg.ks is not None else default_ks(prov.get("dataset"))
    timings: dict[str, float] = {}
    result = evaluate_embeddings(emb, labels, ks=ks, metric=cfg.metric, kmeans_runs=cfg.kmeans_runs,
                                 seed=cfg.seed, clustering=cfg.clustering, use_gpu=cfg.use_gpu,
                                 progress=progress, where=str(target), timings=timings, roles=roles,
                                 per_class=cfg.per_class)
    per_class = result.pop("per_class", None)
    if roles is not None:
        result["protocol"] = "query/gallery"  # absent for the all-vs-all protocol: v1 results are unchanged
    if cfg.per_class_csv is not None:
        write_per_class_csv(per_class, cfg.per_class_csv)
        result["per_class_csv"] = str(cfg.per_class_csv.resolve())
        log.debug("wrote %s", cfg.per_class_csv)  # the caller says what it wrote
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
        "faiss_gpu": knn.resolve_gpu(cfg.use_gpu),
        "seconds": {"load_embed": float(f"{t_load:.3f}"),
                    **{k: float(f"{v:.3f}") for k, v in timings.items() if k.endswith("_s")}},
        "kmeans_iterations": timings.get("kmeans_iterations", []),
        "versions": R.versions(),
        **cfg.extra,
    })
    if target.is_dir() and cfg.write_metrics:
        scored = prov.get("checkpoint")
        if scored is not None and R.file_sha256(target / R.HEADS_FILE) != scored["sha256"]:
            raise EvaluationError(f"{target}: {R.HEADS_FILE} changed while it was being evaluated (a fit is "
                                  f"writing this run); {R.METRICS_FILE} not written, evaluate again when it is done")
        R.atomic_write_json(result, target / R.METRICS_FILE, default=str)
        log.debug("wrote %s", target / R.METRICS_FILE)
    if cfg.json_path is not None:
        R.atomic_write_json(result, cfg.json_path, default=str)  # "-": standard output
        if not files.is_stdout(cfg.json_path):
            log.debug("wrote %s", cfg.json_path)
    if per_class is not None:
        result["per_class"] = per_class
    return result


def evaluate_target(target: str | Path, *, progress: ProgressFn | None = None, **opts) -> dict:
    """``run(EvalConfig(target, **opts))``: metrics + provenance of a run directory or a cache file."""
    return run(EvalConfig(target=Path(target), **opts), progress=progress)
