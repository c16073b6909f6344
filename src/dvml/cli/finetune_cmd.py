"""Commands of this stage are registered here (see dvml.cli.app)."""

from dvml.cli.app import app  # noqa: F401
