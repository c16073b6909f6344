"""The HDF5 cache: round trip, crash/resume, and one clear error per malformed-file case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from dvml.cache import (
    CacheError,
    CacheExistsError,
    CacheIncompleteError,
    CacheMissingError,
    CacheShapeError,
    CacheSpec,
    CacheSplitError,
    CacheValueError,
    CacheVersionError,
    CacheWriter,
    fingerprint,
    load_split,
    read_info,
    validate,
)
from dvml.cache import schema as S


def make_arrays(seed=0, n_train=50, n_test=30, p=3, d=16):
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.random((n_train, p, d)).astype(np.float32), rng.integers(0, 5, n_train)),
        "test": (rng.random((n_test, 1, d)).astype(np.float32), rng.integers(5, 9, n_test)),
    }


def spec_for(p=3, d=16, dtype="float16", with_paths=False):
    return CacheSpec(dataset="toy", backbone="none", weights="none", feature_dim=d,
                     views=tuple(f"v{i}" for i in range(p)), dtype=dtype, with_paths=with_paths)


def write(path, arrays, spec, chunk=7, stop_after=None):
    """Write arrays in chunks of ``chunk`` rows; ``stop_after`` chunks then return without finalizing."""
    w = CacheWriter(path, spec)
    done = 0
    for split in S.SPLITS:
        feats, labels = arrays[split]
        for i in range(w.n_written(split), len(labels), chunk):
            if stop_after is not None and done == stop_after:
                w.close()
                return None
            paths = [f"{split}/{j}.jpg" for j in range(i, min(i + chunk, len(labels)))] if spec.with_paths else None
            w.append(split, feats[i:i + chunk], labels[i:i + chunk], paths)
            done += 1
    return w.finalize()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_both_splits(tmp_path, dtype):
    arrays = make_arrays()
    path = write(tmp_path / "c.h5", arrays, spec_for(dtype=dtype, with_paths=True))
    info = read_info(path)
    assert info.complete and info.feature_dim == 16 and info.views == ("v0", "v1", "v2")
    assert info.splits["train"].n == 50 and info.splits["test"].views == 1 and info.splits["train"].dtype == dtype
    for split, (feats, labels) in arrays.items():
        s = load_split(path, split)
        assert s.features.dtype == np.float32 and s.features.shape == feats.shape
        np.testing.assert_allclose(s.features, feats.astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(s.labels, labels)
        assert list(s.paths[:2]) == [f"{split}/0.jpg", f"{split}/1.jpg"]
    only_centre = load_split(path, "train", views=slice(0, 1))
    assert only_centre.features.shape == (50, 1, 16)
    assert validate(path).dataset == "toy"


def test_fingerprint_is_content_hash(tmp_path):
    arrays = make_arrays()
    a = write(tmp_path / "a.h5", arrays, spec_for(), chunk=7)
    b = write(tmp_path / "b.h5", arrays, spec_for(), chunk=13)  # different chunking, same content
    c = write(tmp_path / "c.h5", make_arrays(seed=1), spec_for())
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_resume_after_crash_mid_write_equals_uninterrupted(tmp_path):
    arrays, spec = make_arrays(), spec_for()
    ref = write(tmp_path / "ref.h5", arrays, spec)
    path = tmp_path / "crashed.h5"
    assert write(path, arrays, spec, stop_after=9) is None  # 7 train chunks + 2 test chunks
    with h5py.File(path, "a") as f:  # a crash between resize and the n_written update leaves junk rows
        f["test/features"].resize(f["test/features"].shape[0] + 5, axis=0)
        f["test/labels"].resize(f["test/labels"].shape[0] + 3, axis=0)
    with pytest.raises(CacheIncompleteError, match="incomplete"):
        load_split(path, "train")
    resumed = write(path, arrays, spec)
    assert fingerprint(resumed) == fingerprint(ref)
    np.testing.assert_array_equal(load_split(resumed, "test").labels, arrays["test"][1])


def test_resume_after_sigkill(tmp_path):
    """A real kill -9 of a writer process mid-write leaves a file that resumes to the same content."""
    arrays, spec = make_arrays(n_train=400), spec_for()
    ref = write(tmp_path / "ref.h5", arrays, spec, chunk=7)
    np.savez(tmp_path / "arrays.npz", trf=arrays["train"][0], trl=arrays["train"][1],
             tef=arrays["test"][0], tel=arrays["test"][1])
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from dvml.cache import CacheSpec, CacheWriter
        a = np.load({str(tmp_path / 'arrays.npz')!r})
        spec = CacheSpec(dataset="toy", backbone="none", weights="none", feature_dim=16,
                         views=("v0", "v1", "v2"), dtype="float16")
        w = CacheWriter({str(path)!r}, spec)
        for k, i in enumerate(range(0, 400, 7)):
            w.append("train", a["trf"][i:i + 7], a["trl"][i:i + 7])
            if k == 20:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(CacheIncompleteError):
        read_info(path)
    assert CacheWriter(path, spec).n_written("train") == 21 * 7
    resumed = write(path, arrays, spec, chunk=7)
    assert fingerprint(resumed) == fingerprint(ref)


def test_writer_refuses_complete_file_and_different_settings(tmp_path):
    arrays = make_arrays()
    path = write(tmp_path / "c.h5", arrays, spec_for())
    with pytest.raises(CacheExistsError, match="a complete cache already exists here; pass overwrite to replace it$"):
        CacheWriter(path, spec_for())
    CacheWriter(path, spec_for(), overwrite=True).close()  # overwrite starts afresh
    assert CacheWriter(path, spec_for()).n_written("train") == 0
    with pytest.raises(CacheError, match="different settings"):
        CacheWriter(path, spec_for(dtype="float32"))


def test_writer_checks_appended_shapes(tmp_path):
    with CacheWriter(tmp_path / "c.h5", spec_for()) as w:
        with pytest.raises(CacheShapeError, match=r"expected \(B, 3, 16\)"):
            w.append("train", np.zeros((4, 2, 16)), np.zeros(4))
        with pytest.raises(CacheShapeError, match="4 feature rows but 3 labels"):
            w.append("train", np.zeros((4, 3, 16)), np.zeros(3))


def test_float16_writer_refuses_values_beyond_its_range(tmp_path):
    feats, labels = make_arrays()["train"]
    feats[3, 1, 2] = 7e4  # finite in float32, inf in float16
    with CacheWriter(tmp_path / "c.h5", spec_for()) as w:
        too_large = r"1 feature value\(s\) exceed float16's range .*and would be stored as inf; use dtype float32$"
        with pytest.raises(CacheValueError, match=too_large) as e:
            w.append("train", feats, labels)
        assert str(e.value).startswith(str(tmp_path / "c.h5"))
        assert w.n_written("train") == 0  # nothing of the refused batch is stored
    with CacheWriter(tmp_path / "c32.h5", spec_for(dtype="float32")) as w:
        w.append("train", feats, labels)  # float32 holds it


def test_float16_writer_warns_once_when_rows_round_to_zero(tmp_path, caplog):
    feats, labels = make_arrays()["train"]
    tiny = feats * 1e-9  # random weights' scale: every value rounds to 0 in float16
    with caplog.at_level("WARNING", logger="dvml.cache.writer"):
        with CacheWriter(tmp_path / "c.h5", spec_for()) as w:
            for i in range(0, 50, 10):
                w.append("train", tiny[i:i + 10], labels[i:i + 10])
        with CacheWriter(tmp_path / "c32.h5", spec_for(dtype="float32")) as w:
            w.append("train", tiny, labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once per writer, not per batch; none for float32
    assert warnings[0].startswith(f"{tmp_path / 'c.h5'}: 10 train row(s)") and "--dtype float32" in warnings[0]


def test_validate_warns_for_some_all_zero_rows(tmp_path, caplog):
    path = _good(tmp_path)
    with h5py.File(path, "a") as f:
        f["train/features"][4] = 0
        f["train/features"][9] = 0
    with caplog.at_level("WARNING", logger="dvml.cache.reader"):
        validate(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: /train/features are zero in every view in 2 of 50 row(s), first at row 4"]


# ---------------------------------------------------------------- malformed files: one clear error each
def _good(tmp_path, **kw):
    return write(tmp_path / "good.h5", make_arrays(**kw), spec_for(dtype="float32"))


def _corrupt_version(p):
    with h5py.File(p, "a") as f:
        f.attrs[S.ATTR_SCHEMA_VERSION] = 99


def _corrupt_incomplete(p):
    with h5py.File(p, "a") as f:
        f.attrs[S.ATTR_COMPLETE] = False


def _corrupt_labels_rows(p):
    with h5py.File(p, "a") as f:
        del f["train/labels"]
        f["train/labels"] = np.zeros(49, dtype=np.int64)


def _corrupt_feature_dim(p):
    with h5py.File(p, "a") as f:
        f.attrs[S.ATTR_FEATURE_DIM] = 32


def _corrupt_views(p):
    with h5py.File(p, "a") as f:
        f.attrs[S.ATTR_VIEWS] = json.dumps(["only-one"])


def _corrupt_missing_array(p):
    with h5py.File(p, "a") as f:
        del f["test/features"]


def _corrupt_nan(p):
    with h5py.File(p, "a") as f:
        f["train/features"][7, 1, 3] = np.nan


def _corrupt_inf(p):
    with h5py.File(p, "a") as f:
        f["test/features"][2, 0, 0] = np.inf


def _corrupt_zero_split(p):  # what float16 made of the tiny features of random weights
    with h5py.File(p, "a") as f:
        f["test/features"][...] = 0


def _corrupt_overlap(p):
    with h5py.File(p, "a") as f:
        f["test/labels"][0] = 3


MALFORMED = [
    ("version", _corrupt_version, CacheVersionError, "schema_version 99 is not supported"),
    ("incomplete", _corrupt_incomplete, CacheIncompleteError, "incomplete"),
    ("label-rows", _corrupt_labels_rows, CacheShapeError, "/train/labels has shape"),
    ("feature-dim", _corrupt_feature_dim, CacheShapeError, "feature_dim attribute says 32"),
    ("views", _corrupt_views, CacheShapeError, "views attribute describes 1"),
    ("missing-array", _corrupt_missing_array, CacheShapeError, "missing array /test/features"),
    ("nan", _corrupt_nan, CacheValueError, "NaN or infinite values in 1 row\\(s\\), first at row 7"),
    ("inf", _corrupt_inf, CacheValueError, "/test/features has NaN or infinite"),
    ("zero-split", _corrupt_zero_split, CacheValueError, "/test/features are zero in every view in 30 of 30 row"),
    ("overlap", _corrupt_overlap, CacheSplitError, "appear in both train and test"),
]


@pytest.mark.parametrize("name,corrupt,error,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_gives_its_own_error(tmp_path, name, corrupt, error, message):
    path = _good(tmp_path)
    corrupt(path)
    with pytest.raises(error, match=message) as info:
        validate(path)
    assert str(info.value).startswith(str(path))


def test_missing_and_not_hdf5(tmp_path):
    with pytest.raises(CacheMissingError, match="no such file"):
        read_info(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(CacheMissingError, match="not an HDF5 file"):
        read_info(junk)
    with pytest.raises(CacheMissingError, match="is a directory"):
        read_info(tmp_path)
    good = _good(tmp_path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])  # a copy that stopped short
    with pytest.raises(CacheMissingError, match="cut.h5: a truncated or damaged HDF5 file"):
        read_info(cut)


def test_validate_does_not_modify_file(tmp_path):
    path = _good(tmp_path)
    before = (os.stat(path).st_mtime_ns, fingerprint(path))
    validate(path)
    assert (os.stat(path).st_mtime_ns, fingerprint(path)) == before
