"""Validating reader for the feature cache (see :mod:`dvml.cache.schema`).

:func:`read_info` checks structure without loading features; :func:`load_split` loads one split into
memory as float32 and checks values; :func:`validate` does both for every split. Every failure raises
a :class:`~dvml.cache.errors.CacheError` whose message names the file and the problem (:func:`validate` logs a
warning for some rows that are all zero, and raises when a whole split is).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvml._lazy import lazy_module
from dvml.cache import schema as S
from dvml.cache.errors import (
    CacheBusyError,
    CacheIncompleteError,
    CacheMissingError,
    CacheShapeError,
    CacheSplitError,
    CacheValueError,
    CacheVersionError,
)
from dvml.files import writer_pid

h5py = lazy_module("h5py")  # imported on first use: the CLI reads this module's light parts to declare options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitInfo:
    n: int  # images
    views: int  # P
    n_classes: int
    dtype: str
    has_paths: bool
    n_query: int | None = None  # test split of a schema-2 file: rows that are queries (incl. both)
    n_gallery: int | None = None  # ... rows in the gallery (incl. both)


@dataclass(frozen=True)
class CacheInfo:
    """Structural facts of a validated cache file (no feature values loaded)."""

    path: Path
    schema_version: int
    dataset: str
    backbone: str
    weights: str
    feature_dim: int
    views: tuple[str, ...]
    complete: bool
    dvml_version: str
    extra: dict
    splits: dict[str, SplitInfo]
    size_bytes: int
    preprocess: dict | None = None  # the optional ``preprocess`` attribute (None when absent or unreadable)

    @property
    def query_gallery(self) -> bool:
        """True when the test split marks rows as query/gallery (schema version 2)."""
        return self.splits[S.TEST].n_query is not None


@dataclass(frozen=True)
class Split:
    """One split in memory. features: (N, P, D) float32; labels: (N,) int64; paths: (N,) str or None;
    roles: (N,) int8 of ``schema.ROLE_*`` for the test split of a schema-2 file, else None (every row is
    both query and gallery)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray | None = None
    roles: np.ndarray | None = None


#: The first bytes of an HDF5 file (a file whose user block is empty, as every cache dvml writes).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise CacheMissingError(path, "no such file")
    if path.is_dir():
        raise CacheMissingError(path, "is a directory, expected an HDF5 feature cache file")
    pid = writer_pid(path)
    if pid is not None:  # (HDF5 itself would only say it cannot open the file)
        who = "pid unknown" if pid < 0 else f"pid {pid}"
        raise CacheBusyError(path, f"is being written by another process ({who}); wait for it to finish")
    try:
        return h5py.File(path, "r")
    except OSError:
        with open(path, "rb") as f:
            signed = f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
        if signed:  # HDF5's own signature, yet unreadable: cut short (a copy or download that stopped) or damaged
            raise CacheMissingError(path, "a truncated or damaged HDF5 file (it starts like one but cannot be read; "
                                          "copy or extract it again)") from None
        raise CacheMissingError(path, "not an HDF5 file (cannot be opened by h5py)") from None


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def _int_attr(path: Path, a, name: str) -> int:
    """An integer root attribute (a Python or numpy integer, or a string of digits); CacheShapeError naming the
    file and the attribute for anything else (``schema_version="one"``, a float, an array)."""
    v = _decode(a[name])
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, str)):
        raise CacheShapeError(path, f"root attribute {name!r} must be an integer, got {v!r}")
    try:
        return int(v)
    except ValueError:
        raise CacheShapeError(path, f"root attribute {name!r} must be an integer, got {v!r}") from None


def _bool_attr(path: Path, a, name: str) -> bool:
    v = _decode(a[name])
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and int(v) in (0, 1)):
        return bool(v)
    raise CacheShapeError(path, f"root attribute {name!r} must be true or false, got {v!r}")


def _str_attr(path: Path, a, name: str) -> str:
    v = _decode(a[name])
    if not isinstance(v, str):
        raise CacheShapeError(path, f"root attribute {name!r} must be a string, got {v!r}")
    return v


def _check_roles(path: Path, g, split: str, version: int, complete: bool) -> tuple[int | None, int | None]:
    """Validate ``/test/roles`` against the schema version; (n_query, n_gallery) or (None, None)."""
    has = S.ROLES in g
    if split != S.TEST or version < 2:
        if has:
            raise CacheShapeError(path, f"/{split}/roles is present but "
                                        + ("only the test split has roles" if split != S.TEST else
                                           f"schema_version is {version}; a file with roles is version 2"))
        return None, None
    if not has:
        raise CacheShapeError(path, "schema_version 2 but no /test/roles (query/gallery marks)")
    roles = g[S.ROLES]
    n = g[S.FEATURES].shape[0]
    if roles.shape != (n,):
        raise CacheShapeError(path, f"/test/roles has shape {roles.shape} but /test/features has {n} rows")
    if not np.issubdtype(roles.dtype, np.integer):
        raise CacheShapeError(path, f"/test/roles has dtype {roles.dtype}, expected integers")
    values = roles[()]
    bad = ~np.isin(values, S.ROLE_VALUES)
    if bad.any():
        raise CacheShapeError(path, f"/test/roles has {int(bad.sum())} value(s) other than {S.ROLE_QUERY} (query), "
                                    f"{S.ROLE_GALLERY} (gallery), {S.ROLE_BOTH} (both), first at row "
                                    f"{int(np.flatnonzero(bad)[0])}")
    n_query, n_gallery = int((values & S.ROLE_QUERY > 0).sum()), int((values & S.ROLE_GALLERY > 0).sum())
    if complete and (n_query == 0 or n_gallery == 0):
        raise CacheShapeError(path, f"/test/roles has {n_query} query and {n_gallery} gallery rows; "
                                    "need at least one of each")
    return n_query, n_gallery


def read_info(path: str | Path, *, require_complete: bool = True) -> CacheInfo:
    """Check the file's structure and return its facts.

    Raises CacheMissingError, CacheVersionError, CacheIncompleteError (if ``require_complete``),
    CacheShapeError (missing arrays/attributes, rows/views/feature_dim/dtype disagreeing).
    """
    path = Path(path)
    with _open(path) as f:
        a = f.attrs
        if S.ATTR_SCHEMA_VERSION not in a:
            raise CacheShapeError(path, f"missing root attribute {S.ATTR_SCHEMA_VERSION!r}; "
                                        "not a dvml feature cache")
        version = _int_attr(path, a, S.ATTR_SCHEMA_VERSION)
        if version not in S.SUPPORTED_VERSIONS:
            raise CacheVersionError(path, f"schema_version {version} is not supported (this dvml reads "
                                          f"version{'s' if len(S.SUPPORTED_VERSIONS) > 1 else ''} "
                                          f"{', '.join(map(str, S.SUPPORTED_VERSIONS))})")
        missing = [k for k in S.REQUIRED_ROOT_ATTRS if k not in a]
        if missing:
            raise CacheShapeError(path, f"missing root attribute(s): {', '.join(missing)}")
        complete = _bool_attr(path, a, S.ATTR_COMPLETE)
        if require_complete and not complete:
            raise CacheIncompleteError(path, "incomplete: the writer did not finish (complete=false); "
                                             "rerun the same command to resume it")
        feature_dim = _int_attr(path, a, S.ATTR_FEATURE_DIM)
        views_raw = _decode(a[S.ATTR_VIEWS])
        try:
            views = tuple(json.loads(views_raw)) if isinstance(views_raw, str) else tuple(map(str, views_raw))
        except json.JSONDecodeError:
            views = (views_raw,)
        splits = {}
        for split in S.SPLITS:
            for name in (S.FEATURES, S.LABELS):
                if S.dataset_path(split, name) not in f:
                    raise CacheShapeError(path, f"missing array /{S.dataset_path(split, name)}")
            feats, labels = f[split][S.FEATURES], f[split][S.LABELS]
            if feats.ndim != 3:
                raise CacheShapeError(path, f"/{split}/features has shape {feats.shape}, expected (N, P, D)")
            if feats.shape[2] != feature_dim:
                raise CacheShapeError(path, f"/{split}/features has D={feats.shape[2]} but "
                                            f"feature_dim attribute says {feature_dim}")
            if str(feats.dtype) not in S.FEATURE_DTYPES:
                raise CacheShapeError(path, f"/{split}/features has dtype {feats.dtype}, "
                                            f"expected one of {S.FEATURE_DTYPES}")
            if labels.shape != (feats.shape[0],):
                raise CacheShapeError(path, f"/{split}/labels has shape {labels.shape} but "
                                            f"/{split}/features has {feats.shape[0]} rows")
            if not np.issubdtype(labels.dtype, np.integer):
                raise CacheShapeError(path, f"/{split}/labels has dtype {labels.dtype}, expected integers")
            has_paths = S.PATHS in f[split]
            if has_paths and f[split][S.PATHS].shape != (feats.shape[0],):
                raise CacheShapeError(path, f"/{split}/paths has shape {f[split][S.PATHS].shape} but "
                                            f"/{split}/features has {feats.shape[0]} rows")
            if complete and feats.shape[0] == 0:
                raise CacheShapeError(path, f"/{split} has no rows")
            n_classes = int(np.unique(labels[()]).size) if labels.shape[0] else 0
            n_query, n_gallery = _check_roles(path, f[split], split, version, complete)
            splits[split] = SplitInfo(int(feats.shape[0]), int(feats.shape[1]), n_classes,
                                      str(feats.dtype), has_paths, n_query, n_gallery)
        if splits[S.TRAIN].views != len(views):
            raise CacheShapeError(path, f"/train/features has P={splits[S.TRAIN].views} views but the "
                                        f"views attribute describes {len(views)}")
        if complete:
            overlap = np.intersect1d(f[S.TRAIN][S.LABELS][()], f[S.TEST][S.LABELS][()])
            if overlap.size:
                shown = ", ".join(map(str, overlap[:10])) + (" ..." if overlap.size > 10 else "")
                raise CacheSplitError(path, f"{overlap.size} class id(s) appear in both train and test "
                                            f"(zero-shot split broken): {shown}")
        extra_raw = _decode(a.get(S.ATTR_EXTRA, "{}"))
        try:
            extra = json.loads(extra_raw)
        except (TypeError, json.JSONDecodeError):
            extra = {}
        try:
            preprocess = json.loads(_decode(a[S.ATTR_PREPROCESS])) if S.ATTR_PREPROCESS in a else None
        except (TypeError, json.JSONDecodeError):
            preprocess = None
        if not isinstance(extra, dict):
            raise CacheShapeError(path, f"root attribute {S.ATTR_EXTRA!r} must be a JSON object, got {extra_raw!r}")
        return CacheInfo(path=path, schema_version=version, dataset=_str_attr(path, a, S.ATTR_DATASET),
                         backbone=_str_attr(path, a, S.ATTR_BACKBONE), weights=_str_attr(path, a, S.ATTR_WEIGHTS),
                         feature_dim=feature_dim, views=views, complete=complete,
                         dvml_version=str(_decode(a.get(S.ATTR_DVML_VERSION, "unknown"))),
                         extra=extra, splits=splits, size_bytes=path.stat().st_size,
                         preprocess=preprocess if isinstance(preprocess, dict) else None)


def load_split(path: str | Path, split: str, *, views: slice | list[int] | None = None,
               dtype=np.float32, chunk_rows: int = 4096) -> Split:
    """Load one split into memory, validated.

    Args:
        path: cache file.
        split: ``"train"`` or ``"test"``.
        views: subset of views to load (default: all P).
        dtype: in-memory feature dtype (float32 by default whatever the on-disk dtype).
    Returns:
        :class:`Split` with features (N, P', D) of ``dtype`` (and ``roles`` for a schema-2 test split).
    Raises:
        CacheError subclasses for structural problems (see :func:`read_info`) and CacheValueError for
        NaN/inf features (naming the first bad row).
    """
    if split not in S.SPLITS:
        raise ValueError(f"split must be one of {S.SPLITS}, got {split!r}")
    path = Path(path)
    info = read_info(path)
    with _open(path) as f:
        g = f[split]
        ds = g[S.FEATURES]
        n = ds.shape[0]
        sel = slice(None) if views is None else views
        p = len(range(*sel.indices(ds.shape[1]))) if isinstance(sel, slice) else len(sel)
        out = np.empty((n, p, info.feature_dim), dtype=dtype)
        bad = np.zeros(n, dtype=bool)
        for i in range(0, n, chunk_rows):  # chunked: bounded temporary memory for float16 -> float32
            block = ds[i:i + chunk_rows][:, sel]
            bad[i:i + chunk_rows] = ~np.isfinite(block).all(axis=(1, 2))  # on the stored dtype: fewer bytes
            out[i:i + chunk_rows] = block
        if bad.any():
            rows = np.flatnonzero(bad)
            raise CacheValueError(path, f"/{split}/features has NaN or infinite values in {rows.size} row(s), "
                                        f"first at row {rows[0]}")
        labels = g[S.LABELS][()].astype(np.int64)
        paths = None
        if S.PATHS in g:
            paths = np.array([_decode(p) for p in g[S.PATHS][()]], dtype=object)
        roles = g[S.ROLES][()].astype(np.int8) if S.ROLES in g else None
    return Split(features=out, labels=labels, paths=paths, roles=roles)


def load_test_roles(path: str | Path) -> np.ndarray | None:
    """The test split's query/gallery roles (N_test,) int8 of a schema-2 file, None for schema 1.
    Only the roles are read (the structure is checked as by :func:`read_info`)."""
    path = Path(path)
    info = read_info(path)
    if not info.query_gallery:
        return None
    with _open(path) as f:
        return f[S.TEST][S.ROLES][()].astype(np.int8)


def load_labels(path: str | Path, split: str) -> np.ndarray:
    """The (N,) int64 labels of one split, without reading its features (checks the structure first)."""
    if split not in S.SPLITS:
        raise ValueError(f"split must be one of {S.SPLITS}, got {split!r}")
    path = Path(path)
    read_info(path)
    with _open(path) as f:
        return f[split][S.LABELS][()].astype(np.int64)


def validate(path: str | Path) -> CacheInfo:
    """Full check: structure, completeness, class disjointness, finite values of every split, and rows whose
    features are zero in every view (:func:`_check_zero_rows`: an error when a whole split is, else a warning)."""
    info = read_info(path)
    for split in S.SPLITS:
        dtype = info.splits[split].dtype
        data = load_split(path, split, views=slice(0, None), dtype=np.float16 if dtype == "float16" else np.float32)
        _check_zero_rows(Path(path), split, data.features, dtype)
    return info


def _check_zero_rows(path: Path, split: str, features: np.ndarray, dtype: str) -> None:
    """Rows of ``features`` (N, P, D) that are zero in every view carry no information (float16 rounds features
    below ~6e-8, e.g. of random weights, to zero). All N such rows raise :class:`CacheValueError`; some of them are
    logged as a warning (a real feature extractor can give a blank image an all-zero row)."""
    rows = np.flatnonzero(~features.any(axis=(1, 2)))
    if rows.size == 0:
        return
    hint = ""
    if dtype == "float16":
        hint = "; float16 rounds features below ~6e-8 to zero: re-extract with --dtype float32"
    where = f"/{split}/features are zero in every view in {rows.size} of {features.shape[0]} row(s)"
    if rows.size == features.shape[0]:
        raise CacheValueError(path, f"{where}: no image can be told apart{hint}")
    log.warning("%s: %s, first at row %d%s", path, where, rows[0], hint)
