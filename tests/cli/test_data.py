"""``dvml data download`` / ``verify`` end to end against a local HTTP server (``http_server`` in conftest)."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from typer.testing import CliRunner

from dvml.cache import read_info
from dvml.cli import app
from dvml.extract import download as D
from dvml.extract.datasets import read_dataset

runner = CliRunner()


# --------------------------------------------------------------------------------------------- download
def test_download_cut_resume_verify_unpack_then_extract_reads_it(archives, http_server, tiny_cub, tmp_path,
                                                                  monkeypatch):
    source, data = archives.cub_source(http_server, tiny_cub, cut=4000)
    monkeypatch.setitem(D.SOURCES, "cub", source)
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--to", str(to)])
    assert result.exit_code == 0, result.output
    assert [r for _, r in http_server.log] == [None, "bytes=4000-"]  # cut, then resumed
    root = to / "CUB_200_2011"
    assert f"dvml extract cub --root {root} --out FILE.h5" in result.output
    assert archives.leftovers(to) == ["CUB_200_2011", "CUB_200_2011.tgz"]  # no .part, no temporary directory
    assert (to / "CUB_200_2011.tgz").read_bytes() == data
    assert not (root / "attributes.txt").exists() and (root / "images.txt").is_file()
    # verify: from the --out directory (finds the archive: MD5 checked) and from the dataset directory
    for where in (to, root):
        result = runner.invoke(app, ["data", "verify", "cub", str(where)])
        assert result.exit_code == 0, result.output
    report = D.verify("cub", to)
    assert report.ok and report.root == root and report.checks[0].what == "CUB_200_2011.tgz MD5"
    # a second download is a no-op (no request)
    n = len(http_server.log)
    assert D.download("cub", to) == root and len(http_server.log) == n
    # and dvml extract reads it
    out = tmp_path / "cub.h5"
    result = runner.invoke(app, ["extract", "cub", "--root", str(root), "--out", str(out), "--weights", "none",
                                 "--resize", "40", "--crop", "32", "--workers", "0", "--views", "2"])
    assert result.exit_code == 0, result.output
    info = read_info(out)
    assert info.dataset == "cub" and info.schema_version == 1
    assert (info.splits["train"].n, info.splits["test"].n) == (9, 9)


def test_download_wrong_checksum_is_refused_and_leaves_nothing(archives, http_server, tiny_cub, tmp_path,
                                                                  monkeypatch):
    source, _ = archives.cub_source(http_server, tiny_cub)
    source = dataclasses.replace(source, files=(dataclasses.replace(source.files[0], md5="f" * 32),))
    monkeypatch.setitem(D.SOURCES, "cub", source)
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--out", str(to)])
    assert result.exit_code == 1
    assert "published MD5 is ffff" in result.output and "partial file was removed" in result.output
    assert "Traceback" not in result.output
    assert archives.leftovers(to) == []


@pytest.mark.parametrize(("members", "problem"), [
    ([("dir", "CUB_200_2011", ""), ("file", "CUB_200_2011/../evil.txt", b"x")], "has a '..' component"),
    ([("dir", "CUB_200_2011", ""), ("symlink", "CUB_200_2011/escape", "../../outside")],
     "is a link to '../../outside', outside the destination"),
])
def test_download_refuses_an_unsafe_archive_and_leaves_nothing(archives, http_server, tmp_path, monkeypatch,
                                                                members, problem):
    data = archives.tar_with(members)
    http_server.files["/CUB_200_2011.tgz"] = data
    real = D.SOURCES["cub"]
    monkeypatch.setitem(D.SOURCES, "cub", dataclasses.replace(real, files=(dataclasses.replace(
        real.files[0], md5=archives.md5(data), urls=(http_server.url("/CUB_200_2011.tgz"),)),)))
    to = tmp_path / "data"
    result = runner.invoke(app, ["data", "download", "cub", "--out", str(to)])
    assert result.exit_code == 1 and problem in result.output and "refusing to extract" in result.output
    assert "was not created" in result.output
    assert archives.leftovers(to) == [] and not (tmp_path / "outside").exists() and not (tmp_path / "evil.txt").exists()


def test_download_offline_gives_the_url_and_manual_steps(archives, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    real = D.SOURCES["sop"]
    monkeypatch.setitem(D.SOURCES, "sop", dataclasses.replace(real, files=(dataclasses.replace(
        real.files[0], urls=(f"http://127.0.0.1:{port}/Stanford_Online_Products.zip",)),)))
    result = runner.invoke(app, ["data", "download", "sop", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"http://127.0.0.1:{port}/Stanford_Online_Products.zip: cannot download" in text
    assert "Manual steps: get Stanford_Online_Products.zip (MD5 7f73d41a2f44250d4779881525aea32e)" in text
    assert f"put it in {tmp_path / 'd'}" in text


def test_cars196_has_no_download_but_checks_and_unpacks_the_files_you_bring(archives, tiny_cars196, tmp_path,
                                                                            monkeypatch):
    to = tmp_path / "bring"
    result = runner.invoke(app, ["data", "download", "cars196", "--out", str(to)])
    assert result.exit_code == 1 and "no official download" in result.output
    assert "d5c8f0aa497503f355e17dc7886c3f14" in result.output and "cars_annos.mat" in result.output
    to.mkdir()
    (to / "car_ims.tgz").write_bytes(archives.tgz_of(tiny_cars196 / "car_ims", "car_ims"))
    (to / "cars_annos.mat").write_bytes((tiny_cars196 / "cars_annos.mat").read_bytes())
    # the real MD5s: these generated files are not the originals
    result = runner.invoke(app, ["data", "download", "cars196", "--out", str(to)])
    assert result.exit_code == 1 and "car_ims.tgz: MD5" in " ".join(result.output.split())
    assert not (to / "cars196").exists()
    real = D.SOURCES["cars196"]
    files = tuple(dataclasses.replace(f, md5=archives.md5((to / f.name).read_bytes())) for f in real.files)
    monkeypatch.setitem(D.SOURCES, "cars196", dataclasses.replace(
        real, files=files, counts=archives.counts_of(read_dataset("cars196", tiny_cars196))))
    result = runner.invoke(app, ["data", "download", "cars196", "--out", str(to)])
    assert result.exit_code == 0, result.output
    index = read_dataset("cars196", to / "cars196")
    assert [tuple(s) for s in index.test] == [tuple(s) for s in read_dataset("cars196", tiny_cars196).test]
    assert D.verify("cars196", to / "cars196").ok


def test_verify_failures_are_a_table_and_one_line_error(tiny_cub, tmp_path):
    result = runner.invoke(app, ["data", "verify", "cub", str(tiny_cub)])  # a tiny CUB is not the official one
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "FAIL" in text and "9, expected 5,864" in text and "cub does not verify" in text
    result = runner.invoke(app, ["data", "verify", "cub", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "verify", "folder", str(tmp_path)])
    assert result.exit_code == 2  # not a published dataset: typer rejects the choice


def test_inshop_from_the_release_folders_you_bring(tiny_inshop, tmp_path, monkeypatch, archives):
    import zipfile

    to = tmp_path / "drive"  # the layout of the DeepFashion Drive folder: Img/img.zip, Eval/list_eval_partition.txt
    result = runner.invoke(app, ["data", "download", "inshop", "--out", str(to)])
    assert result.exit_code == 1 and "no official download" in result.output and "img.zip" in result.output
    (to / "Img").mkdir(parents=True)
    with zipfile.ZipFile(to / "Img/img.zip", "w") as zf:
        for p in sorted((tiny_inshop / "img").rglob("*.jpg")):
            zf.write(p, p.relative_to(tiny_inshop).as_posix())
    (to / "Eval").mkdir()
    (to / "Eval/list_eval_partition.txt").write_bytes((tiny_inshop / "Eval/list_eval_partition.txt").read_bytes())
    monkeypatch.setitem(D.SOURCES, "inshop", dataclasses.replace(
        D.SOURCES["inshop"], counts=D.Counts(9, 3, 12, 4, query=6, gallery=6)))
    result = runner.invoke(app, ["data", "download", "inshop", "--out", str(to)])
    assert result.exit_code == 0, result.output
    assert archives.leftovers(to) == ["Eval", "Img", "InShop"]
    index, ref = read_dataset("inshop", to / "InShop"), read_dataset("inshop", tiny_inshop)
    assert index.test == ref.test and index.test_roles == ref.test_roles and index.train == ref.train
    result = runner.invoke(app, ["data", "verify", "inshop", str(to)])
    assert result.exit_code == 0, result.output
    assert "6" in result.output and "query images" in result.output


def test_extract_on_a_directory_without_the_dataset_names_the_download_command(tmp_path):
    result = runner.invoke(app, ["extract", "cub", "--root", str(tmp_path), "--out", str(tmp_path / "c.h5"),
                                 "--weights", "none"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"{tmp_path / 'images.txt'}: not found" in text and "dvml data download cub --out DIR" in text
    assert not (tmp_path / "c.h5").exists()


def test_verify_says_not_checked_where_there_was_nothing_to_check(tiny_cub):
    """A dataset directory without its archive: the MD5 row says "not checked", not "ok"."""
    result = runner.invoke(app, ["data", "verify", "cub", str(tiny_cub)], env={"COLUMNS": "200"})
    row = next(line for line in result.output.splitlines() if "CUB_200_2011.tgz MD5" in line)
    assert "not checked" in row and " ok " not in row, row
    assert D.verify("cub", tiny_cub).checks[0].checked is False
