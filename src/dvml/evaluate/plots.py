"""PNG plots (matplotlib, Agg backend: no display needed): 2-D projections and ablation bar charts.

Everything here takes numpy arrays and a path and writes one PNG; nothing is shown or printed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: a file renderer, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dvml import files  # noqa: E402

log = logging.getLogger(__name__)


def subsample_classes(labels: np.ndarray, *, max_classes: int, max_points: int,
                      seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` rows from at most ``max_classes`` classes (seeded, sorted).

    Classes are drawn at random (so the plot is not only the first ids), then rows at random within them.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if classes.size > max_classes:
        classes = np.sort(rng.choice(classes, max_classes, replace=False))
    idx = np.flatnonzero(np.isin(labels, classes))
    if idx.size > max_points:
        idx = np.sort(rng.choice(idx, max_points, replace=False))
    return idx


def project(points: np.ndarray, method: str, *, seed: int = 0, tsne_iter: int = 500) -> np.ndarray:
    """(N, E) -> (N, 2) by ``"pca"`` (sklearn PCA) or ``"tsne"`` (sklearn Barnes-Hut TSNE, PCA init).

    t-SNE first reduces to at most 50 dimensions with PCA (the usual speed-up; neighbourhoods barely
    change) and runs ``tsne_iter`` iterations (>= 250; sklearn's default 1000 costs minutes on a CPU
    for a thousand points). t-SNE runs with one OpenMP thread: sklearn's Barnes-Hut gradient spins its
    threads on every one of its ~1000 small parallel loops, which on a busy 2-core machine made it 5-8x
    slower (measured: 500 points, 500 iterations: 33 s wall with the default threads, 6 s with one).
    """
    from sklearn.decomposition import PCA

    points = np.asarray(points, dtype=np.float64)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(points)
    if method == "tsne":
        from sklearn.manifold import TSNE

        n, dim = points.shape
        if dim > 50 and n > 50:
            points = PCA(n_components=50, random_state=seed).fit_transform(points)
        from threadpoolctl import threadpool_limits

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        with threadpool_limits(limits=1, user_api="openmp"):
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto",
                        max_iter=max(250, int(tsne_iter))).fit_transform(points)
    raise ValueError(f"unknown projection {method!r}; use 'pca' or 'tsne'")


def scatter_by_class(xy: np.ndarray, labels: np.ndarray, path: Path, *, title: str) -> Path:
    """Scatter (N, 2) points coloured by class label into ``path`` (PNG)."""
    path = Path(path)
    classes, inv = np.unique(labels, return_inverse=True)
    cmap = plt.get_cmap("tab20" if classes.size <= 20 else "hsv")
    colours = cmap(inv % 20 if classes.size <= 20 else inv / max(1, classes.size))
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=10, alpha=0.8, linewidths=0)
    ax.set_title(f"{title}\n{labels.size} points, {classes.size} classes (colour = class)", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    files.write_file(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def projection_plot(points: np.ndarray, labels: np.ndarray, path: Path, *, method: str, title: str,
                    seed: int = 0, tsne_iter: int = 500) -> Path:
    """Project (N, E) ``points`` to 2-D with ``method`` and scatter them by class into ``path``."""
    return scatter_by_class(project(points, method, seed=seed, tsne_iter=tsne_iter), np.asarray(labels), path,
                            title=f"{title} ({method.upper()})")


def pvalue_histogram(pvalues: Mapping[str, np.ndarray], path: Path, *, title: str) -> Path:
    """Overlaid histograms of per-class mean KS p-values, one series per name."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    bins = np.linspace(0, 1, 21)
    for name, p in pvalues.items():
        p = np.asarray(p, dtype=float)
        p = p[np.isfinite(p)]
        ax.hist(p, bins=bins, alpha=0.5, label=f"{name} (mean {p.mean():.2f})" if p.size else name)
    ax.set_xlabel("per-class mean KS p-value of central features")
    ax.set_ylabel("classes")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.write_file(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def grouped_bars(groups: Sequence[str], panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                 path: Path, *, title: str, scale: float = 100.0) -> Path:
    """Grouped bar charts with error bars, one panel per metric, side by side in one PNG.

    Args:
        groups: x-axis groups (e.g. losses).
        panels: panel title (e.g. "recall@1") -> {series name (e.g. "baseline"): (means, errors)}, each
            sequence of len(groups); values are multiplied by ``scale`` (fractions -> percent); NaN errors
            draw no error bar, NaN means no bar.
    """
    path = Path(path)
    n_panels = max(1, len(panels))
    x = np.arange(len(groups))
    fig, axes = plt.subplots(1, n_panels, figsize=(max(4.0, 1.2 * len(groups) + 2.5) * n_panels, 4), dpi=110,
                             squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=False):
        n = max(1, len(series))
        width = 0.8 / n
        for i, (name, (means, errs)) in enumerate(series.items()):
            m = np.asarray(means, dtype=float) * scale
            e = np.nan_to_num(np.asarray(errs, dtype=float), nan=0.0) * scale
            ax.bar(x + (i - (n - 1) / 2) * width, m, width, yerr=e, capsize=4, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.set_title(panel, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("%" if scale == 100.0 else "value")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.write_file(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
