"""User-facing errors. The CLI turns a :class:`DvmlError` into a one-line message and exit code 1.

Errors name configuration *fields* (``lr``, ``batch_size``), never command-line flags: a Python user passed fields.
A message marks each field it names with backticks (```batch_size` (120) must be ...``); ``str(error)`` shows the
bare name (``batch_size (120) must be ...``) and the CLI shows the flag the field has there (``--batch-size``:
:func:`dvml.cli.fields.flag_message`, the one place fields map to flags).
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: A field named in a message: an identifier between backticks.
FIELD_MARK = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def render_fields(text: str, name: Callable[[str], str] = str) -> str:
    """``text`` with every backticked field replaced by ``name(field)`` (default: the field's own name)."""
    return FIELD_MARK.sub(lambda m: name(m.group(1)), text)


class _NamesFields:
    """``str()`` of the error is its message with the field marks removed; ``template`` keeps them."""

    def __init__(self, message: object = "", *args):
        self.template = str(message)
        super().__init__(render_fields(self.template), *args)


class DvmlError(_NamesFields, Exception):
    """A problem with the user's input (file, option, data) rather than a bug in dvml."""


class FieldError(_NamesFields, ValueError):
    """An invalid configuration value (a ``ValueError``), its message naming fields as :class:`DvmlError`'s do."""
