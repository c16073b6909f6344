"""The HDF5 feature cache: one format, one writer, one reader (schema in :mod:`dvml.cache.schema`)."""

from dvml._lazy import lazy_exports

# imported on first use: importing a light submodule (e.g. a config) must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "dvml.cache.errors": ["CacheBusyError", "CacheError", "CacheExistsError", "CacheIncompleteError",
        "CacheMissingError", "CacheShapeError", "CacheSplitError", "CacheValueError", "CacheVersionError"],
    "dvml.cache.fingerprint": ["fingerprint"],
    "dvml.cache.reader": ["CacheInfo", "Split", "SplitInfo", "load_labels", "load_split", "load_test_roles",
        "read_info", "validate"],
    "dvml.cache.writer": ["CacheSpec", "CacheWriter"],
})

__all__ = [
    "CacheBusyError", "CacheError", "CacheExistsError", "CacheIncompleteError", "CacheMissingError", "CacheShapeError",
    "CacheSplitError", "CacheValueError", "CacheVersionError", "CacheInfo", "CacheSpec", "CacheWriter",
    "Split", "SplitInfo", "fingerprint", "load_labels", "load_split", "load_test_roles", "read_info", "validate",
]
