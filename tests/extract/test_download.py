"""``dvml.extract.download`` / ``archive`` / ``dvml data``: against a local HTTP server (stdlib, in a thread).

The server serves byte strings by path, honours ``Range: bytes=N-`` (206 + Content-Range) unless told not
to, can cut the connection mid-file (full Content-Length announced, half the body sent, socket closed),
and records every request's path and Range header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import read_info
from dvml.cli import app
from dvml.errors import DvmlError
from dvml.extract import download as D
from dvml.extract.archive import TMP_PREFIX, ArchiveError, safe_extract
from dvml.extract.datasets import read_dataset

runner = CliRunner()


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, list[int]] = {}  # path -> byte counts after which to cut, one per request
        self.ranges = True
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and server.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cuts.get(self.path)
                if cuts:
                    self.wfile.write(body[:cuts.pop(0)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tgz_of(root: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A .tgz holding ``root`` as ``arcname/`` (plus loose top-level files, like CUB's attributes.txt)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_with(members: list[tuple[str, str, str | bytes]]) -> bytes:
    """A .tar of ("file"|"dir"|"symlink"|"hardlink"|"fifo", name, data-or-link-target) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tf.addfile(info)
    return buf.getvalue()


def counts_of(index) -> D.Counts:
    return D.Counts(len(index.train), len({s.label for s in index.train}), len(index.test),
                    len({s.label for s in index.test}))


def cub_source(server, tiny_cub, cut: int | None = None):
    """The real CUB source with the server's URL, the generated archive's MD5 and the tiny counts."""
    data = tgz_of(tiny_cub, "CUB_200_2011", extra={"attributes.txt": b"1 has_bill_shape::curved\n"})
    server.files["/CUB_200_2011.tgz"] = data
    if cut is not None:
        server.cuts["/CUB_200_2011.tgz"] = [cut]
    real = D.SOURCES["cub"]
    source = dataclasses.replace(real, files=(dataclasses.replace(real.files[0], md5=md5(data),
                                                                  urls=(server.url("/CUB_200_2011.tgz"),)),),
                                 counts=counts_of(read_dataset("cub", tiny_cub)))
    return source, data


def leftovers(to: Path) -> list[str]:
    return sorted(p.name for p in to.iterdir()) if to.exists() else []


# --------------------------------------------------------------------------------------------- fetch
def test_fetch_resumes_after_a_cut_connection(server, tmp_path):
    data = np.random.default_rng(0).bytes(300_000)
    server.files["/f.bin"] = data
    server.cuts["/f.bin"] = [100_000, 50_000]  # two cuts: resumes twice
    seen = []
    out = D.fetch(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(data),
                  progress=lambda stage, name, done, total: seen.append((stage, done, total)))
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert server.log == [("/f.bin", None), ("/f.bin", "bytes=100000-"), ("/f.bin", "bytes=150000-")]
    downloads = [s for s in seen if s[0] == "download"]
    assert downloads[-1] == ("download", 300_000, 300_000)
    assert all(total == 300_000 for _, _, total in downloads)  # from Content-Length, then Content-Range
    assert ("md5", 300_000, 300_000) in seen


def test_fetch_continues_a_part_file_left_by_a_killed_run(server, tmp_path):
    data = np.random.default_rng(1).bytes(50_000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:12_345])
    D.fetch(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(data))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.log == [("/f.bin", "bytes=12345-")]


def test_fetch_restarts_when_the_server_ignores_range(server, tmp_path):
    data = np.random.default_rng(2).bytes(20_000)
    server.files["/f.bin"] = data
    server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    D.fetch(server.url("/f.bin"), tmp_path / "f.bin", md5=md5(data))
    assert (tmp_path / "f.bin").read_bytes() == data


def test_fetch_wrong_checksum_leaves_nothing(server, tmp_path):
    server.files["/f.bin"] = b"not the published file" * 100
    with pytest.raises(D.ChecksumError, match=f"{tmp_path / 'f.bin.part'}: MD5 .* published MD5 is 0{{32}}"):
        D.fetch(server.url("/f.bin"), tmp_path / "f.bin", md5="0" * 32)
    assert leftovers(tmp_path) == []


def test_fetch_http_error_and_unreachable_name_the_url(server, tmp_path):
    with pytest.raises(D.DownloadError, match=f"{server.url('/missing.tgz')}: HTTP 404"):
        D.fetch(server.url("/missing.tgz"), tmp_path / "m.tgz")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(D.DownloadError, match=f"http://127.0.0.1:{port}/x.tgz: cannot download"):
        D.fetch(f"http://127.0.0.1:{port}/x.tgz", tmp_path / "x.tgz", timeout=5)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- download
def test_download_cut_resume_verify_unpack_then_extract_reads_it(server, tiny_cub, tmp_path, monkeypatch):
    source, data = cub_source(server, tiny_cub, cut=4000)
    monkeypatch.setitem(D.SOURCES, "cub", source)
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--to", str(to)])
    assert result.exit_code == 0, result.output
    assert [r for _, r in server.log] == [None, "bytes=4000-"]  # cut, then resumed
    root = to / "CUB_200_2011"
    assert f"dvml extract cub --root {root} --out FILE.h5" in result.output
    assert leftovers(to) == ["CUB_200_2011", "CUB_200_2011.tgz"]  # no .part, no temporary directory
    assert (to / "CUB_200_2011.tgz").read_bytes() == data
    assert not (root / "attributes.txt").exists() and (root / "images.txt").is_file()
    # verify: from the --to directory (finds the archive: MD5 checked) and from the dataset directory
    for where in (to, root):
        result = runner.invoke(app, ["data", "verify", "cub", str(where)])
        assert result.exit_code == 0, result.output
    report = D.verify("cub", to)
    assert report.ok and report.root == root and report.checks[0].what == "CUB_200_2011.tgz MD5"
    # a second download is a no-op (no request)
    n = len(server.log)
    assert D.download("cub", to) == root and len(server.log) == n
    # and dvml extract reads it
    out = tmp_path / "cub.h5"
    result = runner.invoke(app, ["extract", "cub", "--root", str(root), "--out", str(out), "--weights", "none",
                                 "--resize", "40", "--crop", "32", "--workers", "0", "--views", "2"])
    assert result.exit_code == 0, result.output
    info = read_info(out)
    assert info.dataset == "cub" and info.schema_version == 1
    assert (info.splits["train"].n, info.splits["test"].n) == (9, 9)


def test_download_wrong_checksum_is_refused_and_leaves_nothing(server, tiny_cub, tmp_path, monkeypatch):
    source, _ = cub_source(server, tiny_cub)
    source = dataclasses.replace(source, files=(dataclasses.replace(source.files[0], md5="f" * 32),))
    monkeypatch.setitem(D.SOURCES, "cub", source)
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--to", str(to)])
    assert result.exit_code == 1
    assert "published MD5 is ffff" in result.output and "partial file was removed" in result.output
    assert "Traceback" not in result.output
    assert leftovers(to) == []


@pytest.mark.parametrize(("members", "problem"), [
    ([("dir", "CUB_200_2011", ""), ("file", "CUB_200_2011/../evil.txt", b"x")], "has a '..' component"),
    ([("dir", "CUB_200_2011", ""), ("symlink", "CUB_200_2011/escape", "../../outside")],
     "is a link to '../../outside', outside the destination"),
])
def test_download_refuses_an_unsafe_archive_and_leaves_nothing(server, tmp_path, monkeypatch, members, problem):
    data = tar_with(members)
    server.files["/CUB_200_2011.tgz"] = data
    real = D.SOURCES["cub"]
    monkeypatch.setitem(D.SOURCES, "cub", dataclasses.replace(real, files=(dataclasses.replace(
        real.files[0], md5=md5(data), urls=(server.url("/CUB_200_2011.tgz"),)),)))
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--to", str(to)])
    assert result.exit_code == 1 and problem in result.output and "refusing to extract" in result.output
    assert "was not created" in result.output
    assert leftovers(to) == [] and not (tmp_path / "outside").exists() and not (tmp_path / "evil.txt").exists()


def test_download_offline_gives_the_url_and_manual_steps(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    real = D.SOURCES["sop"]
    monkeypatch.setitem(D.SOURCES, "sop", dataclasses.replace(real, files=(dataclasses.replace(
        real.files[0], urls=(f"http://127.0.0.1:{port}/Stanford_Online_Products.zip",)),)))
    result = runner.invoke(app, ["data", "download", "sop", "--to", str(tmp_path / "d")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"http://127.0.0.1:{port}/Stanford_Online_Products.zip: cannot download" in text
    assert "Manual steps: get Stanford_Online_Products.zip (MD5 7f73d41a2f44250d4779881525aea32e)" in text
    assert f"put it in {tmp_path / 'd'}" in text


def test_cars196_has_no_download_but_checks_and_unpacks_the_files_you_bring(tiny_cars196, tmp_path, monkeypatch):
    to = tmp_path / "bring"
    result = runner.invoke(app, ["data", "download", "cars196", "--to", str(to)])
    assert result.exit_code == 1 and "no official download" in result.output
    assert "d5c8f0aa497503f355e17dc7886c3f14" in result.output and "cars_annos.mat" in result.output
    to.mkdir()
    (to / "car_ims.tgz").write_bytes(tgz_of(tiny_cars196 / "car_ims", "car_ims"))
    (to / "cars_annos.mat").write_bytes((tiny_cars196 / "cars_annos.mat").read_bytes())
    # the real MD5s: these generated files are not the originals
    result = runner.invoke(app, ["data", "download", "cars196", "--to", str(to)])
    assert result.exit_code == 1 and "car_ims.tgz: MD5" in " ".join(result.output.split())
    assert not (to / "cars196").exists()
    real = D.SOURCES["cars196"]
    files = tuple(dataclasses.replace(f, md5=md5((to / f.name).read_bytes())) for f in real.files)
    monkeypatch.setitem(D.SOURCES, "cars196", dataclasses.replace(
        real, files=files, counts=counts_of(read_dataset("cars196", tiny_cars196))))
    result = runner.invoke(app, ["data", "download", "cars196", "--to", str(to)])
    assert result.exit_code == 0, result.output
    index = read_dataset("cars196", to / "cars196")
    assert [tuple(s) for s in index.test] == [tuple(s) for s in read_dataset("cars196", tiny_cars196).test]
    assert D.verify("cars196", to / "cars196").ok


def test_unpacked_tree_that_is_not_the_official_release_is_not_created(server, tiny_cub, tmp_path, monkeypatch):
    source, _ = cub_source(server, tiny_cub)
    monkeypatch.setitem(D.SOURCES, "cub", dataclasses.replace(source, counts=D.SOURCES["cub"].counts))
    to = tmp_path / "data"
    with pytest.raises(DvmlError, match="train images: 9, expected 5,864.*was not created"):
        D.download("cub", to)
    assert leftovers(to) == ["CUB_200_2011.tgz"]  # the checked download stays; no dataset directory


# --------------------------------------------------------------------------------------------- verify
def test_verify_reports_counts_missing_images_and_bad_checksums(tiny_cub, tmp_path):
    report = D.verify("cub", tiny_cub)  # the real counts: a tiny CUB is not the official one
    assert not report.ok
    failed = {c.what: c.detail for c in report.failures()}
    assert failed["train images"] == "9, expected 5,864" and failed["test classes"] == "3, expected 100"
    src = dataclasses.replace(D.SOURCES["cub"], counts=counts_of(read_dataset("cub", tiny_cub)))
    assert D.verify("cub", tiny_cub, source=src).ok
    victim = next((tiny_cub / "images").rglob("*.jpg"))
    victim.unlink()
    failed = {c.what: c.detail for c in D.verify("cub", tiny_cub, source=src).failures()}
    assert failed["image files"].startswith("1 of 18 listed images missing") and victim.name in failed["image files"]
    (tiny_cub.parent / "CUB_200_2011.tgz").write_bytes(b"truncated")
    failed = {c.what: c.detail for c in D.verify("cub", tiny_cub.parent, source=src).failures()}
    assert "published MD5 is 97eceeb196236b17998738112f37df78" in failed["CUB_200_2011.tgz MD5"]
    result = runner.invoke(app, ["data", "verify", "cub", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output


def test_verify_inshop_counts_query_and_gallery(tiny_inshop):
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
     "resolves outside the destination"),
    # writing through a link that points inside is refused as well
    ([("dir", "top", ""), ("dir", "top/d", ""), ("symlink", "top/s", "d"), ("file", "top/s/f", b"x")],
     "would be written through a link"),
])
def test_safe_extract_refuses_escapes(tmp_path, members, problem):
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_with(members))
    parent = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=problem):
        safe_extract(archive, parent, "top")
    assert leftovers(parent) == [] and not Path("/tmp/dvml-abs-test").exists()


def test_safe_extract_zip_and_stale_temporaries(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/a.txt", "a")
        zf.writestr("top/sub/b.txt", "b")
    parent = tmp_path / "dest"
    (parent / f"{TMP_PREFIX}top-99999").mkdir(parents=True)  # left by a killed extraction
    out = safe_extract(archive, parent, "top")
    assert (out / "sub/b.txt").read_text() == "b" and leftovers(parent) == ["top"]
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract(archive, parent, "top")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("top/../../evil.txt", "x")
    with pytest.raises(ArchiveError, match="has a '..' component"):
        safe_extract(bad, tmp_path / "d2", "top")
    assert leftovers(tmp_path / "d2") == [] and not (tmp_path / "evil.txt").exists()
    with pytest.raises(ArchiveError, match="has no top-level folder 'other'"):
        safe_extract(archive, tmp_path / "d3", "other")
    assert leftovers(tmp_path / "d3") == []
