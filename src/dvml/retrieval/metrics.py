"""Retrieval and clustering metrics as pure numpy functions over neighbour labels and cluster ids.

Definitions (the paper's section 4.1, and Musgrave et al. 2020, "A Metric Learning Reality Check"):

* Recall@K: fraction of queries with at least one same-class item among their K nearest neighbours.
* NMI: 2 I(Omega; C) / (H(Omega) + H(C)) between cluster ids Omega and class labels C (arithmetic-mean
  normaliser; equals scikit-learn's ``normalized_mutual_info_score`` default).
* Pairwise precision / recall / F1 of a clustering: over all unordered pairs of items, a pair is a
  true positive when it shares both cluster and class; computed from the contingency table.
* R-precision: with R = number of other items of the query's class, the fraction of the R nearest
  neighbours that share its class.
* MAP@R: mean over queries of (1/R) * sum_{i<=R} P(i) * rel(i), P(i) the precision among the first i.

Neighbour labels come from :func:`dvml.retrieval.knn.search` (query excluded from its own neighbours).
All results are fractions in [0, 1] as python floats. In a query/gallery protocol the neighbours are gallery
items and R is the number of gallery items of the query's class (the query itself not counted); pass ``r``.

:func:`hits_at_k` and :func:`average_precision_at_r` give the per-query values whose means are Recall@K and
MAP@R; :func:`per_class_means` groups per-query values by class (their count-weighted mean is the overall
mean).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _check_neighbours(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nl = np.asarray(neighbour_labels)
    ql = np.asarray(query_labels)
    if nl.ndim != 2:
        raise ValueError(f"neighbour_labels must be (N, k), got shape {nl.shape}")
    if ql.shape != (nl.shape[0],):
        raise ValueError(f"query_labels must be (N,) with N={nl.shape[0]}, got shape {ql.shape}")
    if nl.shape[0] == 0:
        raise ValueError("no queries")
    return nl, ql


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """Recall@K for every K in ``ks``.

    Args:
        neighbour_labels: (N, k) labels of each query's neighbours, nearest first (k >= max(ks)).
        query_labels: (N,) label of each query.
        ks: the K values.
    Returns:
        ``{"recall@K": fraction of queries with a same-class item among their first K neighbours}``,
        in the order of ``ks``.

    >>> nl = np.array([[1, 0, 0], [0, 0, 1], [2, 2, 2]])
    >>> recall_at_k(nl, np.array([0, 1, 0]), ks=(1, 2, 3))
    {'recall@1': 0.0, 'recall@2': 0.3333333333333333, 'recall@3': 0.6666666666666666}
    """
    nl, ql = _check_neighbours(neighbour_labels, query_labels)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    if min(ks) < 1 or max(ks) > nl.shape[1]:
        raise ValueError(f"every K must be in [1, {nl.shape[1]}] (neighbours available), got {ks}")
    match = nl[:, :max(ks)] == ql[:, None]
    # first_hit[i] = position of the first same-class neighbour (k_max if none)
    first_hit = np.where(match.any(axis=1), match.argmax(axis=1), max(ks))
    return {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks}


def hits_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Per query: is a same-class item among the first ``k`` neighbours? (N,) bool; its mean is Recall@k.

    >>> hits_at_k(np.array([[1, 0], [0, 1]]), np.array([0, 1]), k=1).tolist()
    [False, False]
    """
    nl, ql = _check_neighbours(neighbour_labels, query_labels)
    if not 1 <= k <= nl.shape[1]:
        raise ValueError(f"k must be in [1, {nl.shape[1]}] (neighbours available), got {k}")
    return (nl[:, :k] == ql[:, None]).any(axis=1)


def _r_of(query_labels: np.ndarray, r: np.ndarray | None) -> np.ndarray:
    if r is None:  # self-retrieval: the other members of the query's class
        _, inverse, counts = np.unique(query_labels, return_inverse=True, return_counts=True)
        return counts[inverse] - 1
    r = np.asarray(r, dtype=np.int64)
    if r.shape != query_labels.shape:
        raise ValueError(f"r must have shape {query_labels.shape}, got {r.shape}")
    return r


def _precision_curve(neighbour_labels, query_labels, r):
    nl, ql = _check_neighbours(neighbour_labels, query_labels)
    r = _r_of(ql, r)
    if (r < 1).any():
        bad = np.unique(ql[r < 1])
        shown = ", ".join(map(str, bad[:10])) + (" ..." if bad.size > 10 else "")
        raise ValueError(f"R = 0 for {int((r < 1).sum())} queries (class(es) with a single item: {shown}); "
                         "MAP@R and R-precision need at least one other item of the query's class")
    r_max = int(r.max())
    if r_max > nl.shape[1]:
        raise ValueError(f"need {r_max} neighbours per query (largest R) but got {nl.shape[1]}")
    rel = (nl[:, :r_max] == ql[:, None]) & (np.arange(r_max)[None, :] < r[:, None])  # only the first R count
    return rel, r


def r_precision(neighbour_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray | None = None) -> float:
    """Mean R-precision (Musgrave et al.).

    Args:
        neighbour_labels: (N, k) neighbour labels, nearest first, query excluded, k >= max R.
        query_labels: (N,) query labels.
        r: (N,) R per query; default: the number of *other* queries with the same label (self-retrieval).
    Returns:
        mean over queries of (same-class items among the first R neighbours) / R.

    >>> nl = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    >>> r_precision(nl, np.array([0, 0, 0, 1]), r=np.array([2, 2, 2, 1]))
    0.5
    """
    rel, r = _precision_curve(neighbour_labels, query_labels, r)
    return float(np.mean(rel.sum(axis=1) / r))


def map_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray | None = None) -> float:
    """Mean average precision at R (Musgrave et al.).

    Args: as :func:`r_precision`.
    Returns:
        mean over queries of (1/R) * sum_{i=1..R} P(i) * rel(i), with P(i) the fraction of same-class items
        among the first i neighbours and rel(i) = 1 when neighbour i shares the query's class.

    >>> nl = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    >>> map_at_r(nl, np.array([0, 0, 0, 1]), r=np.array([2, 2, 2, 1]))
    0.4375
    """
    return float(np.mean(average_precision_at_r(neighbour_labels, query_labels, r)))


def average_precision_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                           r: np.ndarray | None = None) -> np.ndarray:
    """Per-query AP@R, (N,) float64; its mean is :func:`map_at_r`. Args as :func:`r_precision`.

    >>> average_precision_at_r(np.array([[0, 1, 0], [1, 0, 0]]), np.array([0, 0]), r=np.array([2, 2])).tolist()
    [0.5, 0.25]
    """
    rel, r = _precision_curve(neighbour_labels, query_labels, r)
    hits = np.cumsum(rel, axis=1)
    precision_at_i = hits / np.arange(1, rel.shape[1] + 1)[None, :]
    return (precision_at_i * rel).sum(axis=1) / r


def per_class_means(query_labels: np.ndarray, **values: np.ndarray) -> dict[str, np.ndarray]:
    """Group per-query values by the query's class.

    Args:
        query_labels: (N,) class of each query.
        values: named (N,) per-query arrays (e.g. ``recall_at_1=hits_at_k(...)``).
    Returns:
        ``{"class": (C,) sorted class ids, "count": (C,) queries per class, name: (C,) mean per class}``;
        ``sum(count * mean) / sum(count)`` is the overall mean of each value.

    >>> out = per_class_means(np.array([7, 3, 7]), hit=np.array([1.0, 0.0, 0.0]))
    >>> out["class"].tolist(), out["count"].tolist(), out["hit"].tolist()
    ([3, 7], [1, 2], [0.0, 0.5])
    """
    ql = np.asarray(query_labels).reshape(-1)
    classes, inverse, counts = np.unique(ql, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    out: dict[str, np.ndarray] = {"class": classes, "count": counts.astype(np.int64)}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.shape != ql.shape:
            raise ValueError(f"{name} must have one value per query ({ql.shape[0]}), got shape {v.shape}")
        out[name] = np.bincount(inverse, weights=v, minlength=classes.size) / counts
    return out


def contingency(cluster_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of a clustering against class labels.

    Returns:
        ``(n_ij, a_i, b_j)``: counts of the non-empty (cluster, class) cells, items per cluster, items per
        class (each 1-D int64). Only non-empty cells are formed, so 11k x 11k tables cost O(N) memory.

    >>> [c.tolist() for c in contingency(np.array([0, 0, 1, 1]), np.array([5, 5, 5, 7]))]
    [[2, 1, 1], [2, 2], [3, 1]]
    """
    c = np.asarray(cluster_ids)
    y = np.asarray(labels)
    if c.ndim != 1 or c.shape != y.shape:
        raise ValueError(f"cluster_ids and labels must be 1-D of equal length, got {c.shape} and {y.shape}")
    if c.size == 0:
        raise ValueError("no items")
    _, ci = np.unique(c, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    ci, yi = ci.reshape(-1).astype(np.int64), yi.reshape(-1).astype(np.int64)
    _, n_ij = np.unique(ci * (int(yi.max()) + 1) + yi, return_counts=True)
    return n_ij.astype(np.int64), np.bincount(ci).astype(np.int64), np.bincount(yi).astype(np.int64)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi(cluster_ids: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information 2 I(Omega; C) / (H(Omega) + H(C)) (natural log; base-free ratio).

    Args:
        cluster_ids: (N,) cluster id of each item.
        labels: (N,) class label of each item.
    Returns:
        NMI in [0, 1]; 1.0 when both partitions are a single block (no information, perfect agreement).

    >>> nmi(np.array([0, 0, 1, 1]), np.array([7, 7, 3, 3]))
    1.0
    >>> nmi(np.array([0, 1, 0, 1]), np.array([7, 7, 3, 3]))
    0.0
    """
    c = np.asarray(cluster_ids)
    y = np.asarray(labels)
    n_ij, a, b = contingency(c, y)
    n = c.size
    h_c, h_y = _entropy(a, n), _entropy(b, n)
    if h_c == 0.0 and h_y == 0.0:
        return 1.0
    # I = sum_ij p_ij log(p_ij / (p_i p_j)) = H(C) + H(Y) - H(C, Y)
    mi = h_c + h_y - _entropy(n_ij, n)
    return float(min(max(2.0 * mi / (h_c + h_y), 0.0), 1.0))


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_f1(cluster_ids: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pairwise precision, recall and F1 of a clustering, from the contingency table (no pair enumeration).

    Over unordered pairs of distinct items: TP = pairs in the same cluster and the same class,
    precision = TP / same-cluster pairs, recall = TP / same-class pairs, F1 their harmonic mean.
    A quantity whose denominator is zero is reported as 0.

    Args:
        cluster_ids: (N,) cluster id of each item.
        labels: (N,) class label of each item.
    Returns:
        ``{"f1": ..., "precision": ..., "recall": ...}``.

    >>> pairwise_f1(np.array([0, 0, 0, 1]), np.array([5, 5, 6, 6]))
    {'f1': 0.4, 'precision': 0.3333333333333333, 'recall': 0.5}
    """
    n_ij, a, b = contingency(cluster_ids, labels)
    tp, same_cluster, same_class = _pairs(n_ij), _pairs(a), _pairs(b)
    precision = tp / same_cluster if same_cluster else 0.0
    recall = tp / same_class if same_class else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall)}
