"""The same option has the same name, type and form in every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import typer.testing

from dvml.cli import app, root_command
from dvml.heads.config import DeviceChoice
from dvml.losses import LossName

COMMANDS = root_command().commands  # every command loaded (the app imports each on use)


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
        if p.name == "loss":  # LossName, or (bound from a config's loss field) any registered name, checked on use
            listed = "<" + "|".join(n.value for n in LossName) + ">"
            assert _annotation(p) is LossName or (_annotation(p) is str and p.metavar == listed), cmd
            if _annotation(p) is str:
                assert cmd in ("fit-heads", "finetune", "tune"), cmd
        if p.name == "device" and cmd in ("fit-heads", "finetune", "ablate", "demo", "tune"):  # extract: cuda:N
            assert _annotation(p) in (DeviceChoice, DeviceChoice | None), cmd
        if p.name == "dvml":
            assert p.opts == ["--dvml"] and p.secondary_opts == ["--no-dvml"], cmd


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    r = typer.testing.CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_fit_heads_and_finetune_share_the_objective_options():
    """The DVML objective's options are declared once (beside the HeadsConfig fields, panel OBJECTIVE_PANEL): the
    same flags, choices, default and help in both commands."""
    import typing

    from dvml.config_fields import OBJECTIVE_PANEL, declared_options
    from dvml.heads.config import HeadsConfig

    objective = [n for n, spec in declared_options(HeadsConfig).items() if spec.panel == OBJECTIVE_PANEL
                 and n != "variance_source"]  # variance_source: a fit-heads flag; finetune takes it through --set
    assert len(objective) == 12

    def params(command):
        return {p.name: p for p in COMMANDS[command].params}

    fit, ft = params("fit-heads"), params("finetune")
    types = typing.get_type_hints(HeadsConfig)
    for name in objective:
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


# ---------------------------------------------------------------------------------------------------------------
# One name per concept. The checker reads concepts, not an exact option list: an option added later passes when
# it follows the convention and fails when it names a concept another way. Hidden options are old spellings kept
# for one release and are not checked.

OUTPUT_SPELLINGS = {"--to", "--output", "--out-dir", "--output-dir", "--dest", "--destination", "--target-dir"}
DEVICE_SPELLINGS = {"--gpu", "--cpu", "--cuda", "--use-gpu", "--no-gpu", "--on-gpu"}
SEED_COUNT_SPELLINGS = {"--n-seeds", "--num-seeds", "--nseeds", "--seed-count"}
STRING_DEVICES = {"extract"}  # --device cuda:N: not a closed choice


def convention_problems(group) -> list[str]:
    """Every breach of the option conventions in the click group ``group`` (and its sub-groups)."""
    import enum
    import typing

    problems = []
    commands = []

    def walk(g, prefix):
        for name, c in g.commands.items():
            if hasattr(c, "commands"):
                walk(c, f"{prefix}{name} ")
            else:
                commands.append((f"{prefix}{name}", c))

    walk(group, "")
    for cmd, c in commands:
        opts = [p for p in c.params if p.param_type_name == "option" and not p.hidden]
        flags = {o: p for p in opts for o in (*p.opts, *p.secondary_opts)}
        for spelling in sorted(OUTPUT_SPELLINGS & set(flags)):
            problems.append(f"{cmd} {spelling}: an output location is --out/-o")
        for spelling in sorted(DEVICE_SPELLINGS & set(flags)):
            problems.append(f"{cmd} {spelling}: a device is --device")
        for spelling in sorted(SEED_COUNT_SPELLINGS & set(flags)):
            problems.append(f"{cmd} {spelling}: a number of seeds is --seeds N (with --first-seed)")
        for p in opts:
            ann = _annotation(p)
            base = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
            if p.name == "out" and set(p.opts) != {"-o", "--out"}:
                problems.append(f"{cmd} {p.opts}: the output option is --out/-o")
            if p.name == "device" and cmd not in STRING_DEVICES and not (
                    isinstance(base[0], type) and issubclass(base[0], enum.Enum)):
                problems.append(f"{cmd} --device: a closed choice is an enum, got {ann}")
            if p.name == "seed" and base[0] is not int:
                problems.append(f"{cmd} --seed: a seed value is an int")
            if p.name == "seeds" and (base[0] is not int or "--first-seed" not in flags):
                problems.append(f"{cmd} --seeds: a count of seeds (int) beside --first-seed")
            if p.is_flag and p.name not in ("help", "version") and not p.secondary_opts:
                problems.append(f"{cmd} {p.opts}: a lone flag; use --x/--no-x")
            if "<bool>" in (p.metavar or "") or (p.is_flag and p.metavar is None):
                problems.append(f"{cmd} {p.opts}: a flag shows a <bool> type in --help")
    return problems


def test_every_command_follows_the_option_conventions():
    assert convention_problems(root_command()) == []


def test_the_convention_check_fails_on_a_command_that_names_a_concept_another_way():
    """The control: a toy command with --to, --gpu/--cpu, a string --device and --num-seeds on a fresh app."""
    import typer.main

    toy = typer.Typer()

    @toy.command("copy")
    def copy(to: Path = typer.Option(..., "--to"), gpu: bool = typer.Option(False, "--gpu/--cpu"),
             device: str = typer.Option("auto"), num_seeds: int = typer.Option(3, "--num-seeds")):
        pass

    @toy.command("other")
    def other(out: Path = typer.Option(..., "--out")):  # no -o
        pass

    problems = convention_problems(typer.main.get_command(toy))
    assert any("--to: an output location is --out/-o" in p for p in problems)
    assert any("--gpu: a device is --device" in p for p in problems)
    assert any("copy --device: a closed choice is an enum" in p for p in problems)
    assert any("--num-seeds" in p for p in problems)
    assert any(p.startswith("other ['--out']") for p in problems)


def test_old_spellings_are_hidden_aliases():
    cmds = root_command().commands
    to = next(p for p in cmds["data"].commands["download"].params if p.name == "to")
    gpu = next(p for p in cmds["evaluate"].params if p.name == "gpu")
    assert to.hidden and to.opts == ["--to"] and gpu.hidden and gpu.opts == ["--gpu"]


def test_usage_errors_say_error_as_every_other_error_does():
    runner = typer.testing.CliRunner()
    r = runner.invoke(app, ["fit-heads", "c.h5", "-o", "x", "--epochs", "ten"])
    assert r.exit_code == 2 and "error: Invalid value for '--epochs'" in r.output and "Error" not in r.output
    r = runner.invoke(app, ["fit-head"])
    assert r.exit_code == 2 and "error: No such command 'fit-head'. Did you mean 'fit-heads'?" in r.output
    r = runner.invoke(app, ["evaluate", "no-such-target"])  # a dvml error: the same prefix, exit code 1
    assert r.exit_code == 1 and r.output.strip().startswith("error: no-such-target")
