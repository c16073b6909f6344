"""Every option of a config field is declared once, beside the field (dvml.config_fields), and the commands are built
from that declaration (dvml.cli.bind); every fit field is reachable and typed; one override path resolves a config."""

from __future__ import annotations

import ast
import dataclasses
import enum
import json
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dvml.cli
from dvml.cli import app, root_command
from dvml.cli.bind import bare, format_names, format_numbers, is_name_tuple, is_number_tuple
from dvml.config_fields import declared_options, option_spec
from dvml.experiments.ablate import AblateConfig
from dvml.experiments.demo import DemoConfig
from dvml.experiments.tune import TuneConfig
from dvml.extract.config import ExtractConfig
from dvml.finetune.config import FinetuneConfig
from dvml.heads.config import FitConfig, HeadsConfig, config_fields

COMMANDS = root_command().commands
CLI_DIR = Path(dvml.cli.__file__).parent


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


FIT = names(FitConfig)
#: Per (command, config): its module, the fields of that config it must take from the config's declarations, and
#: whether as an experiment's pass-through fit option. ablate, tune and demo bind both their own config's fields and
#: FitConfig's; the fields a command offers in another form are left out (ablate: ``out``, optional with
#: --summarize, and ``seeds``, offered as a count and a first seed).
BOUND = {
    ("fit-heads", FitConfig): ("fit_heads.py", FIT, False),
    ("finetune", FinetuneConfig): ("finetune.py", names(FinetuneConfig), False),
    ("extract", ExtractConfig): ("extract.py", names(ExtractConfig), False),
    ("ablate", FitConfig): ("ablate.py", FIT - names(AblateConfig), True),
    ("ablate", AblateConfig): ("ablate.py", names(AblateConfig) - {"out", "seeds"}, False),
    ("tune", FitConfig): ("tune.py", FIT - names(TuneConfig), True),
    ("tune", TuneConfig): ("tune.py", names(TuneConfig), False),
    ("demo", FitConfig): ("demo.py", FIT - names(DemoConfig), True),
    ("demo", DemoConfig): ("demo.py", names(DemoConfig), False),
}
CASES = sorted(BOUND, key=lambda k: (k[0], k[1].__name__))
IDS = [f"{command}-{cls.__name__}" for command, cls in CASES]
#: Modules shared by several commands: they declare no option of any bound config's field.
SHARED_MODULES = ("options.py", "bind.py", "app.py", "fields.py", "datasets.py")


def _shown_default(cls, name: str):
    """A field's default as its option shows it (enums by value, number tuples written a,b,c)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    d = None if f.default is dataclasses.MISSING else f.default
    if isinstance(d, enum.Enum):
        return d.value
    if isinstance(d, tuple):
        return format_numbers(d) if is_number_tuple(typing.get_type_hints(cls)[name]) else format_names(d)
    return d


def _flags(p) -> set[str]:
    return set(p.opts) | set(p.secondary_opts)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_option_of_a_config_field_is_built_from_the_fields_declaration(case):
    command, cls = case
    _, fields_, passthrough = BOUND[case]
    params = {p.name: p for p in COMMANDS[command].params if p.param_type_name == "option"}
    checked = [n for n in params if n in fields_]
    assert checked, command
    for name in checked:
        p, spec = params[name], declared_options(cls)[name]
        default = p.default.value if isinstance(p.default, enum.Enum) else p.default
        if passthrough:  # None = the fit's own default, which the help names
            assert default is None and p.help.startswith(spec.help) and "Fit option of every run" in p.help, name
            assert getattr(p, "rich_help_panel", None) is None, name
        else:
            want = _shown_default(cls, name)
            assert p.help == spec.help and getattr(p, "rich_help_panel", None) == spec.panel, name
            assert default == want or (p.required and want is None), (name, default, want)
        if spec.flags:
            assert _flags(p) == {s for flag in spec.flags for s in flag.split("/")}, name
        else:
            dashed = "--" + name.replace("_", "-")
            assert p.opts == [dashed], name
        hint = bare(typing.get_type_hints(cls)[name])
        ann = bare(p.type_descriptor.annotation)
        if isinstance(hint, type) and issubclass(hint, enum.Enum) and name != "loss":
            assert ann is hint, name  # an enum field is a choice of that enum
        elif spec.choices is not None:
            assert ann is spec.choices, name
        elif is_name_tuple(hint):
            assert ann is str, name  # names written a,b,c
        elif not is_number_tuple(hint) and name != "loss":
            assert ann is hint, name


def test_fit_heads_and_finetune_offer_every_field_of_their_config_but_their_arguments():
    fit = {p.name for p in COMMANDS["fit-heads"].params}
    assert {f.name for f in config_fields(FitConfig)} <= fit
    ft = {p.name for p in COMMANDS["finetune"].params}
    assert {f.name for f in config_fields(FinetuneConfig)} - {"variance_source"} <= ft  # that one: --set / --config
    assert {f.name for f in config_fields(ExtractConfig)} <= {p.name for p in COMMANDS["extract"].params}


# -- one declaration: no cli module declares a config field's option itself ----------------------------------------

def declared_option_names(source: str) -> list[tuple[str, int]]:
    """(name, line) of every ``typer.Option(...)`` (or ``Option(...)``) in ``source`` and the name it is declared
    under: the parameter it is the default of, the dict key or keyword it is the value of, or the variable it is
    assigned to (also when wrapped, e.g. ``panel(X, typer.Option(...))``)."""
    tree = ast.parse(source)
    out: list[tuple[str, int]] = []

    def options_in(node) -> list[ast.Call]:
        return [n for n in ast.walk(node) if isinstance(n, ast.Call) and (
            (isinstance(n.func, ast.Attribute) and n.func.attr == "Option")
            or (isinstance(n.func, ast.Name) and n.func.id == "Option"))]

    for node in ast.walk(tree):
        named: list[tuple[str, ast.AST]] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            named += [(arg.arg, d) for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults,
                                                    strict=True)]
            named += [(arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
        elif isinstance(node, ast.Dict):
            named += [(k.value, v) for k, v in zip(node.keys, node.values, strict=True)
                      if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        elif isinstance(node, ast.Call):
            named += [(kw.arg, kw.value) for kw in node.keywords if kw.arg is not None]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named += [(t.id, node.value) for t in targets if isinstance(t, ast.Name) and node.value is not None]
        for name, value in named:
            out += [(name, call.lineno) for call in options_in(value)]
    return sorted(set(out), key=lambda x: x[1])


def second_declarations(source: str, fields_: set[str]) -> list[str]:
    """The options ``source`` declares for names in ``fields_`` (each one a second declaration)."""
    return [f"line {line}: {name}" for name, line in declared_option_names(source) if name in fields_]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_command_declares_an_option_of_its_configs_fields(case):
    module, fields_, _ = BOUND[case]
    assert second_declarations((CLI_DIR / module).read_text(), fields_) == [], module


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_no_shared_cli_module_declares_a_config_fields_option(module):
    every = FIT | names(FinetuneConfig) | names(ExtractConfig) | names(AblateConfig) | names(TuneConfig) | \
        names(DemoConfig)
    assert second_declarations((CLI_DIR / module).read_text(), every) == [], module


def test_the_scan_finds_a_second_declaration():
    """The control: options declared as a parameter default, wrapped in panel(), as a dict value and as a variable
    are all found; a parameter of another name and an Argument are not."""
    source = '''
import typer
OPTS = {"lr": typer.Option(1e-4, help="again")}
SEED = typer.Option(0)
def cmd(cache: Path = typer.Argument(...), epochs: int = typer.Option(60),
        *, samples: int = panel("P", typer.Option(20, "--samples", "-T")), other: int = typer.Option(1)):
    pass
'''
    found = second_declarations(source, FIT)
    assert [f.split(": ")[1] for f in found] == ["lr", "epochs", "samples"], found
    assert ("SEED", 4) in declared_option_names(source) and ("other", 6) in declared_option_names(source)
    assert not any(name == "cache" for name, _ in declared_option_names(source))


# -- every fit field reachable, typed ---------------------------------------------------------------------------

BAD = {bool: "maybe", int: "ten", float: "fast", str: "5", Path: "5"}


def _bad_value(tp) -> str:
    tp = bare(tp)
    if is_number_tuple(tp):
        return "1,2"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "nonsense"
    return BAD[tp]


@pytest.mark.parametrize("config", [FitConfig, HeadsConfig])
def test_every_fit_field_is_reachable_and_a_wrong_typed_set_is_one_error_naming_it(config, tmp_path):
    params = {p.name: p for p in COMMANDS["fit-heads"].params}
    hints = typing.get_type_hints(config)
    runner = CliRunner()
    for f in config_fields(config):
        if f.name == "cache":  # the CACHE argument
            assert params["cache"].param_type_name == "argument"
            continue
        assert f.name in params and option_spec(f) is not None, f.name  # a flag, from the field's declaration
        key = f.name.replace("_", "-")
        r = runner.invoke(app, ["fit-heads", str(tmp_path / "c.h5"), "-o", str(tmp_path / "r"), "--set",
                                f"{key}={_bad_value(hints[f.name])}"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, (f.name, r.output)
        assert lines[0].startswith("error: --set ") and f": {f.name}: expected " in lines[0], lines[0]


def test_a_field_without_a_flag_is_reached_through_set_and_config(tmp_path, monkeypatch):
    """finetune has no --variance-source flag: --set and --config give it, typed."""
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "folder", "--root", str(tmp_path), "-o", str(tmp_path / "r"), "--set",
                            "variance-source=loud"])
    assert r.exit_code == 1 and "variance_source: expected one of learned, noise, got 'loud'" in r.output
    seen = _capture_finetune(monkeypatch)
    cfg_file = tmp_path / "ft.json"
    cfg_file.write_text(json.dumps({"variance_source": "noise", "epochs": 3}))
    r = runner.invoke(app, ["finetune", "folder", "--root", str(tmp_path), "-o", str(tmp_path / "r"), "--config",
                            str(cfg_file), "--epochs", "2", "--weights", "none"])
    assert r.exit_code == 0, r.output
    assert (seen[0].variance_source.value, seen[0].epochs) == ("noise", 2)  # the flag wins over the file


# -- the override path ----------------------------------------------------------------------------------------

def _capture(monkeypatch, module: str, name: str) -> list:
    """Replace the training function ``module.name`` (fit, finetune) by one that records the config it is given;
    returns the list of configs seen."""
    import importlib

    seen: list = []

    def fake(cfg, callback=None):
        seen.append(cfg)
        return cfg.out

    monkeypatch.setattr(importlib.import_module(module), name, fake, raising=False)
    return seen


def _capture_fit(monkeypatch) -> list:
    return _capture(monkeypatch, "dvml.heads", "fit")


def _capture_finetune(monkeypatch) -> list:
    return _capture(monkeypatch, "dvml.finetune", "finetune")


def test_precedence_default_preset_config_file_set_and_flags(tmp_path, monkeypatch):
    seen = _capture_fit(monkeypatch)
    runner = CliRunner()
    base = ["fit-heads", str(tmp_path / "c.h5"), "-o", str(tmp_path / "r")]
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 0.002, "epochs": 7, "likelihood": "gaussian", "cache": "elsewhere.h5"}))
    r = runner.invoke(app, [*base, "--preset", "paper", "--config", str(cfg_file), "--set", "epochs=9", "--samples",
                            "3", "--set", "samples=3"])
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert cfg.cache == tmp_path / "c.h5"  # the argument, not the file's entry
    assert (cfg.lr, cfg.epochs, cfg.samples) == (0.002, 9, 3)  # file < --set; --set and a flag agreeing
    assert cfg.likelihood.value == "gaussian"  # the file wins over the preset
    assert cfg.variance_scale.value == "unit" and cfg.recon_share == 1.0  # the preset wins over the defaults
    assert cfg.embedding_size == HeadsConfig.embedding_size
    r = runner.invoke(app, [*base, "--lr", "0.01", "--set", "lr=0.02"])
    assert r.exit_code == 1 and "--set lr=0.02 conflicts with --lr 0.01" in r.output
    r = runner.invoke(app, [*base, "--set", "cache=x.h5"])
    assert r.exit_code == 1 and "--set cache: not a fit option" in r.output
    cfg_file.write_text(json.dumps({"preset": "paper", "epochs": 2}))  # a file's preset is a preset, not a label
    r = runner.invoke(app, [*base, "--config", str(cfg_file)])
    assert r.exit_code == 0 and seen[-1].likelihood.value == "l2" and seen[-1].preset.value == "paper", r.output


def test_defaults_give_the_configs_own_defaults(tmp_path, monkeypatch):
    seen = _capture_fit(monkeypatch)
    r = CliRunner().invoke(app, ["fit-heads", str(tmp_path / "c.h5"), "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert seen[0] == FitConfig(cache=tmp_path / "c.h5", out=tmp_path / "r")


# -- finetune reads any registered dataset --------------------------------------------------------------------

def test_finetune_takes_a_registered_dataset(tmp_path, monkeypatch):
    from dvml.extract.datasets import read_dataset
    from dvml.extract.registry import DatasetSpec, register_dataset, unregister_dataset

    seen = _capture_finetune(monkeypatch)
    register_dataset(DatasetSpec("toy-set", reader=lambda root: read_dataset("folder", root)))
    try:
        r = CliRunner().invoke(app, ["finetune", "toy-set", "--root", str(tmp_path), "-o", str(tmp_path / "r"),
                                     "--weights", "none"])
        assert r.exit_code == 0, r.output
        assert seen[0].dataset == "toy-set" and seen[0].dataset.value == "toy-set"
        assert FinetuneConfig(dataset="toy-set", root=tmp_path, out=tmp_path / "r").to_dict()["dataset"] == "toy-set"
    finally:
        unregister_dataset("toy-set")
    r = CliRunner().invoke(app, ["finetune", "toy-set", "--root", str(tmp_path), "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "'toy-set' is not one of cub, cars196" in " ".join(r.output.split())


@pytest.mark.parametrize("argv,flag", [
    (["ablate", "{c}", "-o", "{o}", "--methods", "base,gauss"], "--methods"),
    (["ablate", "{c}", "-o", "{o}", "--losses", ","], "--losses"),
    (["ablate", "{c}", "-o", "{o}", "--stack-size", "1"], "--stack-size"),
    (["tune", "{c}", "-o", "{o}", "--trials", "0"], "--trials"),
    (["tune", "{c}", "-o", "{o}", "--val-fraction", "1.5"], "--val-fraction"),
])
def test_an_experiments_own_field_refused_by_its_config_is_one_error_naming_its_flag(argv, flag, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [a.format(c=tmp_path / "c.h5", o=out) for a in argv])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {flag} "), r.output
    assert not out.exists()
