"""The console entry point ``dvml`` (and ``python -m dvml``).

It lives outside :mod:`dvml.cli` because importing that package loads every command (torch, faiss, ...: seconds
on a cold start), and a Ctrl-C during that import must end the program as quietly as one during a command.
This module imports nothing heavy itself.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C


def main() -> None:
    """Run the CLI. A ``KeyboardInterrupt`` at any point (the imports included) prints one ``interrupted`` line
    on stderr and exits with :data:`EXIT_INTERRUPTED`, never a traceback. (Inside a command, the CLI's own
    handler says more: that rerunning resumes.)"""
    try:
        from dvml.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
