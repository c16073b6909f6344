"""Whole-evaluation wall time and peak memory: dvml.evaluate (faiss) vs scikit-learn, side by side.

Sizes (clustered embeddings generated here, float32, L2-normalised for cosine retrieval):

* ``cub``: 5,924 x 512, 100 classes (~59 per class), Recall@1,2,4,8;
* ``sop``: 60,502 x 512, 11,316 classes (2-12 per class, ~5.3 on average), Recall@1,10,100,1000.

What is measured, per size, each in a fresh subprocess (so ``ru_maxrss`` is that measurement's own peak):

* ``ours``: :func:`dvml.evaluate.evaluate_embeddings` (exact faiss kNN with the query excluded, Recall@K,
  MAP@R, R-precision; faiss k-means with as many clusters as classes, 20 iterations or an earlier exact
  fixed point, NMI and pairwise F1);
* ``sklearn``: the same metrics with scikit-learn doing the heavy parts: ``NearestNeighbors(algorithm=
  "brute", metric=cosine)`` for the k + 1 neighbours (self dropped), ``KMeans(n_clusters=#classes,
  n_init=1, max_iter=20, tol=0, init="random")`` (the same Lloyd schedule as faiss, which also stops when
  the labels stop changing; ``--sklearn-init
  k-means++`` for sklearn's default seeding), ``normalized_mutual_info_score`` and ``pair_confusion_matrix``
  for NMI/F1; Recall@K / MAP@R / R-precision from the neighbour labels with dvml's numpy functions (scikit-
  learn has none; they cost well under a second).

The load average printed with each measurement shows whether other work shared the cores (a 2-core
machine with load > 2 gives both sides less than the full machine; compare sides within a size).
Wall time is the evaluation only (data already in memory, libraries imported), CPU time the worker's
user + system seconds over the same span (less sensitive to other load, though OpenMP spin-waiting
under contention inflates it too); peak memory is the
subprocess' maximum RSS, also shown above the RSS it had before evaluating (data + libraries).
Prints per-repetition figures, medians, the metric values of both sides (retrieval metrics must agree;
NMI/F1 differ by the k-means run), and ratios ours/sklearn.

    python bench/evaluate.py                      # cub and sop, full size (sop's sklearn KMeans: minutes)
    python bench/evaluate.py --quick              # both sizes scaled down ~10x, seconds
    python bench/evaluate.py --sizes cub --reps 5
    python bench/evaluate.py --sizes sop --sklearn-kmeans-max-iter 5   # sklearn k-means time extrapolated
    python bench/evaluate.py --sizes sop --sides sklearn --sklearn-init k-means++   # sklearn's default init
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # name: (n, dim, n_classes, ks, signal); signal puts raw Recall@1 near 0.6 (cub 0.63, sop 0.62)
    "cub": (5924, 512, 100, (1, 2, 4, 8), 1.0),
    "sop": (60502, 512, 11316, (1, 10, 100, 1000), 1.5),
}
QUICK_SCALE = 10


def make_embeddings(n: int, dim: int, n_classes: int, seed: int = 0, signal: float = 1.0,
                    variation_dim: int = 32, variation: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings: class centre + class-independent low-rank variation + isotropic noise.

    Every class gets >= 2 items; the rest are spread multinomially (SOP-like uneven class sizes).
    """
    rng = np.random.default_rng(seed)
    counts = 2 + rng.multinomial(n - 2 * n_classes, np.full(n_classes, 1.0 / n_classes))
    y = np.repeat(np.arange(n_classes), counts)
    rng.shuffle(y)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32)
    basis = rng.normal(size=(variation_dim, dim)).astype(np.float32) / np.sqrt(variation_dim)
    x = signal * centres[y]
    x += variation * (rng.normal(size=(n, variation_dim)).astype(np.float32) @ basis)
    x += rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


# ------------------------------------------------------------------------------------------- workers
def _worker_ours(x, y, ks, seed, args) -> dict:
    from dvml.evaluate import evaluate_embeddings

    timings: dict = {}
    t0 = time.perf_counter()
    res = evaluate_embeddings(x, y, ks=ks, seed=seed, metric="cosine", timings=timings)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "knn_s": timings["knn_s"], "kmeans_s": timings["kmeans_s"],
            "kmeans_iters_run": timings["kmeans_iterations"][0], "metrics": res}


def _worker_sklearn(x, y, ks, seed, args) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.metrics.cluster import pair_confusion_matrix
    from sklearn.neighbors import NearestNeighbors

    from dvml.retrieval import metrics as M

    t0 = time.perf_counter()
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[codes] - 1
    k = max(max(ks), int(r.max()))
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    _, idx = nn.kneighbors(x)
    is_self = idx == np.arange(len(y))[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    idx = idx[~is_self].reshape(len(y), k)
    nl = codes[idx]
    del idx, is_self
    res = {**M.recall_at_k(nl, codes, ks), "map@r": M.map_at_r(nl, codes, r),
           "r_precision": M.r_precision(nl, codes, r)}
    del nl
    t_knn = time.perf_counter() - t0

    t0 = time.perf_counter()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # what cosine k-means sees (as in dvml)
    n_iter = args.sklearn_kmeans_max_iter
    km = KMeans(n_clusters=counts.size, init=args.sklearn_init, n_init=1, max_iter=n_iter, tol=0.0,
                random_state=seed, algorithm="lloyd")
    assign = km.fit_predict(xn)
    t_kmeans = time.perf_counter() - t0
    extrapolated = None
    if n_iter < 20 and km.n_iter_ >= n_iter:  # capped (not converged): extrapolate per-iteration cost to 20
        t1 = time.perf_counter()
        KMeans(n_clusters=counts.size, init=args.sklearn_init, n_init=1, max_iter=1, tol=0.0, random_state=seed,
               algorithm="lloyd").fit(xn)
        t_one = time.perf_counter() - t1
        per_iter = max(t_kmeans - t_one, 0.0) / max(km.n_iter_ - 1, 1)
        extrapolated = t_one + per_iter * 19
    (tn, fp), (fn, tp) = pair_confusion_matrix(codes, assign)  # ordered pairs: each unordered pair twice
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    res.update({"nmi": float(normalized_mutual_info_score(codes, assign)),
                "f1": float(2 * precision * recall / (precision + recall)),
                "precision": float(precision), "recall": float(recall)})
    wall = t_knn + (extrapolated if extrapolated is not None else t_kmeans)
    return {"wall_s": wall, "knn_s": t_knn, "kmeans_s": extrapolated if extrapolated is not None else t_kmeans,
            "kmeans_iters_run": int(km.n_iter_), "kmeans_extrapolated": extrapolated is not None, "metrics": res}


def worker(args) -> None:
    data = np.load(args.data)
    x, y = data["x"], data["y"]
    ks = tuple(int(k) for k in args.ks.split(","))
    fn = _worker_ours if args.worker == "ours" else _worker_sklearn
    if args.worker == "ours":
        import faiss  # noqa: F401  (import cost outside the timed region, like sklearn's)

        import dvml.evaluate  # noqa: F401
    else:
        import sklearn.cluster  # noqa: F401
        import sklearn.neighbors  # noqa: F401
    base, cpu0 = _rss_mb(), _cpu_s()
    out = fn(x, y, ks, args.seed, args)
    out.update({"rss_before_mb": base, "peak_rss_mb": _peak_mb(), "cpu_s": _cpu_s() - cpu0})
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------------- driver
def _run_worker(side: str, data: Path, ks, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--data", str(data), "--ks", ",".join(map(str, ks)),
           "--seed", str(args.seed), "--sklearn-init", args.sklearn_init,
           "--sklearn-kmeans-max-iter", str(args.sklearn_kmeans_max_iter)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="cub,sop", help="comma-separated subset of: " + ", ".join(SIZES))
    ap.add_argument("--quick", action="store_true", help=f"scale every size down {QUICK_SCALE}x (n and classes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per side (default: 5 for cub, 1 for sop)")
    ap.add_argument("--sides", default="ours,sklearn", help="which sides to measure (ours, sklearn)")
    ap.add_argument("--sklearn-init", default="random", choices=("random", "k-means++"))
    ap.add_argument("--sklearn-kmeans-max-iter", type=int, default=20,
                    help="cap sklearn's Lloyd iterations (< 20: its k-means time is extrapolated to 20 and "
                         "marked so)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=("ours", "sklearn"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ks", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import faiss
    import sklearn

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), scikit-learn {sklearn.__version__}")
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for name in names:
        if name not in SIZES:
            raise SystemExit(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            n, dim, n_classes, ks, signal = SIZES[name]
            if args.quick:
                n, n_classes = n // QUICK_SCALE, max(n_classes // QUICK_SCALE, 2)
                ks = tuple(k for k in ks if k < n)
            x, y = make_embeddings(n, dim, n_classes, seed=args.seed, signal=signal)
            data = Path(tmp) / f"{name}.npz"
            np.savez(data, x=x, y=y)
            reps = args.reps if args.reps is not None else (5 if name == "cub" else 1)
            print(f"\n== {name}: {n:,} x {dim}, {n_classes:,} classes, Ks {ks}, {reps} rep(s) per side")
            sides = [s for s in ("ours", "sklearn") if s in args.sides.split(",")]
            res: dict[str, list[dict]] = {s: [] for s in sides}
            for rep in range(reps):
                for side in sides:
                    r = _run_worker(side, data, ks, args)
                    res[side].append(r)
                    extra = (f" (k-means EXTRAPOLATED to 20 from {r['kmeans_iters_run']} iters)"
                             if r.get("kmeans_extrapolated") else f" ({r['kmeans_iters_run']} k-means iters)")
                    print(f"  rep {rep} {side:7s}: {r['wall_s']:8.2f} s (kNN+retrieval {r['knn_s']:.2f} s, "
                          f"k-means {r['kmeans_s']:.2f} s){extra}; peak RSS {r['peak_rss_mb']:,.0f} MB "
                          f"({r['peak_rss_mb'] - r['rss_before_mb']:+,.0f} MB over {r['rss_before_mb']:,.0f}); "
                          f"CPU {r['cpu_s']:.1f} s; load avg {os.getloadavg()[0]:.1f}", flush=True)
            med = {s: {key: statistics.median(r[key] for r in res[s])
                       for key in ("wall_s", "knn_s", "kmeans_s", "cpu_s")} for s in sides}
            peak = {s: max(r["peak_rss_mb"] for r in res[s]) for s in sides}
            extra_mb = {s: max(r["peak_rss_mb"] - r["rss_before_mb"] for r in res[s]) for s in sides}
            for s in sides:
                print(f"  median {s:7s}: {med[s]['wall_s']:.2f} s (kNN+retrieval {med[s]['knn_s']:.2f} s, "
                      f"k-means {med[s]['kmeans_s']:.2f} s; CPU {med[s]['cpu_s']:.1f} s), peak RSS {peak[s]:,.0f} MB "
                      f"(+{extra_mb[s]:,.0f} MB for the evaluation)")
                print(f"  metrics {s:7s}: {_fmt_metrics(res[s][0]['metrics'])}")
            if sides == ["ours", "sklearn"]:
                agree = all(abs(res["ours"][0]["metrics"][k] - res["sklearn"][0]["metrics"][k]) < 1e-3
                            for k in res["ours"][0]["metrics"] if k.startswith("recall@") or k in ("map@r",
                                                                                                   "r_precision"))
                ratio = {k: med["ours"][k] / med["sklearn"][k] for k in ("wall_s", "knn_s", "kmeans_s", "cpu_s")}
                print(f"  ratio ours/sklearn: wall {ratio['wall_s']:.3f} (speed-up {1 / ratio['wall_s']:.1f}x), "
                      f"kNN {ratio['knn_s']:.3f}, k-means {ratio['kmeans_s']:.3f}, CPU time {ratio['cpu_s']:.3f}; "
                      f"peak RSS "
                      f"{peak['ours'] / peak['sklearn']:.3f}, evaluation memory "
                      f"{extra_mb['ours'] / max(extra_mb['sklearn'], 1):.3f}; retrieval metrics agree: {agree}")
                summary.append((name, med, peak, ratio))
    if summary:
        print("\nsummary (medians): size | ours s | sklearn s | ours/sklearn wall | ours MB | sklearn MB")
        for name, med, peak, ratio in summary:
            print(f"  {name} | {med['ours']['wall_s']:.2f} | {med['sklearn']['wall_s']:.2f} | {ratio['wall_s']:.3f} | "
                  f"{peak['ours']:,.0f} | {peak['sklearn']:,.0f}")


if __name__ == "__main__":
    main()
