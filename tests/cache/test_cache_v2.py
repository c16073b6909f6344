"""Schema version 2: query/gallery roles of the test split; version-1 files stay exactly as they were."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dvml.cache import CacheShapeError, CacheSpec, CacheVersionError, CacheWriter, fingerprint, load_split, read_info
from dvml.cache import schema as S


def _spec(query_gallery: bool) -> CacheSpec:
    return CacheSpec(dataset="toy", backbone="none", weights="none", feature_dim=4, views=("v0",),
                     dtype="float32", query_gallery=query_gallery)


def _write(path, query_gallery=True, roles=None, chunk=3):
    rng = np.random.default_rng(0)
    tr_x, tr_y = rng.random((10, 1, 4)), np.repeat(np.arange(5), 2)
    te_x, te_y = rng.random((8, 1, 4)), np.repeat(np.arange(10, 14), 2)
    roles = np.array([1, 2, 3, 2, 1, 2, 1, 2]) if roles is None else np.asarray(roles)
    w = CacheWriter(path, _spec(query_gallery))
    w.append("train", tr_x, tr_y)
    for i in range(0, 8, chunk):
        w.append("test", te_x[i:i + chunk], te_y[i:i + chunk], roles=roles[i:i + chunk] if query_gallery else None)
    return w.finalize(), roles


def test_roles_round_trip_as_version_2(tmp_path):
    path, roles = _write(tmp_path / "qg.h5")
    info = read_info(path)
    assert info.schema_version == 2 and info.query_gallery
    assert (info.splits["test"].n_query, info.splits["test"].n_gallery) == (4, 5)  # row 2 is both
    assert info.splits["train"].n_query is None
    test = load_split(path, "test")
    np.testing.assert_array_equal(test.roles, roles)
    assert test.roles.dtype == np.int8 and load_split(path, "train").roles is None


def test_without_roles_the_file_is_version_1_as_before(tmp_path):
    path, _ = _write(tmp_path / "plain.h5", query_gallery=False)
    info = read_info(path)
    assert info.schema_version == 1 and not info.query_gallery
    with h5py.File(path) as f:
        assert S.ROLES not in f["test"]
        assert "query_gallery" not in json.loads(f.attrs[S.ATTR_WRITER_CONFIG])  # same config as older writers
    assert load_split(path, "test").roles is None


def test_fingerprint_covers_roles(tmp_path):
    a, _ = _write(tmp_path / "a.h5")
    b, _ = _write(tmp_path / "b.h5", roles=[1, 2, 3, 2, 1, 2, 2, 2])
    assert fingerprint(a) != fingerprint(b)


def test_writer_refuses_missing_or_bad_roles(tmp_path):
    w = CacheWriter(tmp_path / "w.h5", _spec(True))
    x, y = np.zeros((2, 1, 4)), np.array([1, 1])
    with pytest.raises(CacheShapeError, match="give one role per row"):
        w.append("test", x, y)
    with pytest.raises(CacheShapeError, match="roles must be 1 \\(query\\)"):
        w.append("test", x, y, roles=[1, 4])
    with pytest.raises(CacheShapeError, match="only the test split"):
        w.append("train", x, y, roles=[1, 2])
    w.append("train", x, np.array([0, 0]))
    w.append("test", x, y, roles=[1, 1])
    with pytest.raises(CacheShapeError, match="no gallery row"):
        w.finalize()
    w.close()
    plain = CacheWriter(tmp_path / "p.h5", _spec(False))
    with pytest.raises(CacheShapeError, match="only the test split of a query_gallery cache"):
        plain.append("test", x, y, roles=[1, 2])
    plain.close()


def _set(path, **attrs):
    with h5py.File(path, "a") as f:
        for k, v in attrs.items():
            f.attrs[k] = v


def _replace_roles(path, values):
    with h5py.File(path, "a") as f:
        del f["test/roles"]
        if values is not None:
            f["test/roles"] = np.asarray(values, dtype=np.int8)


@pytest.mark.parametrize(("corrupt", "error", "message"), [
    (lambda p: _replace_roles(p, None), CacheShapeError, "schema_version 2 but no /test/roles"),
    (lambda p: _replace_roles(p, [1, 2, 3]), CacheShapeError, "/test/roles has shape \\(3,\\)"),
    (lambda p: _replace_roles(p, [1, 2, 0, 2, 1, 2, 1, 2]), CacheShapeError, "other than 1 \\(query\\).*row 2"),
    (lambda p: _replace_roles(p, [2] * 8), CacheShapeError, "0 query and 8 gallery rows"),
    (lambda p: _set(p, schema_version=1), CacheShapeError, "schema_version is 1; a file with roles is version 2"),
    (lambda p: _set(p, schema_version=3), CacheVersionError, "schema_version 3 is not supported .* 1, 2"),
])
def test_malformed_roles_give_clear_errors(tmp_path, corrupt, error, message):
    path, _ = _write(tmp_path / "qg.h5")
    corrupt(path)
    with pytest.raises(error, match=message) as err:
        read_info(path)
    assert str(err.value).startswith(str(path))
