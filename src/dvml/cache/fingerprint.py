"""Content fingerprint of a feature cache: a stable hash of what a model trained on it would see.

The hash covers, per split, the features (as stored, with shape and dtype), labels and paths, plus the
root attributes that define the features (dataset, backbone, weights, feature_dim, views), and the
query/gallery roles of a schema-2 test split (so a version-1 file's fingerprint is what it always was).
It does not depend on HDF5 chunking, compression or the order attributes were written, so a resumed write
and an uninterrupted one have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from dvml.cache import schema as S
from dvml.cache.reader import _decode, _open

_DEFINING_ATTRS = (S.ATTR_SCHEMA_VERSION, S.ATTR_DATASET, S.ATTR_BACKBONE, S.ATTR_WEIGHTS,
                   S.ATTR_FEATURE_DIM, S.ATTR_VIEWS)


def fingerprint(path: str | Path, *, chunk_rows: int = 2048) -> str:
    """Hex digest (blake2b, 16 bytes) of the cache content. Memoised on (path, size, mtime)."""
    path = Path(path).resolve()
    st = os.stat(path)
    return _fingerprint(str(path), st.st_size, st.st_mtime_ns, chunk_rows)


@lru_cache(maxsize=32)
def _fingerprint(path: str, size: int, mtime_ns: int, chunk_rows: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with _open(Path(path)) as f:
        for k in _DEFINING_ATTRS:
            h.update(f"{k}={_decode(f.attrs.get(k))!s};".encode())
        for split in S.SPLITS:
            g = f[split]
            ds = g[S.FEATURES]
            h.update(f"{split}:{ds.shape}:{ds.dtype};".encode())
            for i in range(0, ds.shape[0], chunk_rows):
                h.update(np.ascontiguousarray(ds[i:i + chunk_rows]).tobytes())
            h.update(np.ascontiguousarray(g[S.LABELS][()].astype(np.int64)).tobytes())
            if S.PATHS in g:
                for p in g[S.PATHS][()]:
                    h.update(_decode(p).encode() + b"\0")
            if S.ROLES in g:  # schema 2 only: version-1 fingerprints are unchanged
                h.update(b"roles:" + np.ascontiguousarray(g[S.ROLES][()].astype(np.int8)).tobytes())
    return h.hexdigest()
