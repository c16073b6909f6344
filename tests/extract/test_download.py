"""``dvml.extract.download`` and ``dvml.extract.archive``: fetch against a local HTTP server (``http_server`` in
conftest: Range, cut connections, a request log), verify, and the archive safety checks. The ``dvml data``
commands are tested end to end in ``tests/cli/test_data.py``."""

from __future__ import annotations

import dataclasses
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dvml.errors import DvmlError
from dvml.extract import download as D
from dvml.extract.archive import TMP_PREFIX, ArchiveError, safe_extract
from dvml.extract.datasets import read_dataset


# --------------------------------------------------------------------------------------------- fetch
def test_fetch_resumes_after_a_cut_connection(archives, http_server, tmp_path):
    data = np.random.default_rng(0).bytes(300_000)
    http_server.files["/f.bin"] = data
    http_server.cuts["/f.bin"] = [100_000, 50_000]  # two cuts: resumes twice
    seen = []
    out = D.fetch(http_server.url("/f.bin"), tmp_path / "f.bin", md5=archives.md5(data),
                  progress=lambda stage, name, done, total: seen.append((stage, done, total)))
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert http_server.log == [("/f.bin", None), ("/f.bin", "bytes=100000-"), ("/f.bin", "bytes=150000-")]
    downloads = [s for s in seen if s[0] == "download"]
    assert downloads[-1] == ("download", 300_000, 300_000)
    assert all(total == 300_000 for _, _, total in downloads)  # from Content-Length, then Content-Range
    assert ("md5", 300_000, 300_000) in seen


def test_fetch_continues_a_part_file_left_by_a_killed_run(archives, http_server, tmp_path):
    data = np.random.default_rng(1).bytes(50_000)
    http_server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:12_345])
    D.fetch(http_server.url("/f.bin"), tmp_path / "f.bin", md5=archives.md5(data))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert http_server.log == [("/f.bin", "bytes=12345-")]


def test_fetch_restarts_when_the_server_ignores_range(archives, http_server, tmp_path):
    data = np.random.default_rng(2).bytes(20_000)
    http_server.files["/f.bin"] = data
    http_server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    D.fetch(http_server.url("/f.bin"), tmp_path / "f.bin", md5=archives.md5(data))
    assert (tmp_path / "f.bin").read_bytes() == data


def test_fetch_wrong_checksum_leaves_nothing(archives, http_server, tmp_path):
    http_server.files["/f.bin"] = b"not the published file" * 100
    with pytest.raises(D.ChecksumError, match=f"{tmp_path / 'f.bin.part'}: MD5 .* published MD5 is 0{{32}}"):
        D.fetch(http_server.url("/f.bin"), tmp_path / "f.bin", md5="0" * 32)
    assert archives.leftovers(tmp_path) == []


def test_fetch_http_error_and_unreachable_name_the_url(archives, http_server, tmp_path):
    with pytest.raises(D.DownloadError, match=f"{http_server.url('/missing.tgz')}: HTTP 404"):
        D.fetch(http_server.url("/missing.tgz"), tmp_path / "m.tgz")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(D.DownloadError, match=f"http://127.0.0.1:{port}/x.tgz: cannot download"):
        D.fetch(f"http://127.0.0.1:{port}/x.tgz", tmp_path / "x.tgz", timeout=5)
    assert archives.leftovers(tmp_path) == []


def test_unpacked_tree_that_is_not_the_official_release_is_not_created(archives, http_server, tiny_cub, tmp_path,
                                                                  monkeypatch):
    source, _ = archives.cub_source(http_server, tiny_cub)
    monkeypatch.setitem(D.SOURCES, "cub", dataclasses.replace(source, counts=D.SOURCES["cub"].counts))
    to = tmp_path / "data"
    with pytest.raises(DvmlError, match="train images: 9, expected 5,864.*was not created"):
        D.download("cub", to)
    assert archives.leftovers(to) == ["CUB_200_2011.tgz"]  # the checked download stays; no dataset directory


# --------------------------------------------------------------------------------------------- verify
def test_verify_reports_counts_missing_images_and_bad_checksums(archives, tiny_cub, tmp_path):
    report = D.verify("cub", tiny_cub)  # the real counts: a tiny CUB is not the official one
    assert not report.ok
    failed = {c.what: c.detail for c in report.failures()}
    assert failed["train images"] == "9, expected 5,864" and failed["test classes"] == "3, expected 100"
    src = dataclasses.replace(D.SOURCES["cub"], counts=archives.counts_of(read_dataset("cub", tiny_cub)))
    assert D.verify("cub", tiny_cub, source=src).ok
    victim = next((tiny_cub / "images").rglob("*.jpg"))
    victim.unlink()
    failed = {c.what: c.detail for c in D.verify("cub", tiny_cub, source=src).failures()}
    assert failed["image files"].startswith("1 of 18 listed images missing") and victim.name in failed["image files"]
    (tiny_cub.parent / "CUB_200_2011.tgz").write_bytes(b"truncated")
    failed = {c.what: c.detail for c in D.verify("cub", tiny_cub.parent, source=src).failures()}
    assert "published MD5 is 97eceeb196236b17998738112f37df78" in failed["CUB_200_2011.tgz MD5"]
    missing = D.verify("cub", tmp_path / "nowhere")
    assert not missing.ok and "not found" in missing.checks[0].detail and "dvml data download cub" in \
        missing.checks[0].detail


def test_verify_inshop_counts_query_and_gallery(archives, tiny_inshop):
    counts = D.Counts(9, 3, 12, 4, query=6, gallery=6)
    src = dataclasses.replace(D.SOURCES["inshop"], counts=counts)
    report = D.verify("inshop", tiny_inshop, source=src)
    assert report.ok, report.failures()
    wrong = dataclasses.replace(src, counts=dataclasses.replace(counts, query=7))
    assert [c.what for c in D.verify("inshop", tiny_inshop, source=wrong).failures()] == ["query images"]


# --------------------------------------------------------------------------------------------- archives
@pytest.mark.parametrize(("members", "problem"), [
    ([("file", "top/../../x", b"x")], "has a '..' component"),
    ([("file", "/tmp/dvml-abs-test", b"x")], "has an absolute path"),
    ([("dir", "top", ""), ("symlink", "top/l", "/etc")], "is a link to the absolute path '/etc'"),
    ([("dir", "top", ""), ("hardlink", "top/h", "../x")], "outside the destination"),
    ([("dir", "top", ""), ("fifo", "top/p", "")], "is a device or FIFO"),
    # a chain: each link looks harmless on its own; the second resolves outside through the first
    ([("dir", "top", ""), ("symlink", "top/s", "."), ("symlink", "top/t", "s/../..")],
     "outside the dataset folder top/"),
    ([("dir", "top", ""), ("symlink", "top/s", "."), ("symlink", "top/t", "s/..")],
     "resolves outside the dataset folder top/"),
    # inside the temporary directory but outside the folder that is kept (top/): it would dangle out of it
    ([("file", "X", b"x"), ("dir", "top", ""), ("symlink", "top/peek", "../X")],
     "is a link to '../X', outside the dataset folder top/"),
    ([("file", "X", b"x"), ("dir", "top", ""), ("hardlink", "top/h", "X")], "outside the dataset folder top/"),
    ([("dir", "top", ""), ("file", "top/a\nb.jpg", b"x")], "control character"),
    ([("dir", "top", ""), ("file", "top/\udcf4.jpg", b"x")], "not valid UTF-8"),
    # writing through a link that points inside is refused as well
    ([("dir", "top", ""), ("dir", "top/d", ""), ("symlink", "top/s", "d"), ("file", "top/s/f", b"x")],
     "would be written through a link"),
])
def test_safe_extract_refuses_escapes(archives, tmp_path, members, problem):
    archive = tmp_path / "a.tar"
    archive.write_bytes(archives.tar_with(members))
    parent = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=problem):
        safe_extract(archive, parent, "top")
    assert archives.leftovers(parent) == [] and not Path("/tmp/dvml-abs-test").exists()


def test_safe_extract_zip_and_stale_temporaries(archives, tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/a.txt", "a")
        zf.writestr("top/sub/b.txt", "b")
    parent = tmp_path / "dest"
    (parent / f"{TMP_PREFIX}top-99999").mkdir(parents=True)  # left by a killed extraction
    out = safe_extract(archive, parent, "top")
    assert (out / "sub/b.txt").read_text() == "b" and archives.leftovers(parent) == ["top"]
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract(archive, parent, "top")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("top/../../evil.txt", "x")
    with pytest.raises(ArchiveError, match="has a '..' component"):
        safe_extract(bad, tmp_path / "d2", "top")
    assert archives.leftovers(tmp_path / "d2") == [] and not (tmp_path / "evil.txt").exists()
    with pytest.raises(ArchiveError, match="has no top-level folder 'other'"):
        safe_extract(archive, tmp_path / "d3", "other")
    assert archives.leftovers(tmp_path / "d3") == []
