"""``dvml.experiments.ablate``: grid files and rows, resume without refitting, summary == per-run metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dvml.cache import fingerprint
from dvml.errors import DvmlError
from dvml.evaluate.labels import metric_label
from dvml.experiments import ablate, stacking
from dvml.extract.synth import SynthConfig, generate

# tiny and fast: 1 epoch of 2 steps per cell, no watch-only evaluation during the fit
FIT = {"epochs": 1, "embedding_size": 16, "decoder_hidden": 16, "samples": 2, "batch_size": 12, "eval_every": 0,
       "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablate") / "w.h5"
    return generate(SynthConfig(n_classes=12, images_per_class=6, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), path)


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory):
    """One finished grid: triplet, 2 seeds, baseline and DVML (4 cells), with the events it reported."""
    out = tmp_path_factory.mktemp("grid")
    events = []
    cfg = ablate.AblateConfig(cache=tiny_cache, out=out, losses=("triplet",), seeds=(0, 1), fit=FIT)
    result = ablate.run(cfg, callback=events.append)
    return cfg, result, events


def test_writes_one_row_per_cell_and_every_file(finished, tiny_cache):
    cfg, result, events = finished
    rows = ablate.read_results_csv(cfg.out / ablate.RESULTS_FILE)
    assert [(r["loss"], r["dvml"], r["seed"]) for r in rows] == [
        ("triplet", False, 0), ("triplet", True, 0), ("triplet", False, 1), ("triplet", True, 1)]
    for r in rows:
        assert set(r) >= {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r", "r_precision",
                          "run_dir", "fit_seconds", "eval_seconds"}
        assert (cfg.out / "runs" / f"triplet-{'dvml' if r['dvml'] else 'base'}-s{r['seed']}" / "heads.pt"
                ).exists()
        assert r["fit_seconds"] > 0 and 0 <= r["recall@1"] <= 1
    for name in (ablate.SUMMARY_MD, ablate.SUMMARY_JSON, ablate.CHART_FILE, ablate.PROVENANCE_FILE):
        assert (cfg.out / name).stat().st_size > 0
    assert (cfg.out / ablate.CHART_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((cfg.out / ablate.PROVENANCE_FILE).read_text())
    assert prov["cache_fingerprint"] == fingerprint(tiny_cache) and prov["fit"]["epochs"] == 1
    assert prov["finished"] and "torch" in prov["versions"]
    # the runs record which DVML switch they were fit with
    for r in rows:
        run_cfg = json.loads((ablate.Path(r["run_dir"]) / "config.json").read_text())["config"]
        assert run_cfg["dvml"] == r["dvml"] and run_cfg["seed"] == r["seed"] and run_cfg["loss"] == "triplet"
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("cell_done") == 4
    assert any(e.kind == "epoch" and e.info.get("kind") == "epoch" for e in events)


def test_against_numpy_and_scipy_summary_matches_per_run_metrics(finished):
    cfg, result, _ = finished
    summary = json.loads((cfg.out / ablate.SUMMARY_JSON).read_text())
    per_run = {}
    for cell in cfg.cells():
        per_run[cell] = json.loads((ablate.run_dir(cfg, cell) / "metrics.json").read_text())
    md = (cfg.out / ablate.SUMMARY_MD).read_text()
    for metric in ("recall@1", "nmi", "map@r"):
        base = [per_run[ablate.Cell("triplet", False, s)][metric] for s in (0, 1)]
        dv = [per_run[ablate.Cell("triplet", True, s)][metric] for s in (0, 1)]
        e = summary["losses"]["triplet"]["metrics"][metric]
        assert e["baseline"]["mean"] == pytest.approx(np.mean(base))
        assert e["baseline"]["std"] == pytest.approx(np.std(base, ddof=1))
        assert e["DVML"]["mean"] == pytest.approx(np.mean(dv))
        d = np.subtract(dv, base)
        assert e["diff"]["mean"] == pytest.approx(d.mean())
        if d.std() > 1e-9:  # scipy's interval needs spread
            ci = stats.ttest_rel(dv, base).confidence_interval(0.95)
            assert (e["diff"]["low"], e["diff"]["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        base_txt = f"{100 * np.mean(base):.1f} ± {100 * np.std(base, ddof=1):.1f}"
        assert f"| {metric_label(metric)} | {base_txt} |" in md  # the metric's display name (R@1, NMI, MAP@R)
    assert json.loads(json.dumps(ablate._nan_to_none(result["losses"]))) == summary["losses"]


def test_resume_skips_finished_cells(finished, tiny_cache, tmp_path, monkeypatch):
    cfg, _, _ = finished
    out = tmp_path / "grid"
    import shutil

    shutil.copytree(cfg.out, out)
    again = ablate.AblateConfig(cache=tiny_cache, out=out, losses=("triplet",), seeds=(0, 1), fit=FIT)
    # simulate an interruption: one cell lost its metrics (evaluation never finished), one never got past setup
    (ablate.run_dir(again, ablate.Cell("triplet", True, 1)) / "metrics.json").unlink()
    half = ablate.run_dir(again, ablate.Cell("triplet", False, 1))
    for p in half.iterdir():
        if p.name != "config.json":
            p.unlink()
    mtimes = {c: (ablate.run_dir(again, c) / "heads.pt").stat().st_mtime_ns
              for c in again.cells() if c.seed == 0}
    calls = []
    real_fit = ablate.fit

    def counting_fit(fit_cfg, **kw):
        calls.append((fit_cfg.loss.value, fit_cfg.dvml, fit_cfg.seed))
        return real_fit(fit_cfg, **kw)

    monkeypatch.setattr(ablate, "fit", counting_fit)
    events = []
    result = ablate.run(again, callback=events.append)
    assert sorted(calls) == [("triplet", False, 1), ("triplet", True, 1)]
    assert [e.cell.seed for e in events if e.kind == "cell_skipped"] == [0, 0]
    for c, t in mtimes.items():
        assert (ablate.run_dir(again, c) / "heads.pt").stat().st_mtime_ns == t
    assert len(ablate.read_results_csv(out / ablate.RESULTS_FILE)) == 4 and len(result["rows"]) == 4
    # the same seed and config reproduce the lost cells exactly
    old = ablate.read_results_csv(cfg.out / ablate.RESULTS_FILE)
    new = ablate.read_results_csv(out / ablate.RESULTS_FILE)
    for a, b in zip(old, new, strict=True):
        assert a["recall@1"] == b["recall@1"] and a["map@r"] == pytest.approx(b["map@r"])
    # a third run has nothing left to do
    calls.clear()
    ablate.run(again)
    assert calls == []


def test_refuses_bad_options_before_fitting(tiny_cache, tmp_path, finished):
    with pytest.raises(ValueError, match="set per cell"):
        ablate.AblateConfig(cache=tiny_cache, out=tmp_path, fit={"seed": 3})
    with pytest.raises(DvmlError, match="unknown fit option"):
        ablate.run(ablate.AblateConfig(cache=tiny_cache, out=tmp_path / "a", fit={"epochz": 3}))
    assert not (tmp_path / "a" / "runs").exists()
    with pytest.raises(DvmlError, match="triplett"):  # the second loss is checked before the first one fits
        ablate.run(ablate.AblateConfig(cache=tiny_cache, out=tmp_path / "c", losses=("triplet", "triplett"), fit=FIT))
    assert not (tmp_path / "c" / "runs").exists()
    with pytest.raises(DvmlError, match=r"npair-base-s0: margin does not apply to loss npair \(its parameters: none\)"):
        ablate.run(ablate.AblateConfig(cache=tiny_cache, out=tmp_path / "d", losses=("triplet", "npair"),
                                       fit={**FIT, "margin": 0.3}))
    assert not (tmp_path / "d").exists()  # a refused grid writes nothing
    cfg, _, _ = finished
    with pytest.raises(DvmlError, match="other fit options"):
        ablate.run(ablate.AblateConfig(cache=tiny_cache, out=cfg.out, losses=("triplet",), seeds=(0, 1),
                                       fit={**FIT, "epochs": 2}))
    with pytest.raises(DvmlError, match="no such file|not"):
        ablate.run(ablate.AblateConfig(cache=tmp_path / "missing.h5", out=tmp_path / "b"))


def test_summarize_pairs_by_seed_and_handles_missing():
    rows = [{"loss": "l", "dvml": False, "seed": 0, "recall@1": 0.5},
            {"loss": "l", "dvml": True, "seed": 0, "recall@1": 0.6},
            {"loss": "l", "dvml": False, "seed": 1, "recall@1": 0.4},
            {"loss": "l", "dvml": True, "seed": 2, "recall@1": 0.9}]  # seed 2 has no baseline: not paired
    s = ablate.summarize(rows)
    e = s["losses"]["l"]
    assert e["paired_seeds"] == [0] and e["n_seeds"] == {"baseline": 2, "DVML": 2}
    m = e["metrics"]["recall@1"]
    assert m["diff"]["mean"] == pytest.approx(0.1) and m["diff"]["n"] == 1 and math.isnan(m["diff"]["low"])
    assert m["DVML"]["mean"] == pytest.approx(0.75)
    only_base = ablate.summarize([{"loss": "l", "dvml": False, "seed": 0, "recall@1": 0.5}])
    assert only_base["losses"]["l"]["metrics"]["recall@1"]["DVML"] is None
    assert only_base["losses"]["l"]["metrics"]["recall@1"]["diff"] is None
    assert "—" in ablate.summary_markdown(only_base)


def test_per_class_recall_is_kept_per_run_and_compared(finished):
    import csv

    cfg, result, _ = finished
    with open(cfg.out / ablate.PER_CLASS_FILE, newline="") as f:
        per_class = list(csv.DictReader(f))
    rows = ablate.read_results_csv(cfg.out / ablate.RESULTS_FILE)
    for r in rows:  # each run's classes average back (weighted by count) to its Recall@1 in results.csv
        mine = [p for p in per_class if p["seed"] == str(r["seed"]) and p["dvml"] == str(r["dvml"])]
        assert len(mine) == 6  # the tiny cache has 6 test classes
        counts = np.array([int(p["count"]) for p in mine])
        r1 = np.array([float(p["recall@1"]) for p in mine])
        assert (counts * r1).sum() / counts.sum() == pytest.approx(r["recall@1"], abs=1e-12)
        assert (ablate.Path(r["run_dir"]) / ablate.PER_CLASS_FILE).is_file()
    with open(cfg.out / ablate.PER_CLASS_COMPARE_FILE, newline="") as f:
        compare = list(csv.DictReader(f))
    assert len(compare) == 6 and {c["loss"] for c in compare} == {"triplet"}
    for c in compare:
        def mean(dvml, cls=c["class"]):
            return np.mean([float(p["recall@1"]) for p in per_class if p["class"] == cls and p["dvml"] == dvml])
        assert float(c["recall@1_baseline"]) == pytest.approx(mean("False"))
        assert float(c["recall@1_dvml"]) == pytest.approx(mean("True"))
        assert float(c["diff"]) == pytest.approx(mean("True") - mean("False"))
        assert (c["seeds_baseline"], c["seeds_dvml"]) == ("2", "2")
    diffs = [float(c["diff"]) for c in compare]
    assert diffs == sorted(diffs)


def test_noise_arm_extends_a_grid_and_is_summarised_against_dvml(finished, tiny_cache, tmp_path, monkeypatch):
    import shutil

    cfg, _, _ = finished
    out = tmp_path / "grid3"
    shutil.copytree(cfg.out, out)
    three = ablate.AblateConfig(cache=tiny_cache, out=out, losses=("triplet",), seeds=(0, 1), fit=FIT,
                                methods=ablate.parse_methods("base,dvml,noise"))
    calls = []
    real_fit, real_stacked = ablate.fit, stacking.fit_stacked
    monkeypatch.setattr(ablate, "fit", lambda c, **kw: (calls.append((c.dvml, c.variance_source.value, c.seed)),
                                                        real_fit(c, **kw))[1])
    monkeypatch.setattr(stacking, "fit_stacked", lambda cs, **kw: (
        calls.extend((c.dvml, c.variance_source.value, c.seed) for c in cs), real_stacked(cs, **kw))[1])
    result = ablate.run(three)
    assert sorted(calls) == [(True, "noise", 0), (True, "noise", 1)]  # the base and dvml cells were kept
    assert {json.loads((out / "runs" / f"triplet-noise-s{s}" / "config.json").read_text())["trainer"]
            for s in (0, 1)} == {"stacked"}  # the two new noise cells, one stack
    rows = ablate.read_results_csv(out / ablate.RESULTS_FILE)
    assert [(r["method"], r["seed"]) for r in rows] == [("base", 0), ("dvml", 0), ("noise", 0), ("base", 1),
                                                         ("dvml", 1), ("noise", 1)]
    for r in rows:
        run_cfg = json.loads((ablate.Path(r["run_dir"]) / "config.json").read_text())["config"]
        assert run_cfg["variance_source"] == ("noise" if r["method"] == "noise" else "learned")
    assert (out / "runs" / "triplet-noise-s1" / "heads.pt").exists()
    e = result["losses"]["triplet"]["metrics"]["map@r"]
    dv = [r["map@r"] for r in rows if r["method"] == "dvml"]
    nz = [r["map@r"] for r in rows if r["method"] == "noise"]
    assert e["noise"]["mean"] == pytest.approx(np.mean(nz))
    assert e["diff_noise"]["mean"] == pytest.approx(np.mean(np.subtract(dv, nz)))
    assert result["losses"]["triplet"]["n_seeds"] == {"baseline": 2, "DVML": 2, "noise": 2}
    md = (out / ablate.SUMMARY_MD).read_text()
    assert "| metric | baseline | DVML | noise | Δ [95% CI] | p | Δ vs noise [95% CI] | p |" in md


def test_results_written_before_the_method_column_read_back(tmp_path):
    old = tmp_path / "results.csv"
    old.write_text("loss,dvml,seed,recall@1,map@r,run_dir,fit_seconds,eval_seconds\n"
                   "triplet,False,0,0.5,0.2,runs/triplet-base-s0,1.0,1.0\n"
                   "triplet,True,0,0.6,0.3,runs/triplet-dvml-s0,1.0,1.0\n")
    rows = ablate.read_results_csv(old)
    assert [r["method"] for r in rows] == ["base", "dvml"]
    assert [ablate.Cell(r["loss"], ablate.row_method(r), r["seed"]).name for r in rows] == [
        "triplet-base-s0", "triplet-dvml-s0"]
    s = ablate.summarize(rows)
    assert s["methods"] == ["baseline", "DVML"] and "diff_noise" not in s["losses"]["triplet"]["metrics"]["map@r"]
    assert s["losses"]["triplet"]["metrics"]["map@r"]["diff"]["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="^methods must be a comma-separated subset of base, dvml, noise"):
        ablate.parse_methods("base,gauss")
