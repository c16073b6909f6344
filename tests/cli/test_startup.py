"""``dvml --help``, a command's ``--help`` and an argument error answer without importing the heavy stack.

Each check runs in a fresh interpreter (``sys.modules`` of this test process already holds everything) and
asserts on the set of modules imported, never on time (bench/cli_startup.py measures the time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "faiss", "optuna", "matplotlib", "sklearn", "h5py")

# run `dvml ARGS` as the console script does, then report the exit code and the heavy modules loaded
PROBE = f"""
import json, sys
PRE
from dvml.cli import app
try:
    app(sys.argv[1:], prog_name="dvml")
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}), file=sys.__stderr__)
"""


def _probe(*args: str, pre: str = "") -> dict:
    """``pre``: a statement run before the CLI is imported (the control's stand-in for a heavy module import)."""
    r = subprocess.run([sys.executable, "-c", PROBE.replace("PRE", pre), *args], capture_output=True, text=True,
                       timeout=300)
    return json.loads(r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("fit-heads", "--help"), ("data", "verify", "--help"),
                                  ("evaluate", "--help"), ("ablate", "--help"), ("demo", "--help"),
                                  ("tune", "--help"), ("index", "--help"), ("analyze", "--help"),
                                  ("extract", "--help"), ("finetune", "--help"), ("export", "--help")])
def test_help_imports_no_heavy_module(args):
    r = _probe(*args)
    assert r == {"code": 0, "heavy": []}, args


def test_an_argument_error_imports_no_heavy_module():
    r = _probe("fit-heads", "cache.h5", "--epochs", "ten")  # a usage error: exit code 2, before any import
    assert r == {"code": 2, "heavy": []}


@pytest.mark.parametrize("args", [("extract", "folder", "--root", ".", "--out", "x.h5", "--views", "ten"),
                                  ("finetune", "folder", "--root", ".", "--out", "run", "--epochs", "ten"),
                                  ("export", "run", "--weights")])
def test_a_usage_error_of_an_image_command_imports_no_heavy_module(args):
    assert _probe(*args) == {"code": 2, "heavy": []}, args


@pytest.mark.parametrize("args", [("extract", "folder", "--root", ".", "--out", "x.h5", "--views", "0"),
                                  ("finetune", "folder", "--root", ".", "--out", "run", "--crop", "4"),
                                  ("export", "run", "--out", "model.xyz")])
def test_a_config_error_is_reported_before_the_heavy_imports(args):
    """The config is built (and refuses the value, exit code 1) before the command body imports torch."""
    assert _probe(*args) == {"code": 1, "heavy": []}, args


def test_the_probe_sees_a_heavy_import():
    """The control: the same extract --help with the extraction module imported first (as the CLI did when it took
    its option defaults from there) is reported as loading torch and h5py, so the checks above can fail."""
    r = _probe("extract", "--help", pre="import dvml.extract.extractor")
    assert r["code"] == 0 and {"torch", "h5py"} <= set(r["heavy"])


def test_root_help_lists_every_command_from_the_registry():
    from typer.testing import CliRunner

    from dvml.cli import COMMANDS, app, root_command

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    loaded = root_command().commands
    for name, entry in COMMANDS.items():
        assert name in loaded, f"{entry.module} does not register {name!r}"
        assert f" {name} " in out and entry.summary in out, name
