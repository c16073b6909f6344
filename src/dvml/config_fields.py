"""How a config field is offered on the command line, declared beside the field (no typer here).

A config dataclass declares a field's option in the field's metadata::

    epochs: int = field(default=60, metadata=option("Training epochs."))
    samples: int = field(default=20, metadata=option("T: z_V draws per image and step.", flags=("--samples", "-T")))

The CLI (:mod:`dvml.cli.bind`) builds the typer option from it: the name and type are the field's (``--epochs``,
``int``; an enum field is a choice of that enum), the default is the field's default, and :class:`OptionSpec` adds
what the field cannot say: the help text, the ``--help`` panel (None = the main one), other spellings
(``--samples/-T``, ``--freeze-bn/--train-bn``), a metavar, and ``choices`` for a ``str`` field offered as a closed
choice. A field with no :class:`OptionSpec` has no flag: commands reach it through ``--config`` / ``--set``.

This module imports nothing but the standard library, so config modules (and ``--help``) stay light.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, fields
from enum import Enum

#: The metadata key of a field's :class:`OptionSpec`.
OPTION_KEY = "option"

# --help panels of the fit options: the main panel holds what a first fit needs; the rest is grouped by purpose.
SCHEDULE_PANEL = "Schedule, loss weights and batches"
LOSS_PANEL = "Loss parameters"
OBJECTIVE_PANEL = "DVML objective and variance branch"
DIAGNOSTICS_PANEL = "Diagnostics"
IMAGES_PANEL = "Images and augmentation"


@dataclass(frozen=True)
class OptionSpec:
    """The command-line form of one config field (see the module docstring).

    help: the ``--help`` text (typer's rich help reads ``[...]`` as markup: say defaults in parentheses).
    panel: the ``--help`` panel; None = the command's main panel.
    flags: the spellings, when not just ``--field-name`` (a bool field defaults to ``--x/--no-x``).
    metavar: the value's placeholder in ``--help``.
    choices: a ``str`` field offered as a choice of this enum (the config receives the member's value).
    """

    help: str
    panel: str | None = None
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    choices: type[Enum] | None = None


def option(help: str, *, panel: str | None = None, flags: tuple[str, ...] = (), metavar: str | None = None,
           choices: type[Enum] | None = None, **metadata) -> dict:
    """Field metadata declaring the field's command-line option (``field(default=..., metadata=option(...))``);
    ``metadata``: other metadata keys of the field (e.g. ``recorded=False``)."""
    return {OPTION_KEY: OptionSpec(help, panel, tuple(flags), metavar, choices), **metadata}


def option_spec(f: Field) -> OptionSpec | None:
    """The :class:`OptionSpec` declared on the dataclass field ``f``, or None (no flag)."""
    return f.metadata.get(OPTION_KEY)


def declared_options(cls) -> dict[str, OptionSpec]:
    """Field name -> :class:`OptionSpec` of every field of the config dataclass ``cls`` that declares one."""
    return {f.name: spec for f in fields(cls) if (spec := option_spec(f)) is not None}
