"""The console entry point (``dvml.__main__:main``): Ctrl-C at any point ends it with one line and exit code 130."""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest

from dvml.__main__ import EXIT_INTERRUPTED, main

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _interrupted(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == EXIT_INTERRUPTED == 130
    assert err == "interrupted\n" and "Traceback" not in err
    return err


def test_ctrl_c_during_the_cli_imports_is_one_line_and_exit_130(monkeypatch, capsys):
    real_import = builtins.__import__

    def slow_import_interrupted(name, *args, **kwargs):
        if name == "dvml.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", slow_import_interrupted)
    _interrupted(capsys)


def test_ctrl_c_outside_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    import dvml.cli

    def app_interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(dvml.cli, "app", app_interrupted)
    _interrupted(capsys)


def test_the_installed_script_is_the_wrapper_and_it_imports_nothing_heavy():
    assert '\ndvml = "dvml.__main__:main"\n' in PYPROJECT.read_text()  # [project.scripts] (no tomllib on 3.10)
    # the wrapper must be importable before the slow imports start, or a Ctrl-C there is a traceback again
    code = "import sys, dvml.__main__; print(sorted(m for m in ('dvml.cli', 'torch', 'typer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
