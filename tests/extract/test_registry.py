"""The dataset registry: a dataset is one ``register_dataset`` call, after which ``dvml extract NAME`` reads it and
``dvml evaluate`` scores its cache at its registered Ks; the built-in views (DatasetName, READERS, SOURCES, Ks)
are the registry's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import load_split, read_info
from dvml.cli import app
from dvml.errors import DvmlError
from dvml.evaluate import default_ks, evaluate_embeddings
from dvml.extract import download
from dvml.extract.datasets import READERS, DatasetIndex, DatasetName, Sample, read_dataset
from dvml.extract.registry import DatasetSpec, dataset_names, register_dataset, unregister_dataset

from ..conftest import write_image

runner = CliRunner()
SMALL = ["--weights", "none", "--resize", "40", "--crop", "32", "--workers", "0", "--views", "2"]


def read_manifest(root) -> DatasetIndex:
    """The toy format: ``manifest.tsv`` lines ``path<TAB>label<TAB>train|test``."""
    rows = [line.split("\t") for line in (root / "manifest.tsv").read_text().splitlines() if line]
    split = {s: [Sample(p, int(label)) for p, label, sp in rows if sp == s] for s in ("train", "test")}
    return DatasetIndex("toy-manifest", root, split["train"], split["test"], split_rule="manifest.tsv's column")


@pytest.fixture
def toy_dataset(tmp_path):
    """A generated folder in the toy format (4 train classes, 3 test classes, 3 images each), registered."""
    rng = np.random.default_rng(5)
    root = tmp_path / "toy"
    lines = []
    for label in range(7):
        for i in range(3):
            rel = f"pics/{label}_{i}.png"
            write_image(root / rel, rng, (48, 40))
            lines.append(f"{rel}\t{label}\t{'train' if label < 4 else 'test'}")
    (root / "manifest.tsv").write_text("\n".join(lines) + "\n")
    register_dataset(DatasetSpec("toy-manifest", reader=read_manifest, ks=(1, 3, 5)))
    yield root
    unregister_dataset("toy-manifest")


def test_a_registered_dataset_extracts_and_evaluates_at_its_ks(toy_dataset, tmp_path):
    out = tmp_path / "toy.h5"
    r = runner.invoke(app, ["extract", "toy-manifest", "--root", str(toy_dataset), "--out", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    info = read_info(out)
    assert info.extra["n_images"]["train"] == 12 and info.extra["n_images"]["test"] == 9
    test = load_split(out, "test")
    assert sorted(set(int(v) for v in test.labels)) == [4, 5, 6]
    metrics = tmp_path / "m.json"
    r = runner.invoke(app, ["evaluate", str(out), "--json", str(metrics)])
    assert r.exit_code == 0, r.output
    got = json.loads(metrics.read_text())
    assert sorted(k for k in got if k.startswith("recall@")) == ["recall@1", "recall@3", "recall@5"]
    ref = evaluate_embeddings(test.features[:, 0, :].astype(np.float32), test.labels, ks=(1, 3, 5))
    assert got["recall@3"] == pytest.approx(ref["recall@3"])


def test_unregistered_dataset_is_refused_by_the_cli(tmp_path):
    r = runner.invoke(app, ["extract", "toy-manifest", "--root", str(tmp_path), "--out", str(tmp_path / "x.h5")])
    assert r.exit_code != 0 and "'toy-manifest' is not one of cub, cars196, sop, inshop, folder" in r.output
    assert "toy-manifest" not in dataset_names()


def test_builtin_views_are_the_registry():
    assert [d.value for d in DatasetName] == ["cub", "cars196", "sop", "inshop", "folder"]
    assert list(READERS) == list(dataset_names())
    assert list(download.SOURCES) == ["cub", "cars196", "sop", "inshop"]
    assert download.SOURCES["cub"].counts.train_images == 5864
    assert (default_ks("sop"), default_ks("inshop"), default_ks("cars196"), default_ks("nonesuch")) == (
        (1, 10, 100, 1000), (1, 10, 20, 30, 40, 50), (1, 2, 4, 8), (1, 2, 4, 8))


def test_train_classes_only_for_a_split_that_takes_it(tiny_cub):
    fixed = "^train_classes applies to the folder dataset only; cub has a fixed split$"
    with pytest.raises(DvmlError, match=fixed) as e:
        read_dataset("cub", tiny_cub, train_classes=3)
    assert e.value.template.startswith("`train_classes` applies")  # the field, marked for the CLI's flag
    r = runner.invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(tiny_cub / "x.h5"),
                            "--train-classes", "3", *SMALL])
    assert r.exit_code == 1 and "--train-classes applies to the folder dataset only" in r.output
