"""dvml show: a well-formed static page whose every image exists, marks that agree with the labels and evaluate's
kNN, seeded queries shared by targets side by side, a PNG, and clear errors."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import load_split
from dvml.cli import app
from dvml.retrieval import knn
from dvml.serve.show import pick_queries

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


class _Tags(HTMLParser):
    """Tag balance as a browser's parser sees it (void elements excepted)."""

    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def page(pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("show") / "retrievals.html"
    stdout = _ok(["show", str(pipeline["run"]), str(pipeline["cache"]), "--root", str(pipeline["root"]),
                  "-o", str(out), "--queries", "4", "-k", "3", "--seed", "7"])
    assert "precision@3" in stdout
    return out


def test_page_is_well_formed_and_every_image_exists(page):
    text = page.read_text(encoding="utf-8")
    tree = ET.fromstring(text.split("\n", 1)[1])  # strict XML parse of everything after <!DOCTYPE html>
    assert tree.tag == "html"
    tags = _Tags()
    tags.feed(text)
    tags.close()
    assert not tags.errors and not tags.stack, (tags.errors, tags.stack)
    srcs = [img.get("src") for img in tree.iter("img")]
    assert srcs and all(not Path(s).is_absolute() and (page.parent / s).is_file() for s in srcs)
    assert all(s.startswith("retrievals_files/") for s in srcs)
    assert "<script" not in text


def test_marks_agree_with_labels_and_evaluates_knn(page, pipeline, evaluate_embeddings):
    tree = ET.fromstring(page.read_text(encoding="utf-8").split("\n", 1)[1])
    split = load_split(pipeline["cache"], "test")
    rows = pick_queries(len(split.labels), 4, 7)
    names = {3: "dog", 4: "eel", 5: "fox"}
    assert [h.text for h in tree.iter("h2")] == [f"Query {i + 1}: {names[int(split.labels[r])]}"
                                                 for i, r in enumerate(rows)]
    cells = [td for td in tree.iter("td") if td.get("class") in ("ok", "bad")]
    assert len(cells) == 4 * 2 * 3  # queries x targets x k
    for t, target in enumerate((pipeline["run"], pipeline["cache"])):
        _, nbrs = knn.search(evaluate_embeddings(target), 3, exclude_self=True)
        for qi, r in enumerate(rows):
            for rank, j in enumerate(nbrs[r]):
                td = cells[(qi * 2 + t) * 3 + rank]
                assert td.find("img").get("src").endswith(f"row{j:06d}.jpg")
                assert td.get("class") == ("ok" if split.labels[j] == split.labels[r] else "bad")
                assert names[int(split.labels[j])] in "".join(td.itertext())


def test_same_seed_same_queries(pipeline, tmp_path, page):
    out = tmp_path / "again.html"
    _ok(["show", str(pipeline["run"]), "-o", str(out), "--queries", "4", "-k", "3", "--seed", "7"])  # recorded root
    h2 = [h.text for h in ET.fromstring(out.read_text().split("\n", 1)[1]).iter("h2")]
    assert h2 == [h.text for h in ET.fromstring(page.read_text().split("\n", 1)[1]).iter("h2")]
    assert not np.array_equal(pick_queries(12, 4, 7), pick_queries(12, 4, 8))


def test_png(pipeline, tmp_path):
    from PIL import Image

    out = tmp_path / "r.png"
    _ok(["show", str(pipeline["run"]), str(pipeline["cache"]), "-o", str(out), "--queries", "2", "-k", "3"])
    with Image.open(out) as img:
        assert img.format == "PNG"
        w, h = img.size
    assert (w, h) == (680, 760)  # 1 + k = 4 columns of 1.7 in, 2 queries x 2 targets = 4 rows of 1.9 in, 100 dpi


def test_errors(pipeline, tmp_path, one_line_error):
    from dvml.extract.synth import SynthConfig, generate

    root = tmp_path / "root"
    shutil.copytree(pipeline["root"], root)
    for f in (root / "eel").iterdir():
        f.unlink()
    one_line_error(["show", str(pipeline["run"]), "--root", str(root), "-o", str(tmp_path / "a.html")],
                    "image not found", "is --root the dataset directory?")
    one_line_error(["show", str(pipeline["run"]), "-o", str(tmp_path / "a.gif")], "use a .html or .png file")
    synth = generate(SynthConfig(n_classes=4, images_per_class=2, views=1, feature_dim=8, class_dim=4, hidden_dim=8),
                     tmp_path / "synth.h5")
    one_line_error(["show", str(synth), "-o", str(tmp_path / "s.html")], "stores no image paths")
    one_line_error(["show", str(pipeline["run"]), str(synth), "-o", str(tmp_path / "b.html")],
                    "test split differs")


def test_finetune_run_beside_a_heads_run(pipeline, finetuned, tmp_path, evaluate_embeddings):
    """A finetune run's test split is the dataset's (read from its root), the same images as the heads run's
    cache: they share the page; its marks follow evaluate's kNN on the tuned backbone's embeddings."""
    out = tmp_path / "ft.html"
    _ok(["show", str(finetuned), str(pipeline["run"]), "-o", str(out), "--queries", "3", "-k", "2", "--seed", "1"])
    tree = ET.fromstring(out.read_text(encoding="utf-8").split("\n", 1)[1])
    labels = load_split(pipeline["cache"], "test").labels
    rows = pick_queries(len(labels), 3, 1)
    _, nbrs = knn.search(evaluate_embeddings(finetuned), 2, exclude_self=True)
    cells = [td for td in tree.iter("td") if td.get("class") in ("ok", "bad")]
    for qi, r in enumerate(rows):
        for rank, j in enumerate(nbrs[r]):
            td = cells[(qi * 2 + 0) * 2 + rank]  # the finetune run is the first target
            assert td.find("img").get("src").endswith(f"row{j:06d}.jpg")
            assert td.get("class") == ("ok" if labels[j] == labels[r] else "bad")


def test_query_gallery_split_follows_evaluate(tiny_inshop, tmp_path, evaluate_embeddings):
    """In-Shop (a schema-2 cache): queries are query rows, neighbours gallery rows, as dvml evaluate ranks them;
    dvml index holds the gallery rows with their test-row ids."""
    from dvml.cache import load_test_roles
    from dvml.cache import schema as S
    from dvml.extract import ExtractConfig, run

    from .conftest import _fit

    cache = run(ExtractConfig(dataset="inshop", root=tiny_inshop, out=tmp_path / "inshop.h5", weights="none",
                              views=1, resize=64, crop=56, workers=0, device="cpu", batch_size=8)).path
    run_dir = _fit(cache, tmp_path / "run")
    roles = load_test_roles(cache)
    q_rows, g_rows = np.flatnonzero(roles & S.ROLE_QUERY), np.flatnonzero(roles & S.ROLE_GALLERY)
    out = tmp_path / "r.html"
    _ok(["show", str(run_dir), "-o", str(out), "--queries", "4", "-k", "2", "--seed", "3"])
    emb = evaluate_embeddings(run_dir)
    _, idx = knn.search(emb[q_rows], 2, database=emb[g_rows])  # In-Shop has no 'both' rows: nothing to exclude
    shown = q_rows[pick_queries(q_rows.size, 4, 3)]
    tree = ET.fromstring(out.read_text().split("\n", 1)[1])
    cells = [td for td in tree.iter("td") if td.get("class") in ("ok", "bad")]
    labels = load_split(cache, "test").labels
    for qi, r in enumerate(shown):
        want = g_rows[idx[np.searchsorted(q_rows, r)]]
        got = [int(td.find("img").get("src")[-10:-4]) for td in cells[2 * qi:2 * qi + 2]]
        assert got == list(want)
        assert [td.get("class") for td in cells[2 * qi:2 * qi + 2]] == ["ok" if labels[j] == labels[r] else "bad"
                                                                       for j in want]
    _ok(["index", str(run_dir), "-o", str(tmp_path / "g.faiss")])
    meta = json.loads((tmp_path / "g.faiss.json").read_text())
    assert meta["n"] == g_rows.size and meta["rows"]["ids"] == list(g_rows)
