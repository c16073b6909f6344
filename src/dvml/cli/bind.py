"""Typer options built from config fields, and the one way a command's config is resolved.

A config field declares its option beside itself (:func:`dvml.config_fields.option`); :func:`bind` turns the
fields a command offers into that command's typer parameters, named, typed and defaulted as the fields, so no
command declares a config option of its own. :func:`resolve_config` then builds the config from the values the
command received, a preset, a ``--config`` file and ``--set`` pairs (the precedence is in its docstring).

The CLI form of a field follows its annotation (``X | None`` offers ``X``):

* an enum field is a choice of that enum; a ``str`` field with ``choices`` too (the config gets the value);
* a :class:`~dvml.losses.LossName` field is any registered loss (``--loss``: checked on use, listed in --help);
* a tuple of numbers is written ``a,b,c`` (``--lambdas-phase2 0.8,1,0.2,0.8``); a tuple of names (``str`` or an
  enum, any length) too (``--losses triplet,npair``, ``--methods base,dvml,noise``): the config checks the names;
* a bool field is a ``--x/--no-x`` pair unless its :class:`~dvml.config_fields.OptionSpec` spells it otherwise;
* anything else (int, float, str, Path) as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path

import typer

from dvml.config_fields import OptionSpec, option_spec
from dvml.files import os_error_message
from dvml.losses.names import LossName
from dvml.losses.registry import loss_names, loss_spec


def loss_choice(value: str | None) -> str | None:
    """``--loss``'s check: a registered loss name (read from :mod:`dvml.losses.registry` when the command runs,
    so a loss registered before then is accepted although the option was declared earlier)."""
    if value is None:
        return None
    try:
        return loss_spec(value).name
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(loss_names())}") from None


def bare(tp):
    """``X`` of ``X | None``; other annotations unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def is_number_tuple(tp) -> bool:
    return typing.get_origin(tp) is tuple and all(a in (int, float) for a in typing.get_args(tp))


def is_name_tuple(tp) -> bool:
    """``tuple[str, ...]`` or ``tuple[SomeEnum, ...]``: names, any number of them."""
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and (
        args[0] is str or (isinstance(args[0], type) and issubclass(args[0], Enum)))


def format_names(values) -> str:
    """A tuple of names as its option writes it: ``base,dvml``."""
    return ",".join(v.value if isinstance(v, Enum) else str(v) for v in values)


def parse_names(text: str) -> tuple[str, ...]:
    """``"base, dvml,"`` -> ``("base", "dvml")`` (blanks dropped; the config checks each name)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def format_numbers(values) -> str:
    """A tuple of numbers as its option writes it: ``0.8,1,0.2,0.8``."""
    return ",".join(f"{v:g}" for v in values)


_COUNTS = {2: "two", 3: "three", 4: "four"}


def parse_numbers(text: str, flag: str, n: int) -> tuple[float, ...]:
    """``"0.8,1,0.2,0.8"`` -> a tuple of ``n`` floats; a ValueError naming ``flag`` otherwise."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{flag} needs {_COUNTS.get(n, n)} comma-separated numbers, got {text!r}")
    return values


def flag_of(name: str, spec: OptionSpec | None = None) -> str:
    """The long flag of field ``name`` (its first declared spelling, else ``--name-with-dashes``)."""
    if spec is not None and spec.flags:
        return spec.flags[0].split("/")[0]
    return "--" + name.replace("_", "-")


def config_field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_option(cls, name: str, *, passthrough: bool = False) -> tuple[object, typer.models.OptionInfo]:
    """The annotation and typer option of ``cls``'s field ``name``, from its declared
    :class:`~dvml.config_fields.OptionSpec`. ``passthrough``: the form the experiment commands (ablate, tune, demo) give
    a fit option: default None (= the fit's own default, said in the help), shown in the main panel."""
    f = config_field(cls, name)
    spec = option_spec(f)
    if spec is None:
        raise KeyError(f"{cls.__name__}.{name} declares no option (dvml.config_fields.option)")
    tp = bare(typing.get_type_hints(cls)[name])
    default = ... if f.default is dataclasses.MISSING else f.default  # a field without a default: required
    kwargs: dict = {"help": spec.help, "rich_help_panel": spec.panel, "metavar": spec.metavar}
    decls = spec.flags
    if tp is LossName:
        annotation = str
        kwargs.update(callback=loss_choice, metavar=spec.metavar or "<" + "|".join(loss_names()) + ">")
        default = default.value if isinstance(default, Enum) else default
    elif is_number_tuple(tp):
        annotation = str
        default = format_numbers(default) if isinstance(default, tuple) else default
    elif is_name_tuple(tp):
        annotation = str if default is not None else str | None
        default = format_names(default) if isinstance(default, tuple) else default
    elif spec.choices is not None:
        annotation = spec.choices
    else:
        annotation = tp
    if tp is bool and not decls:
        dashed = name.replace("_", "-")
        decls = (f"--{dashed}/--no-{dashed}",)
    if passthrough:
        shown = default.value if isinstance(default, Enum) else default
        kwargs["help"] = (f"{spec.help} Fit option of every run" +
                          ("." if shown is None else f" (default: fit-heads' default {shown})."))
        kwargs["rich_help_panel"] = None
        annotation, default = annotation | None, None
    return annotation, typer.Option(default, *decls, **kwargs)


def bind(cls, names: Iterable[str], *, passthrough: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: give a typer command the options of the fields ``names`` of the config dataclass ``cls``
    (:func:`field_option`), which it receives by field name in its ``**kwargs``. In ``--help``: the command's
    arguments, these options in the order of ``names``, then the command's own options (``passthrough``: the
    command's own parameters first). Binds stack: an experiment command takes its own config's fields with one
    and FitConfig's pass-through fit options with another, and receives both in the one ``**kwargs``."""
    options = {name: field_option(cls, name, passthrough=passthrough) for name in names}

    def add(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & set(options)
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)} itself; they are bound from {cls.__name__}")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)
                 for name, (annotation, opt) in options.items()]
        # the command's arguments first, then the fields' options, then its own options (--config, --set)
        is_option = [isinstance(p.default, typer.models.OptionInfo) for p in own]
        first = [p for p, o in zip(own, is_option, strict=True) if not o]
        last = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p, o in zip(own, is_option, strict=True) if o]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=[*own, *added] if passthrough else [*first, *added, *last])
        command.__annotations__ = {**typing.get_type_hints(fn), **{p.name: p.annotation for p in added}}
        return command

    return add


def from_command_line(cls, values: dict) -> dict:
    """The values a command received for ``cls``'s fields (:func:`bind`) as the config takes them: ``a,b,c``
    strings of tuple fields parsed, the members of a ``str`` field's ``choices`` enum as their values."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        tp, spec = bare(hints[name]), option_spec(config_field(cls, name))
        if isinstance(value, str) and is_number_tuple(tp):
            value = parse_numbers(value, flag_of(name, spec), len(typing.get_args(tp)))
        elif isinstance(value, str) and is_name_tuple(tp):
            value = parse_names(value)
        elif spec is not None and spec.choices is not None and tp is not spec.choices and isinstance(value, Enum):
            value = value.value
        out[name] = value
    return out


# -- values from files and --set, checked against the field types ---------------------------------------------

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def _type_problem(value, tp) -> str | None:
    """Why ``value`` (from JSON or ``--set``) does not fit the annotation ``tp``, or None when it does."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        probs = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in probs) else probs[0]
    if is_name_tuple(tp):
        item = args[0]
        names = None if item is str else [m.value for m in item]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and (names is None or v in names)
                                                          for v in value):
            what = "names" if names is None else f"names among {', '.join(names)}"
            return f"expected a list of {what}, got {value!r}"
        return None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return f"expected a list of {len(args)} numbers, got {value!r}"
        if len(value) != len(args) or any(_type_problem(v, a) for v, a in zip(value, args, strict=False)):
            return f"expected a list of {len(args)} numbers, got {value!r}"
        return None
    if tp is LossName:  # any registered loss, as --loss takes it
        names = list(loss_names())
        return None if value in names else f"expected one of {', '.join(names)}, got {value!r}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        names = [m.value for m in tp]
        return None if value in names or isinstance(value, tp) else f"expected one of {', '.join(names)}, got {value!r}"
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          Path: lambda v: isinstance(v, str | Path)}.get(tp)
    if ok is None or ok(value):
        return None
    return f"expected {_TYPE_WORDS[tp]}, got {value!r}"


def settable_fields(cls) -> tuple[str, ...]:
    """The fields of ``cls`` a config file or ``--set`` may give (its ``__init__``'s)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def check_field_types(cls, values: dict, where: str) -> None:
    """Check ``values`` (e.g. a JSON config file, ``--set`` pairs) against the field types of the dataclass
    ``cls``: an unknown key or a value of the wrong type is a ValueError naming ``where``, the key and the type
    expected (``--config c.json: lr: expected a number, got 'fast'``)."""
    hints = typing.get_type_hints(cls)
    names = settable_fields(cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(names)}")
    for key, value in values.items():
        problem = _type_problem(value, hints[key])
        if problem:
            raise ValueError(f"{where}: {key}: {problem}")


def parse_set(items: list[str] | None, cls=None, *, exclude: Iterable[str] = ()) -> dict:
    """``--set key=value`` pairs -> field values of ``cls`` (default :class:`~dvml.heads.config.FitConfig`). A key is
    spelled as the field's flag without its dashes (``phase2-epoch``, ``lambdas-phase2``; the field name
    ``phase2_epoch`` is accepted too); ``exclude``: fields the command sets otherwise (its arguments). Values parse
    as JSON when they do (numbers, true/false, lists), ``a,b,c`` as a list of numbers, else they are kept as
    strings; each is checked against the field's type (:func:`check_field_types`)."""
    if cls is None:
        from dvml.heads.config import FitConfig as cls
    names = set(settable_fields(cls)) - set(exclude)
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise ValueError(f"--set {key.replace('_', '-')}: not a fit option; known: {known}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            if "," in value:
                try:
                    parsed = [float(v) for v in value.split(",")]
                except ValueError:
                    parsed = value
            else:
                parsed = value
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        check_field_types(cls, {key: parsed}, f"--set {item}")
        if key in out and out[key] != parsed:
            raise ValueError(f"--set {key.replace('_', '-')} is given twice with different values ({out[key]!r}, "
                             f"{parsed!r})")
        out[key] = parsed
    return out


def merge_set(explicit: dict, extra: dict) -> dict:
    """A command's explicit flags with its ``--set`` values (both from the command line); a field given both ways
    with different values is refused (which one was meant would be a guess)."""
    for key in sorted(set(explicit) & set(extra)):
        if explicit[key] != extra[key]:
            raise ValueError(f"--set {key.replace('_', '-')}={extra[key]!r} conflicts with --{key.replace('_', '-')} "
                             f"{explicit[key]!r}; give the option once")
    return {**explicit, **extra}


def read_config_file(path: Path, cls) -> dict:
    """The field values of a JSON config file (an object of ``cls`` field names, e.g. ``dvml tune``'s
    best_config.json), checked against the field types; lists as tuples."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: is a directory; expected a JSON file of fit options") from None
    except OSError as e:  # permission denied, ...: the option as well as the file and the cause
        raise ValueError(f"--config {os_error_message(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a text file; expected a JSON file of fit options") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of fit options")
    unknown = sorted(set(data) - set(settable_fields(cls)))
    if unknown:
        raise ValueError(f"--config {path}: unknown fit option(s) {', '.join(unknown)}")
    check_field_types(cls, data, f"--config {path}")  # {"lr": "fast"}: one line, not a TypeError
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # click's ParameterSource (vendored by recent typer)
    return getattr(source, "name", None) == "COMMANDLINE"


def resolve_config(cls, ctx: typer.Context, values: dict, *, fixed: dict, config_file: Path | None = None,
                   set_items: list[str] | None = None):
    """The config ``cls`` a command asked for: the one override path of fit-heads and finetune.

    Each field takes its value from the first of these that gives it:

    1. the command line: an explicit flag (``--lr 0.01``) or ``--set lr=0.01`` (a field given both ways with
       different values is refused);
    2. the ``--config`` JSON file (``config_file``);
    3. the preset (fit-heads' ``--preset``, from 1 or 2 as any field; :mod:`dvml.heads.presets`);
    4. the field's default (the flag's default).

    ``values``: what the command received for its bound fields (:func:`bind`), defaults included; ``fixed``: the
    fields its arguments set (``cache``; a file's or ``--set``'s value for them is refused / ignored). Values from
    the file and ``--set`` are checked against the field types (:func:`check_field_types`)."""
    converted = from_command_line(cls, values)
    explicit = {k: v for k, v in converted.items() if given_on_command_line(ctx, k)}
    command_line = merge_set(explicit, parse_set(set_items, cls, exclude=fixed))
    from_file = {}
    if config_file is not None:  # a file's entries for the arguments (cache: a tune best_config's) are not used
        from_file = {k: v for k, v in read_config_file(config_file, cls).items() if k not in fixed}
    merged = {**converted, **from_file, **command_line}
    if "preset" in settable_fields(cls):
        from dvml.heads.presets import preset_fields

        merged = {**merged, **preset_fields(merged["preset"], set(from_file) | set(command_line))}
    return cls(**fixed, **merged)
