"""Configuration fields as the command line spells them: the one place a field name becomes a flag.

Library errors name fields (:mod:`dvml.errors`: ```batch_size```); the CLI's error handler shows each as its
flag (``--batch-size``) through :func:`flag_message`.
"""

from __future__ import annotations

from dvml.errors import render_fields

#: Fields whose flag is not ``--`` + the name with ``-`` for ``_``.
FLAGS: dict[str, str] = {"k": "-k"}


def flag_for(field: str) -> str:
    """The command-line flag of config field ``field`` (``batch_size`` -> ``--batch-size``)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def flag_message(error: BaseException) -> str:
    """``error``'s message with each field it names (:data:`dvml.errors.FIELD_MARK`) shown as its flag."""
    template = getattr(error, "template", None)
    return render_fields(template, flag_for) if template is not None else str(error)
