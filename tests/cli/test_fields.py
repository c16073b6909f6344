"""Library errors name config fields; the CLI shows each as its flag (dvml.cli.fields, the one mapping)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.cli.fields import flag_for, flag_message
from dvml.errors import DvmlError, FieldError
from dvml.heads.config import FitConfig


def test_fields_become_flags_only_in_the_cli():
    e = FieldError("`batch_size` (6) must be a multiple of `per_class` (4); the batch_size word stays")
    assert str(e) == "batch_size (6) must be a multiple of per_class (4); the batch_size word stays"
    assert flag_message(e) == "--batch-size (6) must be a multiple of --per-class (4); the batch_size word stays"
    assert isinstance(e, ValueError) and flag_message(ValueError("plain `x`")) == "plain `x`"
    assert flag_message(DvmlError("pass `overwrite`")) == "pass --overwrite"
    assert (flag_for("label_smoothing"), flag_for("dvml")) == ("--label-smoothing", "--dvml")


def test_a_config_error_reads_as_fields_in_python_and_as_flags_on_the_command_line(tiny_cache, tmp_path):
    with pytest.raises(ValueError) as e:
        FitConfig(cache=tiny_cache, out=tmp_path / "r", loss="proxy-nca-pp", synthetic_pairs="cross")
    assert str(e.value) == ("synthetic_pairs cross needs anchors to pair: it is for npair, triplet, triplet-dws, "
                            "not loss proxy-nca-pp")
    r = CliRunner().invoke(app, ["fit-heads", str(tiny_cache), "--out", str(tmp_path / "r"), "--loss",
                                 "proxy-nca-pp", "--synthetic-pairs", "cross"])
    assert r.exit_code == 1
    assert ("--synthetic-pairs cross needs anchors to pair: it is for npair, triplet, triplet-dws, not --loss "
            "proxy-nca-pp") in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["fit-heads", str(tiny_cache), "--out", str(tmp_path / "b"), "--batch-size", "80",
                                 "--epochs", "1"])
    assert r.exit_code == 1 and "lower --batch-size to 48 or less" in " ".join(r.output.split()), r.output
