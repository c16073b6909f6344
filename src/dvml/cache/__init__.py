"""The HDF5 feature cache: one format, one writer, one reader (schema in :mod:`dvml.cache.schema`)."""

from dvml.cache.errors import (
    CacheBusyError,
    CacheError,
    CacheExistsError,
    CacheIncompleteError,
    CacheMissingError,
    CacheShapeError,
    CacheSplitError,
    CacheValueError,
    CacheVersionError,
)
from dvml.cache.fingerprint import fingerprint
from dvml.cache.reader import CacheInfo, Split, SplitInfo, load_labels, load_split, load_test_roles, read_info, validate
from dvml.cache.writer import CacheSpec, CacheWriter

__all__ = [
    "CacheBusyError", "CacheError", "CacheExistsError", "CacheIncompleteError", "CacheMissingError", "CacheShapeError",
    "CacheSplitError", "CacheValueError", "CacheVersionError", "CacheInfo", "CacheSpec", "CacheWriter",
    "Split", "SplitInfo", "fingerprint", "load_labels", "load_split", "load_test_roles", "read_info", "validate",
]
