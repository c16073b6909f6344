"""A real tiny pipeline for the serve tests: a folder dataset of seeded JPEGs → ``dvml extract`` (random
GoogLeNet, 64/56 px) → ``fit-heads`` (2 epochs, 16-D z_I). Built once per test session; tests that change
files work on copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")  # first 3 train, last 3 test
PER_CLASS = 4


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)[None, None, :] * (0.5 + 0.5 * np.sin(xx / rng.uniform(3, 9))[..., None])
    img = base + rng.normal(0, 40, (h, w, 3)) + yy[..., None] * rng.uniform(-1, 1, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        for k in range(PER_CLASS):
            _write_image(root / name / f"{name}_{k}.jpg", rng, ((80, 64), (64, 80), (72, 72))[k % 3])
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _extract(root: Path, out: Path, dtype: str) -> Path:
    from dvml.extract import ExtractConfig, run

    cfg = ExtractConfig(dataset="folder", root=root, out=out, weights="none", views=2, resize=64, crop=56,
                        workers=0, device="cpu", batch_size=8, dtype=dtype)
    return run(cfg).path


def _fit(cache: Path, out: Path) -> Path:
    from dvml.heads import FitConfig, fit

    cfg = FitConfig(cache=cache, out=out, epochs=2, phase2_epoch=1, kl_warmup_epochs=0, embedding_size=16,
                    decoder_hidden=32, samples=2, batch_size=6, per_class=2, eval_every=0, device="cpu", seed=0)
    return fit(cfg)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    """``root`` (folder dataset), ``cache`` (float16), ``run`` (fit-heads on it), ``cache32`` / ``run32``
    (the same with a float32 cache)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve")
    root = make_folder(tmp / "folder")
    out = {"root": root}
    for tag, dtype in (("", "float16"), ("32", "float32")):
        cache = _extract(root, tmp / f"cache{tag}.h5", dtype)
        out[f"cache{tag}"] = cache
        out[f"run{tag}"] = _fit(cache, tmp / f"run{tag}")
    return out


@pytest.fixture
def evaluate_embeddings(monkeypatch):
    """``f(target) -> (N, E)``: the embeddings ``dvml evaluate TARGET`` scores, captured inside its own code path."""
    import dvml.evaluate.core as core

    def of(target: Path) -> np.ndarray:
        seen = {}
        original = core.evaluate_embeddings

        def capture(embeddings, labels, **kw):
            seen["emb"] = np.array(embeddings, dtype=np.float32, copy=True)
            return original(embeddings, labels, **kw)

        monkeypatch.setattr(core, "evaluate_embeddings", capture)
        try:
            core.evaluate_target(target, clustering=False, write_metrics=False, ks=(1,))
        finally:
            monkeypatch.setattr(core, "evaluate_embeddings", original)
        return seen["emb"]

    return of


@pytest.fixture(scope="session")
def finetuned(pipeline, tmp_path_factory) -> Path:
    """A tiny finetune run (one step) on the pipeline's folder dataset."""
    from dvml.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = FinetuneConfig(root=pipeline["root"], out=out, dataset="folder", weights="none", resize=40, crop=32,
                         batch_size=6, per_class=2, samples=2, embedding_size=16, decoder_hidden=16, workers=0,
                         phase2_epoch=1, kl_warmup_epochs=1, lr=1e-3, backbone_lr=1e-3, checkpoint_every=0, epochs=1,
                         steps_per_epoch=1, device="cpu")
    return finetune(cfg)


@pytest.fixture
def one_line_error():
    """``check(args, *needles)``: ``dvml ARGS`` exits 1 with no traceback and its output (whitespace folded)
    contains every needle."""
    from typer.testing import CliRunner

    from dvml.cli import app

    def check(args: list[str], *needles: str) -> None:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        text = " ".join(result.output.split())
        for needle in needles:
            assert needle in text, result.output

    return check
