"""``dvml evaluate`` with query/gallery caches and per-class results: In-Shop end to end (extract -> fit-heads ->
evaluate, through the CLI), per-class CSVs, and version-1 caches evaluated exactly as before (against numbers
the code before this change produced)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import CacheSpec, CacheWriter, load_split
from dvml.cache import schema as S
from dvml.cli import app
from dvml.extract.datasets import read_dataset
from dvml.extract.synth import SynthConfig, generate

runner = CliRunner()
DATA = Path(__file__).parent.parent / "data"
METRICS = ("recall@1", "recall@2", "recall@4", "nmi", "f1", "precision", "recall", "map@r", "r_precision")


def _ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _brute_force_recall(emb, labels, roles, k):
    """Recall@k of queries against the gallery from a dense cosine matrix (no dvml code)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q, g = np.flatnonzero(roles & S.ROLE_QUERY), np.flatnonzero(roles & S.ROLE_GALLERY)
    sim = e[q] @ e[g].T
    sim[q[:, None] == g[None, :]] = -np.inf
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean([(labels[g[row]] == labels[qi]).any() for row, qi in zip(top, q, strict=True)]))


def test_inshop_round_trip_extract_fit_evaluate(tiny_inshop, tmp_path):
    cache = tmp_path / "inshop.h5"
    _ok("extract", "inshop", "--root", tiny_inshop, "--out", cache, "--weights", "none", "--resize", "40",
        "--crop", "32", "--workers", "0", "--views", "2")
    info = " ".join(_ok("cache", "info", cache).output.split())
    assert "6 queries, 6 gallery (query/gallery protocol)" in info and "v2 /" in info
    run = tmp_path / "run"
    _ok("fit-heads", cache, "--out", run, "--epochs", "2", "--embedding-size", "8", "--decoder-hidden", "16",
        "--batch-size", "6", "--per-class", "2", "--eval-every", "1", "--device", "cpu")
    per_class = tmp_path / "pc.csv"
    result = _ok("evaluate", run, "--ks", "1,2,4", "--per-class", per_class, "--worst", "3")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "query/gallery" and (metrics["n_query"], metrics["n_gallery"]) == (6, 6)
    assert metrics["dataset"] == "inshop" and metrics["ks"] == [1, 2, 4]
    assert "6 queries vs 6 gallery" in " ".join(result.output.split())
    assert "worst 3 of 4 classes by Recall@1" in result.output
    # the same numbers from the heads' embeddings and a dense brute-force ranking
    from dvml.heads import embed

    test = load_split(cache, "test", views=[0])
    emb = np.asarray(embed(run, test.features[:, 0]))
    for k in (1, 2, 4):
        assert metrics[f"recall@{k}"] == pytest.approx(_brute_force_recall(emb, test.labels, test.roles, k))
    rows = _read_csv(per_class)
    assert [r["class"] for r in rows] == ["4", "5", "6", "7"] and [r["count"] for r in rows] == ["1", "2", "1", "2"]
    counts = np.array([int(r["count"]) for r in rows])
    assert (counts * np.array([float(r["recall@1"]) for r in rows])).sum() / counts.sum() == pytest.approx(
        metrics["recall@1"], abs=1e-12)
    assert "per_class" not in metrics and metrics["per_class_csv"] == str(per_class.resolve())
    # fit-heads' watch-only test Recall@1 uses the same protocol: its last epoch matches evaluate's
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["test_recall@1"] == pytest.approx(metrics["recall@1"])
    # the raw-feature baseline of the cache uses the same protocol; In-Shop's default Ks need a real gallery
    r = runner.invoke(app, ["evaluate", str(cache)])
    assert r.exit_code == 1 and "K=50 is larger than the set" in r.output and "gallery items" in r.output


@pytest.fixture(scope="module")
def v1_cache(tmp_path_factory):
    return generate(SynthConfig(n_classes=16, images_per_class=8, views=2, feature_dim=32, class_dim=16,
                                hidden_dim=16, seed=2), tmp_path_factory.mktemp("v1") / "v1.h5")


def _as_v2_all_both(v1, path):
    """The same features as a schema-2 file whose test rows are all 'both'."""
    tr, te = load_split(v1, "train"), load_split(v1, "test")
    spec = CacheSpec(dataset="synth", backbone="none", weights="none", feature_dim=tr.features.shape[2],
                     views=tuple(f"v{i}" for i in range(tr.features.shape[1])), test_views=te.features.shape[1],
                     dtype="float32", query_gallery=True)
    with CacheWriter(path, spec) as w:
        w.append("train", tr.features, tr.labels)
        w.append("test", te.features, te.labels, roles=np.full(len(te.labels), S.ROLE_BOTH))
        w.finalize()
    return path


def test_v1_cache_evaluates_as_before_and_per_class_averages_back(v1_cache, tmp_path):
    out1, out2, pc = tmp_path / "v1.json", tmp_path / "v2.json", tmp_path / "pc.csv"
    _ok("evaluate", v1_cache, "--json", out1, "--ks", "1,2,4", "--per-class", pc)
    v1 = json.loads(out1.read_text())
    assert "protocol" not in v1 and "n_query" not in v1  # the v1 result has exactly the keys it always had
    _ok("evaluate", _as_v2_all_both(v1_cache, tmp_path / "v2.h5"), "--json", out2, "--ks", "1,2,4")
    v2 = json.loads(out2.read_text())
    assert {k: v1[k] for k in METRICS} == {k: v2[k] for k in METRICS}  # 'both' everywhere == all-vs-all, exactly
    rows = _read_csv(pc)
    counts = np.array([int(r["count"]) for r in rows])
    assert counts.sum() == v1["n_test"] and len(rows) == v1["n_classes"]
    for key in ("recall@1", "map@r"):
        values = np.array([float(r[key]) for r in rows])
        assert (counts * values).sum() / counts.sum() == pytest.approx(v1[key], abs=1e-12)


def test_worst_classes_are_the_lowest_recall_rows(v1_cache, tmp_path):
    pc = tmp_path / "pc.csv"
    result = _ok("evaluate", v1_cache, "--ks", "1", "--no-clustering", "--per-class", pc, "--worst", "2")
    rows = sorted(_read_csv(pc), key=lambda r: (float(r["recall@1"]), float(r["map@r"]), -int(r["count"])))
    table = result.output.split("worst 2 of")[1]
    lines = [line for line in table.splitlines() if line.strip().startswith("│")]
    assert [line.split("│")[1].strip() for line in lines[:2]] == [rows[0]["class"], rows[1]["class"]]
    r = runner.invoke(app, ["evaluate", str(v1_cache), "--worst", "-1"])
    assert r.exit_code == 1 and "--worst must be >= 0" in r.output


def test_a_v1_cache_gives_the_numbers_of_the_code_before_query_gallery(tmp_path):
    """tests/data/v1_cache.h5 evaluated raw by dvml at commit bd9897c (before schema 2):
    ``evaluate_target(cache, seed=0)`` gave v1_cache_raw_expected_metrics.json."""
    expected = json.loads((DATA / "v1_cache_raw_expected_metrics.json").read_text())
    out = tmp_path / "m.json"
    _ok("evaluate", DATA / "v1_cache.h5", "--seed", "0", "--json", out, "--per-class", tmp_path / "pc.csv")
    got = json.loads(out.read_text())
    assert {k: got[k] for k in expected} == expected  # bit for bit
    assert got["cache_fingerprint"] == "dcf1178bd66c36c5173fac59b08720f1"  # the fingerprint the old code gave


def test_a_finetune_run_on_inshop_is_scored_query_against_gallery(tiny_inshop, tmp_path):
    from dvml.finetune import FinetuneConfig, embed_test_split, finetune

    out = tmp_path / "ft"
    finetune(FinetuneConfig(dataset="inshop", root=tiny_inshop, out=out, weights="none", resize=40, crop=32,
                            batch_size=6, per_class=2, samples=2, embedding_size=8, decoder_hidden=16, workers=0,
                            epochs=1, steps_per_epoch=2, checkpoint_every=0))
    _ok("evaluate", out, "--ks", "1,2", "--no-clustering")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_kind"] == "finetune" and metrics["protocol"] == "query/gallery"
    assert (metrics["n_query"], metrics["n_gallery"]) == (6, 6)
    emb, labels = embed_test_split(out)
    roles = np.array(read_dataset("inshop", tiny_inshop).test_roles)
    assert metrics["recall@1"] == pytest.approx(_brute_force_recall(emb, labels, roles, 1))
