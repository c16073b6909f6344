"""dvml report: tables regenerated from kept results files (against numpy/scipy), document blocks that go stale
when their files change, and the repository's docs/results.md against its results/ directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from dvml.cli import app
from dvml.experiments import report

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _kept(tmp_path: Path, name="r") -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    vals = {m: rng.uniform(0.4, 0.6, 4) for m in ("base", "dvml", "noise")}
    d = tmp_path / name
    d.mkdir()
    with open(d / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss", "method", "dvml", "seed", "recall@1", "map@r", "run_dir", "fit_seconds", "eval_seconds"])
        for m, v in vals.items():
            for s, x in enumerate(v):
                w.writerow(["triplet", m, m != "base", s, x, x / 2, "", 1, 1])
    (d / "command.txt").write_text("dvml ablate w.h5 -o out --methods base,dvml,noise --seeds 4\n")
    return d, vals


def test_render_matches_numpy_and_scipy(tmp_path):
    d, vals = _kept(tmp_path)
    md = report.render(d, shown_as="results/r")
    assert "Regenerate: `dvml report results/r`" in md and "dvml ablate w.h5 -o out" in md
    row = next(line for line in md.splitlines() if line.startswith("| R@1 |"))  # the metric under its display name
    cells = [c.strip() for c in row.strip("|").split("|")]
    for cell, m in zip(cells[1:4], ("base", "dvml", "noise"), strict=True):
        assert cell == f"{100 * vals[m].mean():.2f} ± {100 * vals[m].std(ddof=1):.2f}"
    for cell, other in zip(cells[4:], ("base", "noise"), strict=True):
        ci = stats.ttest_rel(vals["dvml"], vals[other]).confidence_interval(0.95)
        want = f"{100 * (vals['dvml'] - vals[other]).mean():+.2f} [{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]"
        assert cell.strip("*") == want
        assert cell.startswith("**") == (ci.low > 0 or ci.high < 0)


def test_document_blocks_update_and_go_stale(tmp_path):
    d, _ = _kept(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("# Results\n\nintro\n")
    assert report.update_document(doc, [d]) == [d.as_posix()]
    assert report.update_document(doc, [d]) == []  # idempotent
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n") and report.blocks(text)[d.as_posix()] == report.render(d)
    assert report.stale_blocks(doc, root="/") == []
    lines = (d / "results.csv").read_text().splitlines()
    (d / "results.csv").write_text("\n".join(lines[:-1]) + "\n")  # a seed lost: the embedded table is stale
    assert report.stale_blocks(doc, root="/") == [d.as_posix()]
    r = runner.invoke(app, ["report", str(d), "--update", str(doc)])
    assert r.exit_code == 0 and report.stale_blocks(doc, root="/") == []


def test_cli_prints_and_refuses_a_directory_without_its_command(tmp_path):
    d, _ = _kept(tmp_path)
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 0 and "| metric | baseline | DVML | noise |" in r.output
    (d / "command.txt").unlink()
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 1 and "no command.txt" in r.output
    r = runner.invoke(app, ["report", str(tmp_path / "none")])
    assert r.exit_code == 1 and "no results.csv" in r.output
    r = runner.invoke(app, ["report"])
    assert r.exit_code == 1 and "at least one results directory" in r.output


def test_docs_results_regenerate_from_the_kept_files():
    doc = ROOT / "docs" / "results.md"
    kept = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "results").glob("*/results.csv"))
    if not kept:
        pytest.skip("no kept results in this checkout")
    embedded = report.blocks(doc.read_text())
    assert set(kept) <= set(embedded), f"results without a table in {doc}: {set(kept) - set(embedded)}"
    assert report.stale_blocks(doc, root=ROOT) == []
    for key in kept:  # kept small: CSV and text only
        assert all(p.suffix in (".csv", ".txt", ".json") and p.stat().st_size < 200_000
                   for p in (ROOT / key).rglob("*") if p.is_file())


def test_readme_tables_regenerate_from_the_kept_files():
    """The README's result tables are report blocks too: each matches what its kept directory renders."""
    readme = ROOT / "README.md"
    embedded = report.blocks(readme.read_text())
    assert embedded, "the README shows no result table rendered by dvml report"
    assert report.stale_blocks(readme, root=ROOT) == []


def test_every_doc_with_report_blocks_regenerates_and_the_protocol_is_shown():
    """Every report block under docs/ matches its kept directory; the defaults protocol's decision and test check
    are among them, and its rendered scores are the decision file's (each score the mean of its row)."""
    docs = sorted((ROOT / "docs").glob("*.md"))
    with_blocks = {d.name: d for d in docs if report.blocks(d.read_text())}
    assert {"results.md", "protocol.md"} <= set(with_blocks)
    for d in with_blocks.values():
        assert report.stale_blocks(d, root=ROOT) == [], d
    body = report.blocks(with_blocks["protocol.md"].read_text())["results/protocol-defaults"]
    dec = json.loads((ROOT / "results" / "protocol-defaults" / "decision.json").read_text())
    assert f"Choice: **{dec['choice']}**." in body and "Test check" in body
    for name, per in dec["scores"].items():
        row = next(line for line in body.splitlines() if line.startswith(f"| {name}") or line.startswith(
            f"| **{name}**"))
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert cells[:-1] == [float(f"{100 * v:.2f}") for v in per.values()]
        assert abs(cells[-1] - sum(cells[:-1]) / len(cells[:-1])) < 0.01


def test_kept_analyses_render_their_learned_vs_noise_figures_and_checks(tmp_path):
    d, _ = _kept(tmp_path)
    assert "dvml analyze" not in report.render(d)  # no analyze/: no table
    (d / "analyze").mkdir()
    checks = {"active_frac": {"ok": True}, "consistency_vs_noise": {"ok": False}, "grad_vs_noise": {"ok": None}}
    rep = {"variance_source": "learned", "checks": checks,
           "vs_noise": {"consistency": {"real": 0.95, "learned": 0.9, "noise": 0.91},
                        "hardness": {k: {"per_active": v} for k, v in (("real", 0.8), ("learned", 0.7),
                                                                       ("noise", 0.65))} | {"unit": "margins"},
                        "grad": {"cos_learned": 0.9, "cos_noise": 0.95}}}
    (d / "analyze" / "triplet-dvml-s0.json").write_text(json.dumps({"dvml_branch": {"run": rep}}))
    row = next(line for line in report.render(d).splitlines() if line.startswith("| triplet-dvml-s0"))
    assert "95.0 / 90.0 / 91.0 %" in row and "0.800 / 0.700 / 0.650 margins" in row and "0.900 / 0.950" in row
    assert "active_frac ok" in row and "consistency_vs_noise FAIL" in row and "grad_vs_noise n/a" in row
    (d / "analyze" / "bad.json").write_text("{}")
    with pytest.raises(report.DvmlError, match="bad.json"):
        report.render(d)
