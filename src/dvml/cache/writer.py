"""Chunked, resumable writer for the feature cache (see :mod:`dvml.cache.schema`).

Contract:

* Rows are appended per split in chunks; after each chunk the split's ``n_written`` attribute is
  updated and the file flushed, so a killed writer leaves a file that readers refuse
  (``complete`` is false) and that :class:`CacheWriter` reopens and continues from ``n_written``.
* ``complete`` becomes true only in :meth:`CacheWriter.finalize`, after both splits are written.
* Reopening an incomplete file with a different writer configuration is refused (resuming would mix
  two different feature sets); an existing *complete* file is refused unless ``overwrite=True``.
* One writer at a time: the writer holds :func:`dvml.files.writer_lock` of the file from construction to
  :meth:`CacheWriter.close`; a second writer (or ``overwrite`` under a live one) is refused with
  :class:`~dvml.files.BusyError` and readers say the file is being written. A symlink is written through.
* A float16 cache does not silently lose features: a batch with finite values beyond float16's range (which
  would be stored as inf) is refused with :class:`~dvml.cache.errors.CacheValueError`; rows that are non-zero
  but become all zeros in float16 (e.g. features ~1e-9 of random weights) are written, with one warning per
  writer. Both suggest ``--dtype float32``.
* A failed write (full disk, read-only file system, ...) raises :class:`~dvml.files.WriteError`
  (``cannot write PATH: CAUSE``) and leaves ``complete`` false. After a failed write *inside* HDF5 the library's
  state is unusable (closing or even exiting the process crashes it): the error then carries
  ``hdf5_broken = True``, the file is not closed, and the CLI ends the process at once after printing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dvml import __version__
from dvml._lazy import lazy_module
from dvml.cache import schema as S
from dvml.cache.errors import CacheError, CacheExistsError, CacheShapeError, CacheValueError
from dvml.files import WriteError, WriterLock, check_free_space, make_dir

h5py = lazy_module("h5py")  # imported on first use: the CLI reads this module's light parts to declare options

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger finite values become inf in a float16 cache


@dataclass(frozen=True)
class CacheSpec:
    """What a cache file will hold; stored as ``writer_config`` and compared on resume.

    ``views`` describes the P training views (``len(views) == train_views``); ``test_views`` is P_test.
    ``extra`` is free-form provenance (transforms, seeds, parameters) stored as JSON; it takes part in
    the resume check, so a resumed write is the same job. ``query_gallery`` adds ``/test/roles`` (one role
    per test row, given to :meth:`CacheWriter.append`) and makes the file schema version 2. ``preprocess``
    (optional) is stored as the ``preprocess`` root attribute (see :mod:`dvml.cache.schema`).
    """

    dataset: str
    backbone: str
    weights: str
    feature_dim: int
    views: tuple[str, ...]
    test_views: int = 1
    dtype: str = "float16"
    with_paths: bool = False
    extra: Mapping = field(default_factory=dict)
    query_gallery: bool = False
    preprocess: Mapping | None = None

    def __post_init__(self):
        if self.feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if not self.views:
            raise ValueError("views must describe at least one training view")
        if self.test_views < 1:
            raise ValueError(f"test_views must be >= 1, got {self.test_views}")
        if self.dtype not in S.FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {S.FEATURE_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "views", tuple(self.views))

    @property
    def train_views(self) -> int:
        return len(self.views)

    def views_of(self, split: str) -> int:
        return self.train_views if split == S.TRAIN else self.test_views

    def to_json(self) -> str:
        d = asdict(self)
        if not d["query_gallery"]:  # absent when false: the writer_config of a version-1 job is unchanged
            del d["query_gallery"]
        if d["preprocess"] is None:  # files written before the field existed resume unchanged
            del d["preprocess"]
        return json.dumps(d, sort_keys=True, default=list)


def _quiet_hdf5_failures() -> None:
    """Once HDF5 failed a write, every h5py object freed afterwards (some inside the failing call) reports the same
    failure from its destructor: a traceback and "Exception ignored in ... __dealloc__" each, through
    ``sys.excepthook`` and ``sys.unraisablehook``. Installed when a writer opens, these hooks drop exactly those
    reports (a RuntimeError carrying HDF5's "write failed"): the failure is raised once, as a WriteError."""
    if getattr(sys.unraisablehook, "_dvml_hdf5", False):
        return
    prev_unraisable, prev_except = sys.unraisablehook, sys.excepthook

    def from_hdf5(exc) -> bool:
        return isinstance(exc, RuntimeError) and "write failed" in str(exc)

    def unraisable(u):
        if not from_hdf5(u.exc_value):
            prev_unraisable(u)

    def excepthook(typ, value, tb):
        if not from_hdf5(value):
            prev_except(typ, value, tb)

    unraisable._dvml_hdf5 = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


class CacheWriter:
    """Append features to a cache file split by split; resumable.

    Example::

        with CacheWriter(path, spec) as w:
            start = w.n_written("train")          # > 0 when resuming
            for feats, labels in chunks_from(start):   # feats: (B, P, D), labels: (B,)
                w.append("train", feats, labels)
            ...
            w.finalize()
    """

    def __init__(self, path: str | Path, spec: CacheSpec, *, overwrite: bool = False,
                 chunk_rows: int = 256):
        self.path = Path(path)
        self.spec = spec
        self.chunk_rows = max(1, int(chunk_rows))
        self._file: h5py.File | None = None
        self._broken = False
        self._warned_underflow = False  # the float16 underflow warning is given once per writer
        real = Path(os.path.realpath(self.path))  # a symlink is written through: the link stays a link
        try:
            st = os.stat(real)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise CacheError(self.path, f"is {what}; a feature cache must be a regular (seekable) file")
        make_dir(real.parent, target=self.path)
        _quiet_hdf5_failures()
        self._lock = WriterLock(self.path).acquire()  # before anything is read, replaced or deleted
        try:
            with self._writing():
                if real.exists() and not overwrite:
                    self._file = self._reopen(real)
                else:
                    if real.exists():
                        real.unlink()
                    self._file = self._create(real)
        except BaseException:
            self._lock.release()
            raise

    @contextlib.contextmanager
    def _writing(self):
        """Translate a failed write into :class:`WriteError` naming the file (see the module docstring)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            text = str(e)
            if not isinstance(e, OSError) and "errno =" not in text:
                raise  # not an I/O failure
            err = WriteError(self.path, e)
            if not isinstance(e, OSError) or "write failed" in text:  # HDF5 failed writing its own file
                self._broken = err.hdf5_broken = True
            raise err from None

    # ------------------------------------------------------------------ open / create
    def _create(self, real: Path) -> h5py.File:
        spec = self.spec
        f = h5py.File(real, "w")
        f.attrs[S.ATTR_SCHEMA_VERSION] = S.version_for(spec.query_gallery)
        f.attrs[S.ATTR_DATASET] = spec.dataset
        f.attrs[S.ATTR_BACKBONE] = spec.backbone
        f.attrs[S.ATTR_WEIGHTS] = spec.weights
        f.attrs[S.ATTR_FEATURE_DIM] = int(spec.feature_dim)
        f.attrs[S.ATTR_VIEWS] = json.dumps(list(spec.views))
        f.attrs[S.ATTR_COMPLETE] = False
        f.attrs[S.ATTR_DVML_VERSION] = __version__
        f.attrs[S.ATTR_WRITER_CONFIG] = spec.to_json()
        f.attrs[S.ATTR_EXTRA] = json.dumps(dict(spec.extra), sort_keys=True, default=str)
        if spec.preprocess is not None:
            f.attrs[S.ATTR_PREPROCESS] = json.dumps(dict(spec.preprocess), sort_keys=True, default=list)
        for split in S.SPLITS:
            g = f.create_group(split)
            p = spec.views_of(split)
            g.create_dataset(S.FEATURES, shape=(0, p, spec.feature_dim), maxshape=(None, p, spec.feature_dim),
                             dtype=spec.dtype, chunks=(min(self.chunk_rows, 64), p, spec.feature_dim))
            g.create_dataset(S.LABELS, shape=(0,), maxshape=(None,), dtype=S.LABEL_DTYPE, chunks=(4096,))
            if spec.with_paths:
                g.create_dataset(S.PATHS, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                                 chunks=(4096,))
            if spec.query_gallery and split == S.TEST:
                g.create_dataset(S.ROLES, shape=(0,), maxshape=(None,), dtype=S.ROLE_DTYPE, chunks=(4096,))
            g.attrs[S.ATTR_N_WRITTEN] = 0
        f.flush()
        return f

    def _reopen(self, real: Path) -> h5py.File:
        try:
            f = h5py.File(real, "a")
        except OSError as e:
            if e.errno:  # permission, read-only file system, ...: a write error, not a damaged file
                raise
            raise CacheError(self.path, f"exists but cannot be opened as HDF5 ({e}); "
                                        "pass `overwrite` to replace it") from None
        if bool(f.attrs.get(S.ATTR_COMPLETE, False)):
            f.close()
            raise CacheExistsError(self.path, "a complete cache already exists here; "
                                              "pass `overwrite` to replace it")
        stored = f.attrs.get(S.ATTR_WRITER_CONFIG)
        if stored is None or json.loads(stored) != json.loads(self.spec.to_json()):
            f.close()
            raise CacheError(self.path, "an incomplete cache written with different settings exists here; "
                                        "rerun with the same settings to resume, or pass `overwrite`")
        for split in S.SPLITS:  # drop rows past the last durable chunk (a crash mid-append)
            g = f[split]
            n = int(g.attrs[S.ATTR_N_WRITTEN])
            for name in (S.FEATURES, S.LABELS, S.PATHS, S.ROLES):
                if name in g and g[name].shape[0] != n:
                    g[name].resize(n, axis=0)
        log.info("resuming %s at train=%d test=%d rows", self.path,
                 *(int(f[split].attrs[S.ATTR_N_WRITTEN]) for split in S.SPLITS))
        return f

    # ------------------------------------------------------------------ writing
    def n_written(self, split: str) -> int:
        """Rows of ``split`` already durably written (where a resumed job continues)."""
        return int(self._file[split].attrs[S.ATTR_N_WRITTEN])

    def append(self, split: str, features: np.ndarray, labels: np.ndarray,
               paths: Sequence[str] | None = None, roles: Sequence[int] | np.ndarray | None = None) -> None:
        """Append rows to ``split``. features: (B, P, D) (or (B, D) when P == 1); labels: (B,).

        ``roles`` (B,) of ``ROLE_QUERY``/``ROLE_GALLERY``/``ROLE_BOTH``: required for the test split of a
        ``query_gallery`` cache, refused anywhere else.
        """
        if split not in S.SPLITS:
            raise ValueError(f"split must be one of {S.SPLITS}, got {split!r}")
        spec = self.spec
        features = np.asarray(features)
        if features.ndim == 2 and spec.views_of(split) == 1:
            features = features[:, None, :]
        expected = (spec.views_of(split), spec.feature_dim)
        if features.ndim != 3 or features.shape[1:] != expected:
            raise CacheShapeError(self.path, f"{split}: appended features have shape {features.shape}, "
                                             f"expected (B, {expected[0]}, {expected[1]})")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != features.shape[0]:
            raise CacheShapeError(self.path, f"{split}: {features.shape[0]} feature rows but "
                                             f"{labels.shape[0]} labels")
        if spec.with_paths and (paths is None or len(paths) != len(labels)):
            raise CacheShapeError(self.path, f"{split}: this cache stores paths; give one per row")
        wants_roles = spec.query_gallery and split == S.TEST
        if wants_roles:
            roles = np.asarray(roles if roles is not None else [], dtype=np.int64).reshape(-1)
            if roles.shape != labels.shape:
                raise CacheShapeError(self.path, f"{split}: this cache marks test rows as query/gallery; give "
                                                 f"one role per row ({labels.shape[0]} rows, {roles.shape[0]} roles)")
            if not np.isin(roles, S.ROLE_VALUES).all():
                got = sorted(set(roles.tolist()))
                raise CacheShapeError(self.path, f"{split}: roles must be {S.ROLE_QUERY} (query), {S.ROLE_GALLERY} "
                                                 f"(gallery) or {S.ROLE_BOTH} (both), got {got}")
        elif roles is not None:
            raise CacheShapeError(self.path, f"{split}: roles given, but only the test split of a query_gallery "
                                             "cache has them")
        g = self._file[split]
        n0, b = self.n_written(split), features.shape[0]
        # a full disk is reported before HDF5 writes (it cannot recover from a failed write; see above)
        check_free_space(self.path, features.shape[0] * int(np.prod(expected)) * np.dtype(spec.dtype).itemsize
                         + labels.nbytes + (sum(len(str(p)) + 16 for p in paths) if spec.with_paths else 0)
                         + (labels.shape[0] * np.dtype(S.ROLE_DTYPE).itemsize if wants_roles else 0))
        stored = self._stored_features(split, features)
        with self._writing():
            for name, values in ((S.FEATURES, stored), (S.LABELS, labels)):
                g[name].resize(n0 + b, axis=0)
                g[name][n0:n0 + b] = values
            if spec.with_paths:
                g[S.PATHS].resize(n0 + b, axis=0)
                g[S.PATHS][n0:n0 + b] = [str(p) for p in paths]
            if wants_roles:
                g[S.ROLES].resize(n0 + b, axis=0)
                g[S.ROLES][n0:n0 + b] = roles.astype(S.ROLE_DTYPE)
            g.attrs[S.ATTR_N_WRITTEN] = n0 + b
            self._file.flush()

    def _stored_features(self, split: str, features: np.ndarray) -> np.ndarray:
        """``features`` (B, P, D) in the cache's dtype. For float16: finite values that overflow to inf raise
        :class:`CacheValueError`; rows non-zero before the cast and all zero after it are warned about once."""
        if self.spec.dtype != "float16" or features.dtype == np.float16:
            return features.astype(self.spec.dtype, copy=False)
        with np.errstate(over="ignore"):  # the overflow is reported below, as an error naming the file
            stored = features.astype(np.float16)
        overflow = np.isfinite(features) & ~np.isfinite(stored)
        if overflow.any():
            largest = float(np.abs(features[overflow]).max())
            raise CacheValueError(self.path, f"{split}: {int(overflow.sum())} feature value(s) exceed float16's range "
                                             f"(|x| > {FLOAT16_MAX:g}, largest {largest:.3g}) and would be stored as "
                                             "inf; use `dtype` float32")
        lost = features.any(axis=(1, 2)) & ~stored.any(axis=(1, 2))
        if lost.any() and not self._warned_underflow:
            self._warned_underflow = True
            largest = float(np.abs(features[lost]).max())
            log.warning("%s: %d %s row(s) of non-zero features (|x| <= %.2g) become all zeros in float16, so those "
                        "images cannot be told apart; use --dtype float32 (warned once; dvml cache validate counts "
                        "them all)", self.path, int(lost.sum()), split, largest)
        return stored

    def set_extra(self, **items) -> None:
        """Merge provenance that is only known during writing (e.g. skipped files) into ``extra``."""
        extra = json.loads(self._file.attrs.get(S.ATTR_EXTRA, "{}"))
        extra.update(items)
        with self._writing():
            self._file.attrs[S.ATTR_EXTRA] = json.dumps(extra, sort_keys=True, default=str)

    def extra(self) -> dict:
        """The current ``extra`` provenance, including items merged by :meth:`set_extra` (e.g. on resume)."""
        return json.loads(self._file.attrs.get(S.ATTR_EXTRA, "{}"))

    def finalize(self) -> Path:
        """Mark the file complete. Both splits must have at least one row (and a query_gallery test split at
        least one query and one gallery row)."""
        for split in S.SPLITS:
            if self.n_written(split) == 0:
                raise CacheShapeError(self.path, f"cannot finalize: split {split!r} has no rows")
        if self.spec.query_gallery:
            roles = self._file[S.TEST][S.ROLES][()]
            for bit, name in ((S.ROLE_QUERY, "query"), (S.ROLE_GALLERY, "gallery")):
                if not (roles & bit).any():
                    raise CacheShapeError(self.path, f"cannot finalize: the test split has no {name} row")
        with self._writing():
            self._file.attrs[S.ATTR_COMPLETE] = True
            self._file.flush()
            self.close()
        return self.path

    def close(self) -> None:
        """Close the file and release the writer lock (a file HDF5 failed to write is left to the process end)."""
        try:
            if self._file is not None and not self._broken and self._file.id.valid:
                with self._writing():
                    self._file.close()
        finally:
            self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
