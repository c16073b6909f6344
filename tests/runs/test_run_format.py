"""The run-directory format (:mod:`dvml.runs`): run directories written before the package-layout refactor still
load and evaluate to the same numbers; a newer checkpoint format is refused with an error naming the version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvml import runs as R
from dvml.cli import app
from dvml.heads import embed

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture
def v1_run(tmp_path) -> Path:
    """The fit-heads run of tests/data, written by dvml at commit bd9897c (format 1), with its cache moved
    beside it: config.json points at the copy, as a user who moved both would edit it."""
    cache = shutil.copy(DATA / "v1_cache.h5", tmp_path / "v1_cache.h5")
    run = shutil.copytree(DATA / "v1_heads_run", tmp_path / "run")
    conf = json.loads((run / R.CONFIG_FILE).read_text())
    conf["cache"] = str(cache)
    (run / R.CONFIG_FILE).write_text(json.dumps(conf))
    return run


def test_a_run_written_before_the_refactor_evaluates_to_the_numbers_it_had(v1_run: Path):
    expected = json.loads((DATA / "v1_expected_metrics.json").read_text())  # old code's evaluate_target(seed=0)
    result = CliRunner().invoke(app, ["evaluate", str(v1_run), "--seed", "0"])
    assert result.exit_code == 0, result.output
    got = json.loads((v1_run / R.METRICS_FILE).read_text())
    assert {k: got[k] for k in expected} == expected
    info = R.load_run(v1_run)
    assert info.kind == R.HEADS_KIND and info.status == "finished" and info.epochs_done == 2
    assert len(R.read_log(v1_run)) == 2


def test_embed_of_an_old_run_is_its_embedding_layer(v1_run: Path):
    ckpt = R.load_checkpoint(v1_run)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    ref = x @ ckpt["model"]["embedding.weight"].T + ckpt["model"]["embedding.bias"]
    torch.testing.assert_close(torch.from_numpy(embed(v1_run, x.numpy())), ref, rtol=0, atol=1e-6)


def test_a_newer_checkpoint_format_is_a_clear_error_naming_the_version(v1_run: Path):
    ckpt = torch.load(v1_run / R.HEADS_FILE, weights_only=True)
    ckpt["format"] = R.CHECKPOINT_FORMAT + 1
    torch.save(ckpt, v1_run / R.HEADS_FILE)
    result = CliRunner().invoke(app, ["evaluate", str(v1_run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    msg = result.output.replace("\n", "")
    assert f"checkpoint format {R.CHECKPOINT_FORMAT + 1}" in msg and f"format {R.CHECKPOINT_FORMAT}" in msg


def test_a_checkpoint_without_a_format_key_is_read_as_format_1(v1_run: Path):
    ckpt = torch.load(v1_run / R.HEADS_FILE, weights_only=True)
    del ckpt["format"]
    torch.save(ckpt, v1_run / R.HEADS_FILE)
    assert R.load_checkpoint(v1_run)["model"].keys() == ckpt["model"].keys()


def test_overwrite_clears_exactly_the_run_files(tmp_path: Path):
    for name in (*R.RUN_FILES, "notes.txt"):
        (tmp_path / name).write_text("x")
    R.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
