"""Exceptions raised for bad cache files. Every message starts with the file path."""

from __future__ import annotations

from pathlib import Path

from dvml.errors import DvmlError


class CacheError(DvmlError):
    """A feature cache that cannot be used; ``str(err)`` names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CacheMissingError(CacheError):
    """The file does not exist or is not an HDF5 file."""


class CacheBusyError(CacheError):
    """Another live process is writing the file (it holds the writer lock): wait for it."""


class CacheIncompleteError(CacheError):
    """The writer did not finish (``complete`` is false): resume it or rewrite it."""


class CacheVersionError(CacheError):
    """The file declares a schema version this dvml does not read."""


class CacheShapeError(CacheError):
    """Arrays or attributes disagree (rows, views, feature_dim, dtype, missing arrays)."""


class CacheValueError(CacheError):
    """Feature values are NaN or infinite, beyond the on-disk dtype's range, or zero in every row of a split."""


class CacheSplitError(CacheError):
    """Train and test classes overlap: the zero-shot split is broken."""


class CacheExistsError(CacheError):
    """The output exists and is complete; pass overwrite=True to replace it."""
