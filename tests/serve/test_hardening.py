"""The serving paths as an attacker or a careless user meets them: a page's thumbnail folder that is not dvml's, a
stale index, two writers of one index, dangling symlinks as outputs, hostile sidecar fields and class names. Each
refusal is one line without a traceback, exit code 1, and no file outside the given paths is created or removed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cli import app
from dvml.serve.index import load_index, sidecar_path

from ..faults.test_io_faults import assert_one_line_error, dvml_cmd, leftovers
from .conftest import _extract, _fit, make_folder

runner = CliRunner()


def tree(d: Path) -> dict[str, str]:
    """Every entry under ``d`` (links not followed) -> its kind and content digest: what a command may not touch."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = "file:" + str(hash(p.read_bytes()))
    return out


def _invoke(args: list[str]):
    r = runner.invoke(app, [str(a) for a in args])
    return r, r.output


# --------------------------------------------------------------------------------------- 1. show's folder
def test_show_never_deletes_a_folder_it_does_not_own(pipeline, tmp_path):
    page = tmp_path / "page.html"
    (tmp_path / "page_files").mkdir()
    (tmp_path / "page_files" / "important.txt").write_text("precious")
    before = tree(tmp_path)
    r, out = _invoke(["show", pipeline["run"], "-o", page, "--queries", "2", "-k", "2"])
    assert_one_line_error(r, out, f"{tmp_path / 'page_files'}: exists and was not written by dvml show",
                          "--overwrite")
    assert tree(tmp_path) == before
    # --overwrite writes the thumbnails into it and removes nothing of it
    r, out = _invoke(["show", pipeline["run"], "-o", page, "--queries", "2", "-k", "2", "--overwrite"])
    assert r.exit_code == 0, out
    assert (tmp_path / "page_files" / "important.txt").read_text() == "precious"
    assert (tmp_path / "page_files" / ".dvml-show").is_file()
    assert leftovers(tmp_path) == []


def test_show_replaces_its_own_thumbnails_only(pipeline, tmp_path):
    page = tmp_path / "page.html"
    args = ["show", pipeline["run"], "-o", page, "-k", "2", "--overwrite"]
    r, out = _invoke([*args, "--queries", "6"])
    assert r.exit_code == 0, out
    folder = tmp_path / "page_files"
    many = {p.name for p in folder.glob("row*.jpg")}
    (folder / "notes.txt").write_text("mine")
    r, out = _invoke([*args, "--queries", "1"])  # its own folder (the marker): no --overwrite needed for it
    assert r.exit_code == 0, out
    few = {p.name for p in folder.glob("row*.jpg")}
    assert len(few) < len(many) and (folder / "notes.txt").read_text() == "mine"
    import re

    assert few == set(re.findall(r"page_files/(row\d+\.jpg)", page.read_text()))  # the stale ones are gone


def test_show_refuses_a_symlinked_thumbnail_folder(pipeline, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / "q_files").symlink_to(elsewhere)
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        r, out = _invoke(["show", pipeline["run"], "-o", tmp_path / "q.html", "--queries", "2", *extra])
        assert_one_line_error(r, out, f"{tmp_path / 'q_files'}: is a symbolic link")
        assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------- 2. stale index
def test_search_refuses_an_index_whose_run_was_refit(pipeline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline["run"], run)
    index = tmp_path / "idx.faiss"
    r, out = _invoke(["index", run, "-o", index])
    assert r.exit_code == 0, out
    query = next(pipeline["root"].rglob("*.jpg"))
    r, out = _invoke(["search", index, query, "-k", "2"])
    assert r.exit_code == 0, out
    other = _fit(pipeline["cache"], tmp_path / "refit")  # "fit-heads ... --overwrite" into the same directory
    shutil.copyfile(other / "heads.pt", run / "heads.pt")
    before = tree(tmp_path)
    r, out = _invoke(["search", index, query, "-k", "2"])
    line = assert_one_line_error(r, out, f"{index}: its embedder {run.resolve()} changed since the index was built",
                                 "checkpoint_sha256", "rebuild the index")
    assert "Traceback" not in line
    assert tree(tmp_path) == before
    r, out = _invoke(["search", index, query, "-k", "2", "--model", run])  # the explicit override still works
    assert r.exit_code == 0, out


def test_search_refuses_an_index_whose_cache_changed(pipeline, tmp_path):
    cache = tmp_path / "c.h5"
    shutil.copyfile(pipeline["cache"], cache)
    index = tmp_path / "idx.faiss"
    r, out = _invoke(["index", cache, "-o", index])
    assert r.exit_code == 0, out
    _extract(pipeline["root"], tmp_path / "c2.h5", "float32")
    shutil.copyfile(tmp_path / "c2.h5", cache)  # same path, other features
    query = next(pipeline["root"].rglob("*.jpg"))
    r, out = _invoke(["search", index, query])
    assert_one_line_error(r, out, f"{index}: its embedder {cache.resolve()} changed", "cache_fingerprint")


# --------------------------------------------------------------------------------------- 3. two writers
def test_a_second_index_writer_is_refused_while_the_first_holds_the_lock(pipeline, tmp_path):
    out = tmp_path / "idx.faiss"
    holder = subprocess.Popen(["python", "-c", "import sys, time; from dvml.files import writer_lock\n"
                               f"with writer_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        proc = subprocess.run(dvml_cmd("index", pipeline["run"], "-o", out, "--overwrite"), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
        assert f"is being written by another process (pid {holder.pid})" in " ".join(proc.stderr.split())
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_index_writers_never_leave_a_mismatched_pair(pipeline, tmp_path):
    """Two ``dvml index`` without --overwrite started together on a new output: exactly one writes it, the other
    is refused in one line (busy, or already exists), and the pair on disk is the winner's, whole."""
    for attempt in range(2):
        out = tmp_path / f"idx{attempt}.faiss"
        sources = {"cache": pipeline["cache"], "heads": pipeline["run"]}  # 1024-D raw features vs 16-D z_I
        procs = {kind: subprocess.Popen(dvml_cmd("index", src, "-o", out), stderr=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, text=True) for kind, src in sources.items()}
        errs = {kind: p.communicate(timeout=300)[1] for kind, p in procs.items()}
        codes = {kind: p.returncode for kind, p in procs.items()}
        assert sorted(codes.values()) == [0, 1], (codes, errs)
        loser = next(k for k, c in codes.items() if c == 1)
        winner = next(k for k, c in codes.items() if c == 0)
        assert "Traceback" not in errs[loser] and errs[loser].count("error:") == 1, errs[loser]
        assert "already exists" in errs[loser] or "is being written by another process" in errs[loser]
        g = load_index(out)  # the two files belong together, and are the winner's
        assert g.meta["source"]["kind"] == winner and g.dim == (16 if winner == "heads" else 1024)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------- 4. dangling symlinks
@pytest.mark.parametrize("command", ["export", "index", "show"])
def test_a_dangling_symlink_output_is_refused_and_creates_nothing_outside(pipeline, tmp_path, command):
    suffix = {"export": ".pt2", "index": ".faiss", "show": ".html"}[command]
    link = tmp_path / f"d{suffix}"
    gone = tmp_path / "nonexistent" / "dir"
    link.symlink_to(gone)
    args = [command, pipeline["run"], "-o", link]
    if command == "show":
        args += ["--queries", "2", "-k", "2"]
    before = tree(tmp_path)
    r, out = _invoke(args)
    assert_one_line_error(r, out, f"{link}: is a symbolic link to {gone}, which does not exist")
    assert tree(tmp_path) == before
    r, out = _invoke([*args, "--overwrite"])  # writing through it: its folder is not there, and is not created
    assert_one_line_error(r, out, f"{link}", f"is a symbolic link to {gone}, whose folder {gone.parent} does not "
                                             "exist")
    assert tree(tmp_path) == before and not (tmp_path / "nonexistent").exists()


def test_a_dangling_symlinked_folder_on_the_output_path_creates_nothing(pipeline, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nonexistent" / "dir")
    before = tree(tmp_path)
    r, out = _invoke(["export", pipeline["run"], "-o", tmp_path / "out" / "m.pt2", "--overwrite"])
    assert_one_line_error(r, out, f"cannot write {tmp_path / 'out' / 'm.pt2'}")
    assert tree(tmp_path) == before and not (tmp_path / "nonexistent").exists()


# --------------------------------------------------------------------------------------- 6. hostile fields
@pytest.mark.parametrize("field,value,needle", [
    ("rows", [1, 2], "field 'rows' must be an object"),
    ("rows.paths", None, "field 'rows.paths' must be a list of strings"),
    ("rows.labels", ["a"] * 12, "field 'rows.labels' must be a list of integers"),
    ("index_bytes", "429", "field 'index_bytes' must be a non-negative integer, got '429'"),
    ("metric", 3, "field 'metric' must be a string"),
    ("class_names", {"0": 1}, "field 'class_names' must be an object of class names"),
    ("search", {"nprobe": "x"}, "field 'search.nprobe' must be a positive integer or null"),
])
def test_sidecar_fields_of_the_wrong_type_are_one_line(pipeline, tmp_path, field, value, needle):
    index = tmp_path / "idx.faiss"
    r, out = _invoke(["index", pipeline["run"], "-o", index])
    assert r.exit_code == 0, out
    side = sidecar_path(index)
    meta = json.loads(side.read_text())
    if "." in field:
        top, sub = field.split(".")
        meta[top][sub] = value
    else:
        meta[field] = value
    side.write_text(json.dumps(meta))
    before = tree(tmp_path)
    query = next(pipeline["root"].rglob("*.jpg"))
    r, out = _invoke(["search", index, query, "--json", tmp_path / "res.json"])
    assert_one_line_error(r, out, f"{side}: {needle}")
    assert tree(tmp_path) == before


def test_png_with_mathtext_class_names(tmp_path):
    root = tmp_path / "folder"
    make_folder(root)
    for old, new in (("dog", "e$x^{$"), ("eel", "a$b$c"), ("fox", "back\\slash $")):
        (root / old).rename(root / new)
    cache = _extract(root, tmp_path / "c.h5", "float32")
    r, out = _invoke(["show", cache, "-o", tmp_path / "p.png", "--queries", "3", "-k", "2"])
    assert r.exit_code == 0, out
    from PIL import Image

    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and np.asarray(img).std() > 0
