"""Options and option parsing shared by several commands that are not config fields (one definition, one name, one
form everywhere); the config fields' options come from :mod:`dvml.cli.bind`."""

from __future__ import annotations

from enum import Enum

import typer

# The options of config fields are declared beside the fields and built by dvml.cli.bind; these names stay
# importable from here.
from dvml.cli.bind import check_field_types, format_numbers, merge_set, parse_set  # noqa: F401
from dvml.extract.config import FeatureDtype, Interpolation  # noqa: F401  (extract, synth)

#: A tuple of loss weights as ``--lambdas-phase1`` writes it (``1,1,0.1,1``).
format_lambdas = format_numbers


def panel(name: str, option: typer.models.OptionInfo) -> typer.models.OptionInfo:
    """``option``, shown in the --help panel ``name``: ``resize: int = panel(IMAGES, typer.Option(...))``."""
    option.rich_help_panel = name
    return option


def choice_value(value) -> str | None:
    """An enum option's value as the config takes it (a plain string; None stays None)."""
    return None if value is None else getattr(value, "value", value)


class SearchDevice(str, Enum):
    """Where faiss searches (``dvml evaluate --device``): auto = the GPU when this faiss build has one."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def one_of(new, old, new_flag: str, old_flag: str):
    """The value of an option given under its current name ``new_flag`` or its old, hidden spelling ``old_flag``
    (kept for one release); both with different values is refused."""
    if new is not None and old is not None and new != old:
        raise ValueError(f"{old_flag} is the old spelling of {new_flag}: give {new_flag} only")
    value = new if new is not None else old
    if value is None:
        raise ValueError(f"missing option {new_flag}")
    return value


def fit_overrides(**opts) -> dict:
    """Options left at None are not passed (fit-heads' defaults apply)."""
    out = {}
    for k, v in opts.items():
        if v is None:
            continue
        out[k] = v.value if hasattr(v, "value") and not isinstance(v, int | float | str) else v
    return out


def refuse_resume_with_overwrite(cfg) -> None:
    """``--resume`` continues the run in ``--out`` and ``--overwrite`` replaces it: given together, which one was
    meant is a guess (the run would silently start again), so they are refused."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
