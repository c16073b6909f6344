"""Query/gallery evaluation (schema-2 caches, In-Shop) and per-class results, against brute force.

The reference ranks every query against every gallery row with a dense numpy distance matrix (a query
that is also a gallery row gets +inf to itself), then computes Recall@K, MAP@R and R-precision by loops
over plain Python lists, independently of dvml's metric functions.
"""

from __future__ import annotations

import numpy as np
import pytest

from dvml.cache import schema as S
from dvml.evaluate import EvaluationError, evaluate_embeddings


def _data(seed=0, n_classes=9, per_class=7, dim=10, spread=1.3):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes) * 5 + 2, per_class)
    x = rng.normal(size=(n_classes, dim))[np.repeat(np.arange(n_classes), per_class)] * 2
    x = (x + spread * rng.normal(size=x.shape)).astype(np.float32)
    # roles: per class, 2 queries, 1 both, the rest gallery; then shuffle rows
    roles = np.tile([S.ROLE_QUERY, S.ROLE_QUERY, S.ROLE_BOTH] + [S.ROLE_GALLERY] * (per_class - 3), n_classes)
    perm = rng.permutation(y.size)
    return x[perm], y[perm], roles[perm].astype(np.int8)


def _brute_force(x, y, roles, ks, metric):
    q = np.flatnonzero(roles & S.ROLE_QUERY)
    g = np.flatnonzero(roles & S.ROLE_GALLERY)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - xn[q] @ xn[g].T
    else:
        dist = np.sqrt(((x[q][:, None, :] - x[g][None, :, :]) ** 2).sum(-1))
    dist[q[:, None] == g[None, :]] = np.inf  # a query never retrieves itself
    out = {f"recall@{k}": [] for k in ks}
    ap, rp, per_class = [], [], {}
    for row, qi in enumerate(q):
        order = [int(g[j]) for j in np.argsort(dist[row], kind="stable") if int(g[j]) != qi]
        same = [y[j] == y[qi] for j in order]
        r = sum(1 for j in g if y[j] == y[qi] and j != qi)
        for k in ks:
            out[f"recall@{k}"].append(any(same[:k]))
        hits, s = 0, 0.0
        for i in range(r):
            if same[i]:
                hits += 1
                s += hits / (i + 1)
        ap.append(s / r)
        rp.append(sum(same[:r]) / r)
        per_class.setdefault(int(y[qi]), []).append((same[0], s / r))
    ref = {k: float(np.mean(v)) for k, v in out.items()}
    ref["map@r"], ref["r_precision"] = float(np.mean(ap)), float(np.mean(rp))
    rows = [{"class": c, "count": len(v), "recall@1": float(np.mean([h for h, _ in v])),
             "map@r": float(np.mean([a for _, a in v]))} for c, v in sorted(per_class.items())]
    return ref, rows


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_query_gallery_metrics_equal_brute_force(metric):
    x, y, roles = _data()
    ks = (1, 2, 4, 10)
    got = evaluate_embeddings(x, y, roles=roles, ks=ks, metric=metric, clustering=False, per_class=True)
    ref, rows = _brute_force(x, y, roles, ks, metric)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert (got["n_query"], got["n_gallery"]) == (27, 45)
    assert [r["class"] for r in got["per_class"]] == [r["class"] for r in rows]
    for mine, theirs in zip(got["per_class"], rows, strict=True):
        assert mine["count"] == theirs["count"]
        assert mine["recall@1"] == pytest.approx(theirs["recall@1"]) and mine["map@r"] == pytest.approx(theirs["map@r"])
    assert 0 < got["recall@1"] < 1  # not a degenerate case


def test_per_class_rows_average_back_to_the_overall_values():
    for roles in (None, _data(seed=3)[2]):
        x, y, _ = _data(seed=3)
        got = evaluate_embeddings(x, y, roles=roles, ks=(1,), clustering=False, per_class=True)
        counts = np.array([r["count"] for r in got["per_class"]])
        for key in ("recall@1", "map@r"):
            values = np.array([r[key] for r in got["per_class"]])
            assert (counts * values).sum() / counts.sum() == pytest.approx(got[key], abs=1e-12)
        assert counts.sum() == (y.size if roles is None else int((roles & S.ROLE_QUERY > 0).sum()))


def test_all_rows_both_is_exactly_the_all_vs_all_protocol():
    x, y, _ = _data(seed=5)
    plain = evaluate_embeddings(x, y, ks=(1, 2, 4, 8), seed=3)
    both = evaluate_embeddings(x, y, roles=np.full(y.size, S.ROLE_BOTH, np.int8), ks=(1, 2, 4, 8), seed=3)
    assert both.pop("n_query") == both.pop("n_gallery") == y.size
    assert both == plain  # bit-identical, NMI/F1 included


def test_clustering_runs_on_the_gallery():
    x, y, roles = _data(seed=6)
    got = evaluate_embeddings(x, y, roles=roles, ks=(1,), seed=2)
    g = (roles & S.ROLE_GALLERY) > 0
    on_gallery = evaluate_embeddings(x[g], y[g], ks=(1,), seed=2)
    for key in ("nmi", "f1", "precision", "recall"):
        assert got[key] == on_gallery[key]


def test_query_without_a_gallery_positive_is_named():
    x, y, roles = _data(seed=7)
    roles = roles.copy()
    roles[(y == 2) & (roles == S.ROLE_GALLERY)] = S.ROLE_QUERY  # class 2 keeps only its 'both' row in the gallery
    with pytest.raises(EvaluationError, match="1 query class\\(es\\) have no \\(other\\) gallery item.*class 2"):
        evaluate_embeddings(x, y, roles=roles, ks=(1,), clustering=False)
    with pytest.raises(EvaluationError, match="K=100 is larger than the set.*gallery items"):
        evaluate_embeddings(x, y, roles=_data(seed=7)[2], ks=(1, 100), clustering=False)
