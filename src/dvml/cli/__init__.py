"""Command-line interface: ``dvml <command>``. One module per stage registers its commands on ``app``."""

from dvml.cli import (  # noqa: F401  (register commands)  # noqa: F401
    cache_cmds,
    evaluate_cmd,
    experiment_cmds,
    extract_cmd,
    finetune_cmd,
    heads_cmd,
    synth_cmd,
)
from dvml.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
