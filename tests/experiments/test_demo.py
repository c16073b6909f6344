"""``dvml demo``: the reduced (--quick) size end to end, through the CLI and the library."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.errors import DvmlError
from dvml.experiments import ablate, demo

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "d"
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    return out, r


def test_demo_quick_end_to_end_through_the_cli(quick_demo):
    out, r = quick_demo
    assert r.exit_code == 0, r.output
    # a smoke run says so and compares nothing (2 epochs on 12 classes: any difference would be noise)
    said = " ".join(r.stdout.split())
    assert "smoke run: world, 8 fits and their evaluation ran end to end" in said
    assert "too small to compare the methods" in said
    for text in ("baseline (n=2)", "DVML (n=2)", "Δ DVML−base", "R@1", "-0.0"):
        assert text not in r.stdout, text
    assert (out / demo.WORLD_FILE).exists()
    rows = ablate.read_results_csv(out / demo.ABLATION_DIR / ablate.RESULTS_FILE)
    assert sorted((r["loss"], r["dvml"], r["seed"]) for r in rows) == sorted(
        (loss, m, s) for loss in ("triplet", "npair") for m in (False, True) for s in (0, 1))
    for name in (ablate.SUMMARY_MD, ablate.CHART_FILE, ablate.PROVENANCE_FILE):
        assert (out / demo.ABLATION_DIR / name).exists()


def test_demo_rerun_reuses_world_and_cells(quick_demo, monkeypatch):
    out, _ = quick_demo
    world_mtime = (out / demo.WORLD_FILE).stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(ablate, "fit", lambda *a, **k: calls.append(a))
    result = demo.run(demo.DemoConfig(out=out, quick=True, fit={"device": "cpu"}))
    assert calls == [] and len(result["rows"]) == 8 and 0 < result["raw"]["recall@1"] < 1
    # the full demo's table (printed by `dvml demo`): both losses, both methods, the paired difference, the
    # summary's numbers
    from rich.console import Console

    from dvml.cli.render import summary_tables

    con = Console(width=200, record=True)
    for t in summary_tables(result, title="demo"):
        con.print(t)
    text = con.export_text()
    for needle in ("triplet", "npair", "baseline (n=2)", "DVML (n=2)", "Δ DVML−base [95% CI]", "R@1", "MAP@R"):
        assert needle in text, needle
    r1 = result["losses"]["npair"]["metrics"]["recall@1"]["DVML"]
    assert f"{100 * r1['mean']:.1f}" in text and "-0.0" not in text
    assert (out / demo.WORLD_FILE).stat().st_mtime_ns == world_mtime
    # the default size would need another world: refused rather than mixed into this directory
    with pytest.raises(DvmlError, match="different synth world"):
        demo.run(demo.DemoConfig(out=out))


def test_default_size_is_valid_for_both_losses():
    from dvml.heads import FitConfig

    cfg = demo.DemoConfig()
    size = cfg.size
    train_classes = size.world.n_classes // 2
    for loss in size.losses:
        fc = FitConfig(cache="w.h5", out="r", loss=loss, **size.fit)
        assert fc.classes_per_batch <= train_classes, (loss, fc.batch_size)
        assert fc.per_class <= size.world.images_per_class
