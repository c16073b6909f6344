"""``dvml extract inshop``: the official query/gallery split lands in a schema-2 cache, row-aligned with paths."""

from __future__ import annotations

from typer.testing import CliRunner

from dvml.cache import load_split, read_info
from dvml.cache import schema as S
from dvml.cli import app
from dvml.extract.datasets import read_dataset

runner = CliRunner()
SMALL = ["--weights", "none", "--resize", "40", "--crop", "32", "--workers", "0", "--views", "2"]


def _roles_from_file(root):
    """path -> role, read independently from Eval/list_eval_partition.txt."""
    rows = [line.split() for line in (root / "Eval/list_eval_partition.txt").read_text().split("\n")[2:] if line]
    return {r[0]: {"query": S.ROLE_QUERY, "gallery": S.ROLE_GALLERY}[r[2]] for r in rows if r[2] != "train"}


def test_inshop_extracts_to_a_version_2_cache_with_roles(tiny_inshop, tmp_path):
    out = tmp_path / "inshop.h5"
    result = runner.invoke(app, ["extract", "inshop", "--root", str(tiny_inshop), "--out", str(out), *SMALL,
                                 "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    info = read_info(out)
    assert info.schema_version == 2 and info.query_gallery
    assert (info.splits["test"].n_query, info.splits["test"].n_gallery) == (6, 6)
    assert info.extra["n_images"] == {"train": 9, "test": 12, "query": 6, "gallery": 6}
    test = load_split(out, "test")
    expected = _roles_from_file(tiny_inshop)
    assert [int(r) for r in test.roles] == [expected[p] for p in test.paths]
    assert load_split(out, "train").roles is None
    index = read_dataset("inshop", tiny_inshop)
    assert list(test.labels) == [s.label for s in index.test]


def test_skipped_images_keep_roles_aligned(tiny_inshop, tmp_path):
    index = read_dataset("inshop", tiny_inshop)
    victim = index.test[3].path
    (tiny_inshop / victim).write_bytes(b"not a jpeg")
    out = tmp_path / "inshop.h5"
    result = runner.invoke(app, ["extract", "inshop", "--root", str(tiny_inshop), "--out", str(out), *SMALL,
                                 "--batch-size", "4", "--skip-bad"])
    assert result.exit_code == 0, result.output
    test = load_split(out, "test")
    expected = _roles_from_file(tiny_inshop)
    assert victim not in set(test.paths) and len(test.paths) == 11
    assert [int(r) for r in test.roles] == [expected[p] for p in test.paths]
