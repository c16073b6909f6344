"""``dvml analyze``: the paper's own evidence (Table 4, Figs. 1 and 3-5) for a trained run.

Two numbers per embedding and split, computed on **central features** (each embedding minus its class
mean, the "central latent space" of Fig. 1):

* **KS p-value** (Table 4, "Triplet p-value"): for every class with at least ``min_class_size`` samples and
  every embedding dimension, a two-sided one-sample Kolmogorov-Smirnov test of the class's central values
  against a normal with the fitted mean and standard deviation (maximum likelihood, as
  ``scipy.stats.norm.fit``; ``scipy.stats.kstest(x, "norm", args=(mean, std))``); the p-values are averaged
  over dimensions to one number per class, and reported as mean ± std over classes (the paper's
  "76.00 ± 1.25"). A small spread across classes is the paper's evidence that the intra-class variation
  has the *same* distribution in every class. Note that estimating the normal's parameters from the same
  sample makes the plain KS test conservative (Lilliefors): for truly normal data the mean p-value is
  about 0.7-0.8, not 0.5; that is expected, and the paper's ~76% is consistent with it. Dimensions whose
  central values are constant in a class (no spread to fit) are skipped and counted.
* **Average relative deviation** (Table 4, "Triplet" vs "DVML+Triplet", in %). The paper does not spell
  out its formula; our reading, used consistently: for class c with centre m_c (mean embedding) the
  relative deviation is ``mean_i ||z_i − m_c||₂ / ||m_c||₂``, the typical distance of a member from its
  centre relative to the centre's length, averaged over classes. Lower means the embedding has removed
  more intra-class variation and sits closer to a class centre, which is what DVML's z_I should do.

By default embeddings are L2-normalised first (``normalize=True``), because retrieval compares them by
cosine; both numbers are then about directions, as retrieval sees them.

Plots (PNG, :mod:`dvml.evaluate.plots`): PCA and t-SNE of the embeddings coloured by class, t-SNE of the
central latent space (Fig. 1: if the variation is class-independent, classes mix there), and a histogram
of the per-class p-values. Numbers go to ``analysis.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dvml import __version__, files
from dvml._lazy import lazy_module
from dvml.errors import DvmlError

_st = lazy_module("scipy.stats")  # imported on first use: the CLI reads this module's light parts to declare options

log = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.json"


# --------------------------------------------------------------------------------------------------
# pure functions


def central_features(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subtract each sample's class mean.

    Args:
        embeddings: (N, E) float.
        labels: (N,) int class ids.
    Returns:
        (central (N, E) float64, classes (C,) sorted ids, centres (C, E) float64) with
        ``central[i] = embeddings[i] − centres[classes == labels[i]]``.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need embeddings (N, E) and labels (N,), got {x.shape} and {y.shape}")
    classes, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv, minlength=classes.size).astype(np.float64)
    centres = np.zeros((classes.size, x.shape[1]))
    np.add.at(centres, inv, x)
    centres /= counts[:, None]
    return x - centres[inv], classes, centres


@dataclass(frozen=True)
class KSResult:
    """Per-class KS evidence. ``per_class``: (C,) mean p-value over dimensions of each tested class."""

    classes: np.ndarray
    per_class: np.ndarray
    mean: float
    std: float
    n_classes: int  # classes tested
    n_skipped_classes: int  # classes smaller than min_class_size
    n_constant_dims: int  # (class, dimension) cells skipped for having no spread

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n_classes": self.n_classes,
                "n_skipped_classes": self.n_skipped_classes, "n_constant_dims": self.n_constant_dims,
                "per_class": {str(int(c)): float(p) for c, p in zip(self.classes, self.per_class, strict=True)}}


def ks_pvalues_per_dim(values: np.ndarray) -> np.ndarray:
    """Two-sided KS p-value of each column against a normal with that column's fitted mean and std.

    Args:
        values: (n, E) samples of E variables.
    Returns:
        (E,) p-values; NaN for a column with zero spread. Equal to
        ``[scipy.stats.kstest(values[:, d], "norm", args=scipy.stats.norm.fit(values[:, d])).pvalue ...]``.
    """
    v = np.asarray(values, dtype=np.float64)
    mu = v.mean(axis=0)
    sd = v.std(axis=0)  # MLE, as scipy.stats.norm.fit
    ok = sd > 1e-12 * np.maximum(1.0, np.abs(mu))
    out = np.full(v.shape[1], np.nan)
    if ok.any():
        z = (v[:, ok] - mu[ok]) / sd[ok]
        out[ok] = _st.ks_1samp(z, _st.norm.cdf, axis=0).pvalue
    return out


def ks_central(embeddings: np.ndarray, labels: np.ndarray, *, min_class_size: int = 5) -> KSResult:
    """KS p-values of central features, averaged over dimensions per class, then over classes.

    Classes with fewer than ``min_class_size`` samples are skipped (the test has no power there).
    Raises DvmlError when no class is large enough.
    """
    central, classes, _ = central_features(embeddings, labels)
    y = np.asarray(labels)
    per_class, tested, constant = [], [], 0
    for c in classes:
        rows = central[y == c]
        if rows.shape[0] < min_class_size:
            continue
        p = ks_pvalues_per_dim(rows)
        constant += int(np.isnan(p).sum())
        if np.isnan(p).all():
            continue
        per_class.append(float(np.nanmean(p)))
        tested.append(c)
    if not per_class:
        raise DvmlError(f"no class has at least {min_class_size} samples with any spread: "
                        "cannot run the KS test (lower `min_class_size`)")
    pc = np.asarray(per_class)
    return KSResult(classes=np.asarray(tested), per_class=pc, mean=float(pc.mean()),
                    std=float(pc.std(ddof=1)) if pc.size > 1 else math.nan, n_classes=int(pc.size),
                    n_skipped_classes=int(classes.size - pc.size), n_constant_dims=constant)


def relative_deviation(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Average relative deviation: mean over classes of ``mean_i ||z_i − m_c|| / ||m_c||`` (a fraction).

    Returns:
        {"mean": float, "std": float (over classes), "per_class": {class: float}}. Classes whose centre is
        the zero vector are skipped (the ratio is undefined).
    """
    central, classes, centres = central_features(embeddings, labels)
    y = np.asarray(labels)
    dist = np.linalg.norm(central, axis=1)
    norms = np.linalg.norm(centres, axis=1)
    per_class = {}
    for c, n in zip(classes, norms, strict=True):
        if n > 0:
            per_class[str(int(c))] = float(dist[y == c].mean() / n)
    v = np.asarray(list(per_class.values()))
    return {"mean": float(v.mean()) if v.size else math.nan,
            "std": float(v.std(ddof=1)) if v.size > 1 else math.nan, "per_class": per_class}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows left at zero)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def analyze_embeddings(embeddings: np.ndarray, labels: np.ndarray, *, normalize: bool = True,
                       min_class_size: int = 5) -> dict:
    """Table 4's numbers for one set of embeddings: KS p-values and relative deviation of central features.

    Returns:
        {"ks": KSResult.to_json(), "relative_deviation": {...}, "n": N, "dim": E, "n_classes": C,
        "normalized": bool}.
    """
    x = l2_normalize(embeddings) if normalize else np.asarray(embeddings, dtype=np.float64)
    ks = ks_central(x, labels, min_class_size=min_class_size)
    return {"n": int(x.shape[0]), "dim": int(x.shape[1]), "n_classes": int(np.unique(labels).size),
            "normalized": normalize, "ks": ks.to_json(), "relative_deviation": relative_deviation(x, labels)}


# --------------------------------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class AnalyzeConfig:
    """``dvml analyze``: analyse a run (or a cache's raw features), optionally against a baseline run.

    target: a run directory written by fit-heads, or a feature cache (then only raw features).
    baseline: a second run dir on the same cache (typically the same loss without DVML).
    raw: also analyse the cache's raw backbone features (the reference without any learned embedding).
    splits: which cache splits to analyse (view 0, the centre view, of each image).
    out: output directory (default ``<run dir>/analysis`` or ``<cache stem>-analysis`` beside the cache).
    plots: write PNG plots; tsne: include the t-SNE plots (the slow part: about 10-20 s of CPU per plot
    of 500 points at 500 iterations); plot_classes/plot_points bound the plotted subsample; tsne_iter:
    t-SNE iterations (>= 250).
    """

    target: Path
    baseline: Path | None = None
    raw: bool = True
    splits: tuple[str, ...] = ("train", "test")
    out: Path | None = None
    normalize: bool = True
    min_class_size: int = 5
    plots: bool = True
    tsne: bool = True
    plot_classes: int = 20
    plot_points: int = 500
    tsne_iter: int = 500
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "target", Path(self.target))
        if self.baseline is not None:
            object.__setattr__(self, "baseline", Path(self.baseline))
        if not self.splits or any(s not in ("train", "test") for s in self.splits):
            raise ValueError(f"splits must be a non-empty subset of ('train', 'test'), got {self.splits}")
        if self.min_class_size < 3:
            raise ValueError(f"min_class_size must be >= 3 (KS with fitted mean/std), got {self.min_class_size}")
        if self.plot_classes < 1 or self.plot_points < 10:
            raise ValueError("plot_classes must be >= 1 and plot_points >= 10")
        if self.tsne_iter < 250:
            raise ValueError(f"tsne_iter must be >= 250 (sklearn's minimum), got {self.tsne_iter}")

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        if self.target.is_dir():
            return self.target / "analysis"
        return self.target.with_name(self.target.stem + "-analysis")


def _describe_run(run_dir: Path) -> dict:
    from dvml.runs import load_run

    info = load_run(run_dir)
    cfg = dict(info.config)
    return {"run_dir": str(info.run_dir), "kind": info.kind, "cache": str(info.cache),
            "cache_fingerprint": info.cache_fingerprint, "loss": cfg.get("loss"),
            "dvml": cfg.get("dvml", None if "no_dvml" not in cfg else not cfg["no_dvml"])}


def run(cfg: AnalyzeConfig, *, progress: Callable[[str], None] | None = None) -> dict:
    """Analyse and write ``analysis.json`` (+ PNGs) into ``cfg.out_dir()``; return the analysis dict.

    ``progress`` is called with a short description before each step (for a CLI status line).
    """
    from dvml.cache import CacheError, fingerprint, load_split
    from dvml.heads import embed

    step = progress or (lambda _msg: None)
    sources: dict[str, dict] = {}  # name -> description; "run" / "baseline" are run dirs
    if not cfg.target.exists():
        raise DvmlError(f"{cfg.target}: no such run directory or feature cache")
    if cfg.target.is_dir():
        sources["run"] = _describe_run(cfg.target)
        cache = Path(sources["run"]["cache"])
    else:
        cache = cfg.target
    if cfg.baseline is not None:
        if not cfg.baseline.is_dir():
            raise DvmlError(f"`baseline` {cfg.baseline}: not a run directory")
        sources["baseline"] = _describe_run(cfg.baseline)
    if not cache.exists():
        raise DvmlError(f"{cfg.target}: its feature cache {cache} does not exist (moved?)")
    try:
        fp = fingerprint(cache)
    except CacheError as e:
        raise DvmlError(str(e)) from None
    for name, src in sources.items():
        if src["cache_fingerprint"] and src["cache_fingerprint"] != fp:
            raise DvmlError(f"{src['run_dir']} ({name}) was fit on a different cache than {cache} "
                            f"(fingerprint {src['cache_fingerprint']} vs {fp}); compare runs on the same features")
    if cfg.raw or not sources:
        sources["raw"] = {"cache": str(cache)}

    out = cfg.out_dir()
    files.make_dir(out)
    branch = {}
    for name in ("run", "baseline"):
        if name in sources and sources[name]["kind"] == "heads":
            from dvml.experiments.branch_report import run_report

            step(f"{name}: DVML branch diagnostics")
            branch[name] = run_report(Path(sources[name]["run_dir"]))
    result: dict = {"dvml_branch": branch, "cache": str(cache), "cache_fingerprint": fp, "normalized": cfg.normalize,
                    "min_class_size": cfg.min_class_size, "sources": sources, "splits": {}, "plots": [],
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                    "dvml_version": __version__,
                    "definitions": {
                        "central_features": "embedding minus its class mean (L2-normalised first when normalized)",
                        "ks": "per class and dimension: two-sided KS vs normal(fitted mean, MLE std); mean over "
                              "dimensions per class; mean/std over classes",
                        "relative_deviation": "per class: mean ||z - m_c|| / ||m_c||; mean/std over classes"}}
    from dvml.evaluate import plots

    for split in cfg.splits:
        step(f"loading {split} features")
        data = load_split(cache, split, views=[0])
        feats, labels = data.features[:, 0], data.labels
        result["splits"][split] = {}
        pvals = {}
        for name, src in sources.items():
            step(f"{split}: {name}")
            emb = feats if name == "raw" else embed(Path(src["run_dir"]), feats)
            res = analyze_embeddings(emb, labels, normalize=cfg.normalize, min_class_size=cfg.min_class_size)
            result["splits"][split][name] = res
            pvals[name] = np.asarray(list(res["ks"]["per_class"].values()))
            log.info("%s/%s: KS p %.3f ± %.3f over %d classes, relative deviation %.1f%%", split, name,
                     res["ks"]["mean"], res["ks"]["std"], res["ks"]["n_classes"],
                     100 * res["relative_deviation"]["mean"])
            if cfg.plots and split == "test":
                result["plots"] += _projection_plots(cfg, emb, labels, split, name, out, step)
        if cfg.plots:
            p = plots.pvalue_histogram(pvals, out / f"{split}_ks_pvalues.png",
                                       title=f"KS p-values of central features per class ({split})")
            result["plots"].append(p.name)
    files.write_text(json.dumps(result, indent=2, default=_json_default), out / ANALYSIS_FILE)
    result["out"] = str(out)
    return result


def _projection_plots(cfg: AnalyzeConfig, emb: np.ndarray, labels: np.ndarray, split: str, name: str, out: Path,
                      step: Callable[[str], None]) -> list[str]:
    """PCA (and t-SNE) of a subsample of the embeddings and t-SNE of the central latent space (Fig. 1);
    returns the PNG names."""
    from dvml.evaluate import plots

    names: list[str] = []
    idx = plots.subsample_classes(labels, max_classes=cfg.plot_classes, max_points=cfg.plot_points,
                                  seed=cfg.seed)
    x = l2_normalize(emb[idx]) if cfg.normalize else emb[idx]
    # the central latent space (Fig. 1): centres from all members of each plotted class
    central, _, _ = central_features(l2_normalize(emb) if cfg.normalize else emb, labels)
    jobs = [(x, "pca", f"{split}_{name}_pca.png", f"{name} embeddings, {split} split")]
    if cfg.tsne:
        jobs += [(x, "tsne", f"{split}_{name}_tsne.png", f"{name} embeddings, {split} split"),
                 (central[idx], "tsne", f"{split}_{name}_central_tsne.png",
                  f"{name}: central latent space, {split}")]
    for points, method, fname, title in jobs:
        step(f"{split}: {fname}")
        p = plots.projection_plot(points, labels[idx], out / fname, method=method, title=title,
                                  seed=cfg.seed, tsne_iter=cfg.tsne_iter)
        names.append(p.name)
    return names


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
