"""``dvml cache info|validate``, ``dvml synth``, ``--help``/``--version`` through typer's CliRunner."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dvml import __version__
from dvml.cache import fingerprint
from dvml.cli import app

runner = CliRunner()
TINY = ["--classes", "8", "--images-per-class", "6", "--views", "3", "--feature-dim", "32"]


def test_help_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "synth" in r.stdout and "cache" in r.stdout
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout


def test_synth_then_info_and_validate(tmp_path):
    out = tmp_path / "w.h5"
    r = runner.invoke(app, ["synth", str(out), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["cache", "info", str(out)])
    assert r.exit_code == 0, r.output
    assert "synth" in r.stdout and "24 images x 3 views, 4 classes" in r.stdout and fingerprint(out) in r.stdout
    r = runner.invoke(app, ["cache", "validate", str(out)])
    assert r.exit_code == 0 and "ok" in r.stdout


def test_synth_refuses_to_overwrite_complete_file(tmp_path):
    out = tmp_path / "w.h5"
    assert runner.invoke(app, ["synth", str(out), *TINY]).exit_code == 0
    before = fingerprint(out)
    r = runner.invoke(app, ["synth", str(out), *TINY, "--seed", "3"])
    assert r.exit_code == 1 and "--overwrite" in r.output and "Traceback" not in r.output
    assert fingerprint(out) == before  # nothing already written is lost
    assert runner.invoke(app, ["synth", str(out), *TINY, "--seed", "3", "--overwrite"]).exit_code == 0
    assert fingerprint(out) != before


def test_bad_files_exit_1_with_named_file_and_no_traceback(tmp_path):
    out = tmp_path / "w.h5"
    runner.invoke(app, ["synth", str(out), *TINY, "--dtype", "float32"])
    with h5py.File(out, "a") as f:
        f["train/features"][0, 0, 0] = np.nan
    for cmd in (["cache", "validate", str(out)], ["cache", "info", str(tmp_path / "missing.h5")]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1
        assert "error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["cache", "validate", str(out)])
    assert str(out) in r.output.replace("\n", "") and "NaN" in r.output


def test_validate_fails_on_an_all_zero_split_and_warns_on_some_zero_rows(tmp_path):
    out = tmp_path / "w.h5"
    assert runner.invoke(app, ["synth", str(out), *TINY]).exit_code == 0
    with h5py.File(out, "a") as f:
        f["train/features"][2] = 0
    r = runner.invoke(app, ["cache", "validate", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "ok" in r.stdout, r.output
    assert "/train/features are zero in every view in 1 of 24 row(s), first at row 2" in text
    assert "--dtype float32" in text  # the cache is float16
    with h5py.File(out, "a") as f:
        f["test/features"][...] = 0
    r = runner.invoke(app, ["cache", "validate", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: {out}: /test/features are zero in every view in 24 of 24 row(s)" in text


def test_synth_bad_option_is_a_clean_error(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path / "w.h5"), "--classes", "3"])
    assert r.exit_code == 1 and "--classes must be an even number" in r.output
    assert not (tmp_path / "w.h5").exists()


@pytest.mark.parametrize(("option", "value"), [("--view-jitter", "nan"), ("--variation-strength", "inf"),
                                               ("--images-per-class", "1"), ("--test-views", "3"),
                                               ("--variation-dim", "0")])
def test_synth_errors_name_the_option_typed(tmp_path, option, value):
    r = runner.invoke(app, ["synth", str(tmp_path / "w.h5"), *TINY, option, value])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} must be"), r.output
    assert "_" not in lines[0].split(" must be")[0]  # no internal field name such as images_per_class
    assert not (tmp_path / "w.h5").exists()  # nothing written, in particular no complete cache of NaN
