"""A grid of fits (ablate, tune) says each warning of its fits once, up front, not once per cell.

The per-fit warnings (a batch fitted to the data, :mod:`dvml.heads.batch`; a schedule that never reaches phase 2
or never ends the KL warm-up, :mod:`dvml.heads.schedule`) are the same for every cell of a grid, and a resumed
grid would repeat them for cells finished before. The grid's checks run inside :meth:`GridWarnings.check`
(warnings gathered, each distinct text kept once), :meth:`GridWarnings.say` logs them, and the fits run inside
:meth:`GridWarnings.quiet` (those loggers' warnings dropped: they were said).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: the loggers whose warnings are per fit and the same across a grid
FIT_LOGGERS = ("dvml.heads.batch", "dvml.heads.schedule")


class _Drop(logging.Filter):
    def __init__(self, keep: list[logging.LogRecord] | None = None):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if self.keep is not None:
            self.keep.append(record)
        return False


@contextlib.contextmanager
def _filtered(flt: logging.Filter) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in FIT_LOGGERS]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


class GridWarnings:
    """The distinct per-fit warnings of a grid, in the order first seen, each with the cells that gave it."""

    def __init__(self):
        self.texts: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def check(self, cell: str = "", *, runs: bool = True) -> Iterator[None]:
        """Gather the warnings of the checks of ``cell`` (its name removed from the text, so that cells giving
        the same warning share it); none for a cell that will not run (``runs=False``: finished before)."""
        records: list[logging.LogRecord] = []
        with _filtered(_Drop(records)):
            yield
        if not runs:
            return
        for r in records:
            text = r.getMessage().replace(f" ({cell})", "") if cell else r.getMessage()
            self.texts.setdefault(text, []).append(cell)

    def say(self, log: logging.Logger, total: int) -> None:
        """Log each gathered warning once, with how many of the ``total`` cells it concerns."""
        for text, cells in self.texts.items():
            which = "" if len(cells) >= total or not any(cells) else f" [{len(cells)} of {total} cells: " \
                f"{', '.join(cells[:4])}{', ...' if len(cells) > 4 else ''}]"
            log.warning("%s%s", text, which)

    @staticmethod
    def quiet() -> contextlib.AbstractContextManager:
        """Drop the per-fit warnings (said once by :meth:`say`) while the grid's fits run."""
        return _filtered(_Drop())
