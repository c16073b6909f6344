"""Archives, downloads and list files as hostile input: damaged archives of every compression, decompression
bombs, links out of the kept folder, hostile names, servers that stall, loop or never say the length, list files
that are binary or point out of the dataset. Each is one line without a traceback, exit code 1, and nothing
outside the given paths is created or removed."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.extract import download as D
from dvml.extract.archive import ArchiveError, ArchiveLimitError, Limits, safe_extract

from ..faults.test_io_faults import assert_one_line_error

runner = CliRunner()


def tree(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else f"file:{hash(p.read_bytes())}"
    return out


def _img_zip(tiny_inshop: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((tiny_inshop / "img").rglob("*.jpg")):
            zf.write(p, p.relative_to(tiny_inshop).as_posix())
    return buf.getvalue()


def _img_tar(tiny_inshop: Path, mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        tf.add(tiny_inshop / "img", arcname="img")
    return buf.getvalue()


def _inshop_to(tmp_path: Path, tiny_inshop: Path, img_zip: bytes, monkeypatch) -> Path:
    to = tmp_path / "to"
    (to / "Eval").mkdir(parents=True)
    (to / "img.zip").write_bytes(img_zip)
    (to / "Eval/list_eval_partition.txt").write_bytes((tiny_inshop / "Eval/list_eval_partition.txt").read_bytes())
    monkeypatch.setitem(D.SOURCES, "inshop", dataclasses.replace(
        D.SOURCES["inshop"], counts=D.Counts(9, 3, 12, 4, query=6, gallery=6)))
    return to


# --------------------------------------------------------------------------------------------- 5. archives
@pytest.mark.parametrize("kind", ["zip", "tar", "w:gz", "w:bz2", "w:xz"])
def test_a_truncated_archive_is_one_line_naming_it(tiny_inshop, tmp_path, monkeypatch, kind):
    """In-Shop's img.zip has no MD5 and is typed by content: a cut-short tar, .tgz or zip reaches the unpacker."""
    data = _img_zip(tiny_inshop) if kind == "zip" else _img_tar(tiny_inshop, "w" if kind == "tar" else kind)
    to = _inshop_to(tmp_path, tiny_inshop, data[: int(len(data) * 0.6)], monkeypatch)
    before = tree(tmp_path)
    r = runner.invoke(app, ["data", "download", "inshop", "--to", str(to)])
    line = assert_one_line_error(r, r.output, f"{to / 'img.zip'}")
    assert "Aborted" not in r.output and ("truncated" in line or "damaged" in line or "neither" in line), line
    assert tree(tmp_path) == before  # the user's own file is kept, nothing else appears


def test_a_decompression_bomb_is_refused_before_anything_is_written(tiny_inshop, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("img/MEN/bomb.jpg", bytes(200 * 2**20))  # 200 MiB of zeros in ~200 KB
    assert len(buf.getvalue()) < 300_000
    to = _inshop_to(tmp_path, tiny_inshop, buf.getvalue(), monkeypatch)
    before = tree(tmp_path)
    r = runner.invoke(app, ["data", "download", "inshop", "--to", str(to)])
    assert_one_line_error(r, r.output, f"{to / 'img.zip'}: its members unpack to 209,715,200 bytes",
                          "a decompression bomb?")
    assert tree(tmp_path) == before
    r = runner.invoke(app, ["data", "download", "inshop", "--to", str(to), "--max-unpacked-gb", "0.1"])
    assert_one_line_error(r, r.output, "more than the limit of 100,000,000")
    assert tree(tmp_path) == before


def test_the_limits_can_be_raised(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("top/a.txt", bytes(70 * 2**20))
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ArchiveLimitError, match="times its"):
        safe_extract(archive, tmp_path / "d", "top")
    with pytest.raises(ArchiveLimitError, match="more than the limit of 1,000"):
        safe_extract(archive, tmp_path / "d", "top", limits=Limits(max_bytes=1000))
    out = safe_extract(archive, tmp_path / "d", "top", limits=Limits(max_ratio=1e6))
    assert (out / "a.txt").stat().st_size == 70 * 2**20


def test_a_zip_name_that_is_not_utf8_is_refused(tmp_path):
    info = zipfile.ZipInfo("top/ab.jpg")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, b"x")
    raw = buf.getvalue().replace(b"top/ab.jpg", b"top/\xf4\x9f.jpg")  # no UTF-8 flag, bytes that are not UTF-8
    archive = tmp_path / "a.zip"
    archive.write_bytes(raw)
    with pytest.raises(ArchiveError, match="not valid UTF-8"):
        safe_extract(archive, tmp_path / "d", "top")
    assert not (tmp_path / "d" / "top").exists()


# --------------------------------------------------------------------------------------------- downloads
class _Server:
    """``behaviour(handler)`` answers every GET."""

    def __init__(self, behaviour):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                behaviour(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str = "/f.tgz") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(behaviour) -> _Server:
        servers.append(_Server(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_download_without_length_is_capped_at_the_published_size(serve, tmp_path):
    sent = []

    def endless(h):
        h.send_response(200)
        h.end_headers()  # no Content-Length: the body ends when the connection closes
        try:
            for _ in range(2000):
                h.wfile.write(bytes(64 * 1024))
                sent.append(1)
        except OSError:
            pass

    s = serve(endless)
    with pytest.raises(D.DownloadError, match=r"sent more than 1,000,000 bytes.*partial download was removed") as e:
        D.fetch(s.url(), tmp_path / "f.tgz", md5="0" * 32, max_bytes=1_000_000, timeout=10)
    assert "\n" not in str(e.value)
    assert len(sent) < 2000  # stopped long before the 128 MiB the server would send
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stalled_server_leaves_its_bytes_in_part(serve, tmp_path):
    def stall(h):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.write(b"x" * 300)
        h.wfile.flush()
        time.sleep(3)

    s = serve(stall)
    with pytest.raises(D.DownloadError) as e:
        D.fetch(s.url(), tmp_path / "f.tgz", timeout=0.5, retries=0)
    assert "keeps the 300 bytes received" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "f.tgz.part").read_bytes() == b"x" * 300


def test_a_restart_that_receives_nothing_keeps_the_old_part(serve, tmp_path):
    def no_range_then_stall(h):  # ignores Range: answers 200 (a restart), then sends nothing
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.flush()
        time.sleep(3)

    (tmp_path / "f.tgz.part").write_bytes(b"y" * 500)
    s = serve(no_range_then_stall)
    with pytest.raises(D.DownloadError, match="keeps the 500 bytes received"):
        D.fetch(s.url(), tmp_path / "f.tgz", timeout=0.5, retries=0)
    assert (tmp_path / "f.tgz.part").read_bytes() == b"y" * 500


def test_a_redirect_loop_is_one_line(serve, tmp_path):
    def loop(h):
        h.send_response(302)
        h.send_header("Location", h.path)
        h.end_headers()

    s = serve(loop)
    with pytest.raises(D.DownloadError) as e:
        D.fetch(s.url(), tmp_path / "f.tgz", retries=0)
    assert "redirect" in str(e.value) and "\n" not in str(e.value)
    source = dataclasses.replace(D.SOURCES["cub"], files=(dataclasses.replace(D.SOURCES["cub"].files[0],
                                                                              urls=(s.url(),)),))
    with pytest.raises(D.DownloadError) as e:
        D.download("cub", tmp_path / "to", source=source)
    assert "\n" not in str(e.value)


def test_to_a_regular_file_is_one_line(tmp_path):
    f = tmp_path / "tofile"
    f.write_text("mine")
    before = tree(tmp_path)
    r = runner.invoke(app, ["data", "download", "cub", "--to", str(f)])
    assert_one_line_error(r, r.output, f"{f}: exists and is not a folder")
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------------- list files
def test_inshop_list_paths_must_stay_inside_the_root(tiny_inshop, tmp_path):
    lst = tiny_inshop / "Eval/list_eval_partition.txt"
    lines = lst.read_text().splitlines()
    lines[2] = "../../../../etc/hostname  id_00000001  train"
    lst.write_text("\n".join(lines) + "\n")
    before = tree(tmp_path)
    r = runner.invoke(app, ["data", "verify", "inshop", str(tiny_inshop)])
    assert_one_line_error(r, r.output, f"{lst}:3: image path '../../../../etc/hostname' leaves the dataset folder")
    assert tree(tmp_path) == before


def test_a_binary_images_txt_is_one_line_naming_it(tiny_cub, tmp_path):
    (tiny_cub / "images.txt").write_bytes(b"1 images/a.jpg\n\xf4\x00\x9f binary\n")
    r = runner.invoke(app, ["data", "verify", "cub", str(tiny_cub)])
    assert_one_line_error(r, r.output, f"{tiny_cub / 'images.txt'}: not a UTF-8 text file (byte 0xf4")


# --------------------------------------------------------------------------------------------- cache attributes
@pytest.mark.parametrize("attr,value,needle", [
    ("schema_version", "one", "root attribute 'schema_version' must be an integer, got 'one'"),
    ("feature_dim", 1.5, "root attribute 'feature_dim' must be an integer, got 1.5"),
    ("complete", "yes", "root attribute 'complete' must be true or false"),
    ("dataset", 7, "root attribute 'dataset' must be a string"),
])
def test_a_cache_attribute_of_the_wrong_type_is_one_line(tiny_cache, tmp_path, attr, value, needle):
    import shutil

    cache = tmp_path / "c.h5"
    shutil.copyfile(tiny_cache, cache)
    with h5py.File(cache, "r+") as f:
        f.attrs[attr] = value
    r = runner.invoke(app, ["cache", "info", str(cache)])
    assert_one_line_error(r, r.output, f"{cache}", needle)
