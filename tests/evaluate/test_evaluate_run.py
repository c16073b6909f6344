"""Evaluating a run directory end to end: a real tiny fit (dvml.heads.fit), its metrics.json, and its errors."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import fingerprint, load_split
from dvml.cli import app
from dvml.evaluate import EvaluationError, evaluate_embeddings, evaluate_target
from dvml.extract.synth import SynthConfig, generate

runner = CliRunner()
SYNTH = SynthConfig(n_classes=16, images_per_class=8, views=2, feature_dim=64, class_dim=16, hidden_dim=32, seed=2)


def _fit(cache: Path, out: Path) -> Path:
    import torch

    from dvml.heads import FitConfig, fit

    torch.set_num_threads(1)
    cfg = FitConfig(cache=cache, out=out, epochs=2, phase2_epoch=1, kl_warmup_epochs=0, embedding_size=16,
                    decoder_hidden=32, samples=2, batch_size=16, per_class=4, eval_every=0, device="cpu", seed=0)
    return fit(cfg)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("run")
    cache = generate(SYNTH, tmp / "synth.h5")
    return cache, _fit(cache, tmp / "run")


def test_cli_on_a_run_directory_against_embed_then_evaluate(fitted):
    cache, run_dir = fitted
    from dvml.heads import embed

    result = runner.invoke(app, ["evaluate", str(run_dir), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote") == 1  # metrics.json, said once (not also by the library's log)
    saved = json.loads((run_dir / "metrics.json").read_text())
    split = load_split(cache, "test", views=[0])
    emb = embed(run_dir, split.features[:, 0, :])
    assert emb.shape == (split.labels.size, 16)
    ref = evaluate_embeddings(emb, split.labels, seed=1)
    for key, value in ref.items():
        assert saved[key] == pytest.approx(value, abs=1e-12), key
        if key not in ("precision", "recall"):
            assert f"{100 * value:.2f}" in result.stdout
    assert saved["target_kind"] == "run" and saved["run_kind"] == "heads"
    assert saved["cache_fingerprint"] == fingerprint(cache) and Path(saved["cache"]) == cache.resolve()
    assert saved["embedding_dim"] == 16 and saved["n_test"] == split.labels.size and saved["n_classes"] == 8


def test_raw_features_and_heads_are_different_targets(fitted):
    cache, run_dir = fitted
    raw = evaluate_target(cache, clustering=False)
    heads = evaluate_target(run_dir, clustering=False, write_metrics=False)
    assert raw["embedding_dim"] == SYNTH.feature_dim and heads["embedding_dim"] == 16
    assert raw["cache_fingerprint"] == heads["cache_fingerprint"]


@pytest.fixture()
def own_run(tmp_path) -> tuple[Path, Path]:
    """A run fit on a private copy of a cache, so the test may delete or change that cache."""
    cache = generate(SYNTH, tmp_path / "own.h5")
    return cache, _fit(cache, tmp_path / "run")


def test_missing_cache_is_an_error(own_run):
    cache, run_dir = own_run
    cache.unlink()
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 1
    text = result.output.replace("\n", "")
    assert "no longer exists" in text and "own.h5" in text
    assert not (run_dir / "metrics.json").exists()


def test_changed_cache_fingerprint_is_an_error(own_run):
    cache, run_dir = own_run
    recorded = fingerprint(cache)
    tmp = cache.with_name("other.h5")
    generate(SynthConfig(**{**SYNTH.__dict__, "seed": 99}), tmp)
    shutil.move(tmp, cache)
    with pytest.raises(EvaluationError, match=f"changed since the heads were fit.*recorded {recorded}"):
        evaluate_target(run_dir)
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 1 and "changed since the heads were fit" in result.output.replace("\n", "")


def test_finetune_runs_dispatch_to_embed_test_split(tmp_path, monkeypatch):
    # the finetune stage embeds its own test split (images through the backbone); evaluate only dispatches
    from dvml import runs

    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"kind": "finetune", "config": {"dataset": "cub"}}))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    emb = (rng.normal(size=(20, 8)) + 3 * rng.normal(size=(5, 8))[labels]).astype(np.float32)
    calls = []
    fake = types.ModuleType("dvml.finetune")
    fake.embed_test_split = lambda rd: calls.append(Path(rd)) or (emb, labels)
    monkeypatch.setitem(sys.modules, "dvml.finetune", fake)
    monkeypatch.setattr(runs, "load_run", lambda rd: runs.RunInfo(
        run_dir=Path(rd), kind="finetune", config={"dataset": "cub"}, cache=None, cache_fingerprint=None))
    res = evaluate_target(run_dir, seed=2)
    assert calls == [run_dir]
    ref = evaluate_embeddings(emb, labels, seed=2)
    assert {k: res[k] for k in ref} == ref
    assert res["run_kind"] == "finetune" and json.loads((run_dir / "metrics.json").read_text())["nmi"] == ref["nmi"]
