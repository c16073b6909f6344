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
from dvml.cli import app
try:
    app(sys.argv[1:], prog_name="dvml")
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}), file=sys.__stderr__)
"""


def _probe(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    return json.loads(r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("fit-heads", "--help"), ("data", "verify", "--help"),
                                  ("evaluate", "--help"), ("ablate", "--help"), ("demo", "--help"),
                                  ("tune", "--help"), ("index", "--help"), ("analyze", "--help")])
def test_help_imports_no_heavy_module(args):
    r = _probe(*args)
    assert r == {"code": 0, "heavy": []}, args


def test_an_argument_error_imports_no_heavy_module():
    r = _probe("fit-heads", "cache.h5", "--epochs", "ten")  # a usage error: exit code 2, before any import
    assert r == {"code": 2, "heavy": []}


def test_the_probe_sees_a_heavy_import():
    """The control: extract declares its options from a module that imports torch, and the probe says so (the
    check above can fail)."""
    r = _probe("extract", "--help")
    assert r["code"] == 0 and "torch" in r["heavy"]


def test_root_help_lists_every_command_from_the_registry():
    from typer.testing import CliRunner

    from dvml.cli import COMMANDS, app, root_command

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    loaded = root_command().commands
    for name, entry in COMMANDS.items():
        assert name in loaded, f"{entry.module} does not register {name!r}"
        assert f" {name} " in out and entry.summary in out, name
