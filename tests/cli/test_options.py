"""The same option has the same name, type and form in every command (issue 13's CLI consistency)."""

from __future__ import annotations

import pytest
import typer.main
import typer.testing

from dvml.cli import app
from dvml.heads.config import DeviceChoice
from dvml.losses import LossName

COMMANDS = typer.main.get_command(app).commands


def _options():
    for name, cmd in COMMANDS.items():
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [(None, cmd)]
        for sub, c in subs:
            for p in c.params:
                if p.param_type_name == "option":
                    yield f"{name} {sub}" if sub else name, p


def _annotation(p):
    return p.type_descriptor.annotation  # typer (which vendors its own click) keeps the declared type


def test_every_output_option_is_dash_o_or_double_dash_out():
    outs = [(cmd, p) for cmd, p in _options() if p.name == "out"]
    assert {cmd for cmd, _ in outs} >= {"extract", "fit-heads", "finetune", "ablate", "demo", "analyze", "tune"}
    for cmd, p in outs:
        assert set(p.opts) == {"-o", "--out"}, cmd


def test_every_boolean_option_is_a_paired_flag():
    for cmd, p in _options():
        if p.is_flag and p.name not in ("help", "version"):
            assert p.secondary_opts, f"{cmd} {p.opts}: a lone flag; use --x/--no-x"


def test_losses_and_fit_devices_are_choices_with_the_same_values():
    for cmd, p in _options():
        if p.name == "loss":  # LossName, or (fit-heads, finetune) any registered name, listed and checked on use
            listed = "<" + "|".join(n.value for n in LossName) + ">"
            assert _annotation(p) is LossName or (_annotation(p) is str and p.metavar == listed), cmd
            if _annotation(p) is str:
                assert cmd in ("fit-heads", "finetune"), cmd
        if p.name == "device" and cmd in ("fit-heads", "ablate", "demo", "tune"):  # fits; extract/finetune: cuda:N
            assert _annotation(p) in (DeviceChoice, DeviceChoice | None), cmd
        if p.name == "dvml":
            assert p.opts == ["--dvml"] and p.secondary_opts == ["--no-dvml"], cmd


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    r = typer.testing.CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_fit_heads_and_finetune_share_the_objective_options():
    """The DVML objective's options are declared once (cli.options.objective_options): the same flags, choices,
    default and help in both commands."""
    import typing

    from dvml.cli.options import objective_options
    from dvml.heads.config import HeadsConfig

    def params(command):
        return {p.name: p for p in COMMANDS[command].params}

    fit, ft = params("fit-heads"), params("finetune")
    types = typing.get_type_hints(HeadsConfig)
    for name in objective_options():
        a, b = fit[name], ft[name]
        assert (a.opts, a.secondary_opts, a.default, a.help) == (b.opts, b.secondary_opts, b.default, b.help), name
        field = [t for t in typing.get_args(types[name]) if t is not type(None)] or [types[name]]  # X | None: X
        assert _annotation(a) is _annotation(b) is field[0], name  # typed as the config field
    assert "finetune refuses it" in ft["standardize"].help


def test_set_and_config_values_are_checked_against_the_enums():
    from dvml.cli.options import check_field_types, parse_set
    from dvml.heads.config import FitConfig

    assert parse_set(["likelihood=l2", "variance-scale=unit", "metric_reduction=nonzero"]) == {
        "likelihood": "l2", "variance_scale": "unit", "metric_reduction": "nonzero"}
    with pytest.raises(ValueError, match="likelihood: expected one of l2, gaussian, got 'laplace'"):
        parse_set(["likelihood=laplace"])
    with pytest.raises(ValueError, match="variance_space: expected one of raw, normalized"):
        check_field_types(FitConfig, {"variance_space": "sphere"}, "--config c.json")
    check_field_types(FitConfig, {"metric_reduction": None, "variance_scale": "class"}, "--config c.json")
