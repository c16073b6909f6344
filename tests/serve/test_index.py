"""dvml index / search: the neighbours of ``dvml evaluate``'s kNN, approximate indexes with honest recall, and
one clear error for a damaged or mismatched pair of files."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import load_split
from dvml.cli import app
from dvml.retrieval import knn

from ..faults.test_io_faults import assert_one_line_error, leftovers

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def flat_index(pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "gallery.faiss"
    stdout = _ok(["index", str(pipeline["run"]), "-o", str(out)])
    assert "12 x 16 (flat, cosine)" in " ".join(stdout.split())
    return out


def test_search_returns_evaluates_neighbours(pipeline, flat_index, tmp_path, evaluate_embeddings):
    """Every test image as a query (itself excluded, as evaluate excludes it) → the top-3 of evaluate's exact kNN."""
    paths = load_split(pipeline["cache"], "test").paths
    images = [pipeline["root"] / p for p in paths]
    out = tmp_path / "hits.json"
    _ok(["search", str(flat_index), *map(str, images), "-k", "3", "--exclude-self", "--json", str(out)])
    res = json.loads(out.read_text())
    emb = evaluate_embeddings(pipeline["run"])
    ref_d, ref_i = knn.search(emb, 3, exclude_self=True)  # what evaluate's Recall@K counts
    assert len(res["queries"]) == len(images)
    for q, (query, di, ii) in enumerate(zip(res["queries"], ref_d, ref_i, strict=True)):
        assert query["query"] == str(images[q])
        assert [r["path"] for r in query["results"]] == [str(paths[j]) for j in ii]
        assert [r["row"] for r in query["results"]] == list(ii)
        np.testing.assert_allclose([r["distance"] for r in query["results"]], di, atol=1e-5)
        labels = load_split(pipeline["cache"], "test").labels
        assert [r["label"] for r in query["results"]] == [int(labels[j]) for j in ii]
        assert all(Path(r["file"]).is_file() for r in query["results"])
    assert res["queries"][0]["results"][0]["class_name"] in ("dog", "eel", "fox")


def test_search_without_exclude_self_finds_the_query_first(pipeline, flat_index, tmp_path):
    image = pipeline["root"] / "eel" / "eel_1.jpg"
    stdout = _ok(["search", str(flat_index), str(image), "-k", "2", "--json", str(tmp_path / "r.json")])
    assert "eel/eel_1.jpg" in stdout and "rank" in stdout
    first = json.loads((tmp_path / "r.json").read_text())["queries"][0]["results"][0]
    assert first["path"] == "eel/eel_1.jpg" and first["rank"] == 1 and first["distance"] == pytest.approx(0, abs=1e-6)
    assert first["class_name"] == "eel" and Path(first["file"]) == image


def test_folder_with_an_exported_model(pipeline, tmp_path):
    """A folder of images + an exported model: labels from sub-folders; neighbours = brute force on the model's
    embeddings."""
    from dvml.serve.export import load_exported

    model = tmp_path / "m.pt"
    _ok(["export", str(pipeline["run"]), "-o", str(model)])
    gallery = tmp_path / "gallery.faiss"
    _ok(["index", str(pipeline["root"]), "--model", str(model), "-o", str(gallery)])
    meta = json.loads((tmp_path / "gallery.faiss.json").read_text())
    assert meta["n"] == 24 and meta["embedder"]["kind"] == "model"
    assert meta["class_names"] == {str(i): n for i, n in enumerate(("ant", "bee", "cat", "dog", "eel", "fox"))}
    files = sorted(pipeline["root"].rglob("*.jpg"))
    emb = load_exported(model).embed_paths(files)
    queries = [files[3], files[17]]
    out = tmp_path / "r.json"
    _ok(["search", str(gallery), *map(str, queries), "-k", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    q = emb[[3, 17]]
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
    for query, row in zip(res["queries"], cos, strict=True):
        want = np.argsort(-row, kind="stable")[:4]
        assert [r["row"] for r in query["results"]] == list(want)
        np.testing.assert_allclose([r["distance"] for r in query["results"]], 1 - row[want], atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_reports_its_recall(tmp_path, kind):
    """On 3,000 random vectors, an IVF probing 1 of 76 lists misses neighbours; the stored recall equals a
    brute-force count."""
    from dvml.serve.index import Gallery, IndexConfig, load_index, write_gallery_index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    g = Gallery(embeddings=x, labels=np.zeros(3000, dtype=np.int64), paths=[f"v{i}" for i in range(3000)], root=None,
                source={"kind": "test"}, embedder={})
    cfg = IndexConfig(source=tmp_path, out=tmp_path / f"{kind}.faiss", kind=kind, nprobe=1, ef_search=16, hnsw_m=4)
    meta = write_gallery_index(g, cfg)
    rec = meta["recall_vs_exact"]
    assert rec["k"] == 10 and rec["queries"] == 1000
    loaded = load_index(cfg.out)
    rows = np.sort(np.random.default_rng(0).choice(3000, size=1000, replace=False))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[rows] @ xn.T
    sims[np.arange(1000), rows] = -np.inf
    exact = np.argsort(-sims, axis=1)[:, :10]
    _, got = knn.search_index(loaded.index, x[rows], 11, metric="cosine", nprobe=1, ef_search=16)
    hits = sum(len(set(e) & (set(a) - {r})) for e, a, r in zip(exact, got, rows, strict=True))
    assert rec["recall"] == pytest.approx(hits / 10000)
    assert 0.2 < rec["recall"] < 1.0
    if kind == "ivf":
        assert meta["params"]["nlist"] == knn.default_nlist(3000) == 76


def test_ivf_cli_prints_recall(pipeline, tmp_path):
    stdout = _ok(["index", str(pipeline["cache32"]), "-o", str(tmp_path / "i.faiss"), "--kind", "ivf"])
    assert "recall@10 of the exact neighbours: 1.0000" in " ".join(stdout.split())  # 1 list for 12 items: exact


# ------------------------------------------------------------------------------------------ where the files go
def test_index_and_search_json_write_through_symlinks(pipeline, tmp_path):
    """INDEX through a symlink (the link stays; its table goes beside the link, named after it), and search reads
    the pair through the link; ``--json`` through a dangling symlink creates the file it names."""
    from dvml.serve.index import file_digest

    store = tmp_path / "store"
    store.mkdir()
    (store / "real.faiss").write_bytes(b"an older index")
    link = tmp_path / "link.faiss"
    link.symlink_to(store / "real.faiss")
    _ok(["index", str(pipeline["run"]), "-o", str(link), "--overwrite"])
    meta = json.loads((tmp_path / "link.faiss.json").read_text())
    assert link.is_symlink() and not (tmp_path / "link.faiss.json").is_symlink()
    assert (meta["index_bytes"], meta["index_digest"]) == ((store / "real.faiss").stat().st_size,
                                                           file_digest(store / "real.faiss"))
    (tmp_path / "hits.json").symlink_to(store / "hits.json")
    _ok(["search", str(link), str(pipeline["root"] / "eel" / "eel_1.jpg"), "-k", "1", "--json",
         str(tmp_path / "hits.json")])
    assert (tmp_path / "hits.json").is_symlink()
    assert json.loads((store / "hits.json").read_text())["queries"][0]["results"][0]["path"] == "eel/eel_1.jpg"
    assert leftovers(tmp_path) == []


def test_search_json_dash_is_standard_output(pipeline, flat_index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["search", str(flat_index), str(pipeline["root"] / "eel" / "eel_1.jpg"), "-k", "2",
                            "--json", "-"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # standard output holds the JSON alone; the table went to standard error
    assert res["queries"][0]["results"][0]["path"] == "eel/eel_1.jpg" and "rank" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_a_directory_as_index_table_or_json_target_is_one_line(pipeline, flat_index, tmp_path):
    for name, out_name in (("d.faiss", "d.faiss"), ("t.faiss.json", "t.faiss")):  # INDEX, then its table
        target, out = tmp_path / name, tmp_path / out_name
        target.mkdir()
        for extra in ([], ["--overwrite"]):
            r = runner.invoke(app, ["index", str(pipeline["run"]), "-o", str(out), *extra])
            assert_one_line_error(r, r.output, f"cannot write {target}: is a directory")
        assert list(target.iterdir()) == []
    assert not (tmp_path / "d.faiss.json").exists() and not (tmp_path / "t.faiss").exists()
    r = runner.invoke(app, ["search", str(flat_index), str(pipeline["root"] / "eel"), "--json", str(tmp_path)])
    assert_one_line_error(r, r.output, f"cannot write {tmp_path}: is a directory")
    assert "rank" not in r.output and leftovers(tmp_path) == []  # refused before the search


def test_a_failed_index_write_is_one_line_and_keeps_the_old_pair(pair, pipeline, monkeypatch):
    """The serializer fails half-way (a full disk): one line naming INDEX; the old INDEX and its table are intact
    (search still reads them) and no temporary file is left."""
    side = pair.with_name(pair.name + ".json")
    before = pair.read_bytes(), side.read_bytes()

    def write_index(index, write) -> None:
        write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(knn, "write_index", write_index)
    r = runner.invoke(app, ["index", str(pipeline["run"]), "-o", str(pair), "--overwrite"])
    assert_one_line_error(r, r.output, f"cannot write {pair}: No space left on device")
    assert (pair.read_bytes(), side.read_bytes()) == before and leftovers(pair.parent) == []
    _ok(["search", str(pair), str(pipeline["root"] / "eel" / "eel_1.jpg"), "-k", "1"])


# ------------------------------------------------------------------------------------------ damaged / mismatched
@pytest.fixture
def pair(flat_index, tmp_path) -> Path:
    out = tmp_path / "copy.faiss"
    shutil.copy(flat_index, out)
    shutil.copy(flat_index.with_name(flat_index.name + ".json"), tmp_path / "copy.faiss.json")
    return out


def test_truncated_index(pair, pipeline, one_line_error):
    data = pair.read_bytes()
    pair.write_bytes(data[: len(data) // 2])
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], str(pair), "does not match copy.faiss.json")


def test_garbage_index_with_a_matching_table(pair, pipeline, one_line_error):
    """A table rewritten to vouch for a garbage file still fails on faiss' own reading, naming the file."""
    from dvml.serve.index import file_digest

    pair.write_bytes(b"garbage!" * 64)
    side = pair.with_name(pair.name + ".json")
    meta = json.loads(side.read_text())
    meta.update(index_bytes=pair.stat().st_size, index_digest=file_digest(pair))
    side.write_text(json.dumps(meta))
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], str(pair), "not a readable faiss index")


def test_table_of_another_index(pair, pipeline, tmp_path, one_line_error):
    other = tmp_path / "other.faiss"
    _ok(["index", str(pipeline["cache32"]), "-o", str(other)])
    shutil.copy(tmp_path / "other.faiss.json", pair.with_name(pair.name + ".json"))
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], "does not match", "different builds")


def test_missing_or_unreadable_table(pair, pipeline, one_line_error):
    side = pair.with_name(pair.name + ".json")
    side.write_text("{not json")
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], "copy.faiss.json: not valid JSON")
    side.unlink()
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], "row table copy.faiss.json is missing")


def test_table_rows_disagree_with_the_index(pair, pipeline, one_line_error):
    side = pair.with_name(pair.name + ".json")
    meta = json.loads(side.read_text())
    meta["rows"]["paths"] = meta["rows"]["paths"][:-1]
    side.write_text(json.dumps(meta))
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel")], "rows.paths has 11 entries for 12 vectors")


def test_query_model_of_another_dimension(pair, pipeline, tmp_path, one_line_error):
    one_line_error(["search", str(pair), str(pipeline["root"] / "eel"), "--model", str(pipeline["cache"])],
                    "1024-D", "16-D")


def test_existing_output_and_bad_sources(pipeline, flat_index, tmp_path, one_line_error):
    one_line_error(["index", str(pipeline["run"]), "-o", str(flat_index)], "already exists")
    one_line_error(["index", str(pipeline["run"]), "-o", "-"], "an index is a file with its row table beside it")
    one_line_error(["index", str(pipeline["root"]), "-o", str(tmp_path / "x.faiss")], "needs --model")
    one_line_error(["index", str(tmp_path / "nope"), "-o", str(tmp_path / "x.faiss")], "no such run directory")
    one_line_error(["search", str(flat_index), str(tmp_path / "none.jpg")], "no such image file or folder")
