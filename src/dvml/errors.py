"""User-facing errors. The CLI turns a :class:`DvmlError` into a one-line message and exit code 1."""


class DvmlError(Exception):
    """A problem with the user's input (file, option, data) rather than a bug in dvml."""
