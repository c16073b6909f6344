"""Every fit setting is reachable from the command line, typed as its config field, and the help shows the
common ones first (the rest in named panels)."""

from __future__ import annotations

import enum
import json
import typing

import pytest
from typer.testing import CliRunner

from dvml.cli import app, root_command
from dvml.cli.options import format_lambdas, parse_set
from dvml.heads.config import FitConfig, HeadsConfig, config_fields
from dvml.losses.registry import loss_names

COMMANDS = root_command().commands


def _bare(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else tp


@pytest.mark.parametrize("config", [FitConfig, HeadsConfig])
def test_every_fit_field_is_a_typed_fit_heads_option(config):
    params = {p.name: p for p in COMMANDS["fit-heads"].params}
    hints = typing.get_type_hints(config)
    for f in config_fields(config):  # the settable fields (not the derived batch_size_given)
        assert f.name in params, f"{config.__name__}.{f.name} has no fit-heads option"
        field, option = _bare(hints[f.name]), _bare(params[f.name].type_descriptor.annotation)
        if f.name == "loss":  # any registered loss: a string, listed, checked against the registry on use
            assert option is str and params[f.name].metavar == "<" + "|".join(loss_names()) + ">"
        elif typing.get_origin(field) is tuple:  # the lambdas: four numbers written a,b,c,d
            assert option is str and params[f.name].default == format_lambdas(f.default), f.name
        elif isinstance(field, type) and issubclass(field, enum.Enum):
            assert option is field, f"{f.name}: option {option}, field {field}"
        else:
            assert option is field, f"{f.name}: option {option}, field {field}"


def test_every_fit_field_is_reachable_through_set_and_config(tmp_path):
    """ablate and tune reach the fields without a flag of their own through --set; fit-heads takes any field from
    --config (a JSON object of field names)."""
    for f in config_fields(FitConfig):
        if f.name in ("cache", "out"):
            continue
        value = f.default.value if isinstance(f.default, enum.Enum) else f.default
        text = format_lambdas(value) if isinstance(value, tuple) else json.dumps(value)
        key = f.name.replace("_", "-")
        parsed = parse_set([f"{key}={text}"])
        assert list(parsed) == [f.name], f.name
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"likelihood": "l2", "per_class": 4, "lambdas_phase2": [1, 1, 1, 1]}))
    r = CliRunner().invoke(app, ["fit-heads", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "r"), "--config",
                                 str(cfg)])
    assert "unknown" not in r.output and "missing.h5" in r.output  # the config was read; the cache is missing


MAIN_PANEL_LIMIT = 20


@pytest.mark.parametrize("command", ["fit-heads", "finetune", "extract", "ablate", "tune"])
def test_the_main_help_panel_holds_at_most_20_options(command):
    main = [p.name for p in COMMANDS[command].params
            if p.param_type_name == "option" and not p.hidden and getattr(p, "rich_help_panel", None) is None]
    assert len(main) <= MAIN_PANEL_LIMIT, (command, len(main), main)


@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_the_timm_install_hint_shows_in_help(command):
    r = CliRunner().invoke(app, [command, "--help"])
    text = " ".join(r.output.replace("│", " ").split())  # the help text unwrapped
    assert "pip install 'dvml[timm]'" in text and "pip install 'dvml'" not in text
