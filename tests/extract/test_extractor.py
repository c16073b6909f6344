"""``dvml extract``: end to end through the CLI on tiny datasets in their official formats (weights=none).

Most runs use 40 -> 32 px crops for speed; one runs at the real 256 -> 224 size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dvml.cache import CacheIncompleteError, fingerprint, load_split, read_info
from dvml.cli import app
from dvml.extract.datasets import read_dataset
from dvml.extract.extractor import ExtractConfig, resume_position, run

runner = CliRunner()
SMALL = ["--weights", "none", "--resize", "40", "--crop", "32", "--workers", "0"]


def extract(*args: str, ok: bool = True):
    result = runner.invoke(app, ["extract", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def small_cfg(root, out, **kw) -> ExtractConfig:
    base = dict(dataset="folder", root=root, out=out, weights="none", resize=40, crop=32, workers=0, views=3,
                batch_size=2)
    return ExtractConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["cub", "cars196", "sop", "folder"])
def test_each_official_format_extracts_through_the_cli(request, tmp_path, name):
    root = request.getfixturevalue(f"tiny_{name}")
    out = tmp_path / f"{name}.h5"
    extract(name, "--root", root, "--out", out, *SMALL, "--views", "3", "--batch-size", "4")
    index = read_dataset(name, root)
    info = read_info(out)
    assert (info.dataset, info.backbone, info.feature_dim) == (name, "torchvision.googlenet", 1024)
    assert info.views[0] == "centre(resize=40,crop=32)" and len(info.views) == 3
    assert info.extra["preprocess"]["crop"] == 32 and info.extra["preprocess"]["mean"][0] == pytest.approx(0.485)
    assert info.extra["split_rule"] == index.split_rule and info.extra["skipped"] == []
    for split in ("train", "test"):
        data = load_split(out, split)
        samples = index.split(split)
        p = 3 if split == "train" else 1
        assert data.features.shape == (len(samples), p, 1024)
        assert list(data.labels) == [s.label for s in samples]
        assert list(data.paths) == [s.path for s in samples]
        assert (data.features >= 0).all() and data.features.std() > 0  # pooled ReLU outputs, not constant
    tr, te = load_split(out, "train"), load_split(out, "test")
    assert not set(tr.labels) & set(te.labels)
    # training views are augmentations, different from the centre view; images differ from each other
    assert not np.allclose(tr.features[:, 0], tr.features[:, 1])
    assert not np.allclose(tr.features[0, 0], tr.features[1, 0])


def test_views_are_deterministic_per_seed_and_independent_of_workers_and_batches(tiny_folder, tmp_path):
    a = run(small_cfg(tiny_folder, tmp_path / "a.h5", test_flip=True)).path
    b = run(small_cfg(tiny_folder, tmp_path / "b.h5", test_flip=True, workers=2, batch_size=4)).path
    c = run(small_cfg(tiny_folder, tmp_path / "c.h5", test_flip=True, seed=1)).path
    fa, fb, fc = (load_split(p, "train").features for p in (a, b, c))
    np.testing.assert_allclose(fb, fa, rtol=2e-3, atol=1e-3)  # batch size may change float rounding
    np.testing.assert_array_equal(fc[:, 0], fa[:, 0])  # another seed: same centre view ...
    assert not np.allclose(fc[:, 1:], fa[:, 1:])  # ... different random views
    ta = load_split(a, "test").features
    assert ta.shape[1] == 2 and not np.allclose(ta[:, 0], ta[:, 1])  # centre and mirrored centre
    np.testing.assert_array_equal(load_split(c, "test").features, ta)  # test views do not depend on the seed
    d = run(small_cfg(tiny_folder, tmp_path / "d.h5", test_flip=True, workers=2)).path
    assert fingerprint(d) == fingerprint(a)  # same batch size, more workers: bit-identical


class Interrupt:
    """Progress callback that presses Ctrl-C on its call number ``after + 1``.

    ``run`` calls it once when a split starts and once after every written batch (that batch is on disk)."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, split, done, total):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt


def test_resume_after_interrupt_equals_an_uninterrupted_run(tiny_cub, tmp_path):
    args = ["cub", "--root", tiny_cub, *SMALL, "--views", "2", "--batch-size", "2"]
    extract(*args, "--out", tmp_path / "whole.h5")
    out = tmp_path / "resumed.h5"
    written = []
    for after in (2, 5):  # stop after 2 train batches, then (resumed) after 1 test batch
        with pytest.raises(KeyboardInterrupt):
            run(ExtractConfig(dataset="cub", root=tiny_cub, out=out, weights="none", resize=40, crop=32,
                              workers=0, views=2, batch_size=2), progress=Interrupt(after))
        with pytest.raises(CacheIncompleteError):
            read_info(out)
        partial = read_info(out, require_complete=False).splits
        written.append((partial["train"].n, partial["test"].n))
    assert written == [(4, 0), (9, 2)]  # a real partial file each time
    extract(*args, "--out", out)
    assert fingerprint(out) == fingerprint(tmp_path / "whole.h5")


def test_a_bad_image_stops_naming_the_file(tiny_folder, tmp_path):
    bad = tiny_folder / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:200])
    result = extract("folder", "--root", tiny_folder, "--out", tmp_path / "o.h5", *SMALL, ok=False)
    assert result.exit_code == 1
    assert str(bad) in result.output and "--skip-bad" in result.output


def test_skip_bad_lists_skipped_images_and_resumes_consistently(tiny_folder, tmp_path):
    (tiny_folder / "bee" / "0.jpg").write_text("not a jpeg")  # train index 3
    truncated = tiny_folder / "dog" / "2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])  # test index 5
    whole = run(small_cfg(tiny_folder, tmp_path / "whole.h5", skip_bad=True))
    assert [(s["split"], s["index"], s["path"]) for s in whole.skipped] == [("train", 3, "bee/0.jpg"),
                                                                           ("test", 5, "dog/2.jpg")]
    info = read_info(whole.path)
    assert [s["path"] for s in info.extra["skipped"]] == ["bee/0.jpg", "dog/2.jpg"]
    tr = load_split(whole.path, "train")
    assert len(tr.labels) == 5 and "bee/0.jpg" not in set(tr.paths)
    # interrupted right after the batch holding the bad training image, then resumed through the CLI
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(tiny_folder, out, skip_bad=True), progress=Interrupt(2))
    partial = read_info(out, require_complete=False)
    assert partial.splits["train"].n == 3 and [s["index"] for s in partial.extra["skipped"]] == [3]
    extract("folder", "--root", tiny_folder, "--out", out, *SMALL, "--views", "3", "--batch-size", "2",
            "--skip-bad")
    assert fingerprint(out) == fingerprint(whole.path)
    assert read_info(out).extra["skipped"] == info.extra["skipped"]


def test_resume_position_with_skips():
    assert resume_position(4, []) == 4
    assert resume_position(4, [1, 2]) == 6  # two skipped before: dataset position 6
    assert resume_position(4, [1, 6, 7]) == 5  # 6 and 7 listed, but their batch never landed
    assert resume_position(0, [0, 1]) == 0


def test_existing_output_is_not_overwritten_without_the_flag(tiny_folder, tmp_path):
    out = tmp_path / "o.h5"
    extract("folder", "--root", tiny_folder, "--out", out, *SMALL, "--views", "1")
    before = fingerprint(out)
    result = extract("folder", "--root", tiny_folder, "--out", out, *SMALL, "--views", "2", ok=False)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert fingerprint(out) == before
    extract("folder", "--root", tiny_folder, "--out", out, *SMALL, "--views", "2", "--overwrite")
    assert read_info(out).splits["train"].views == 2


def test_resuming_with_other_settings_is_refused(tiny_folder, tmp_path):
    out = tmp_path / "o.h5"
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(tiny_folder, out), progress=Interrupt(1))
    result = extract("folder", "--root", tiny_folder, "--out", out, *SMALL, "--views", "3", "--seed", "9", ok=False)
    assert result.exit_code == 1 and "different settings" in result.output


def test_missing_root_file_fails_cleanly_through_the_cli(tiny_cub, tmp_path):
    (tiny_cub / "images.txt").unlink()
    result = extract("cub", "--root", tiny_cub, "--out", tmp_path / "o.h5", *SMALL, ok=False)
    assert result.exit_code == 1
    assert "images.txt: not found" in result.output and "CUB_200_2011" in result.output
    assert not (tmp_path / "o.h5").exists()


def test_default_sizes_are_the_weights_own_256_224(tiny_folder, tmp_path):
    out = tmp_path / "o.h5"
    extract("folder", "--root", tiny_folder, "--out", out, "--weights", "none", "--workers", "0", "--views", "2",
            "--train-classes", "1", "--batch-size", "8")
    info = read_info(out)
    assert info.views[0] == "centre(resize=256,crop=224)"
    pre = info.extra["preprocess"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (256, 224, "bilinear")
    assert json.loads(json.dumps(info.extra["class_names"])) == {"0": "ant", "1": "bee", "2": "cat", "3": "dog"}
    assert (info.splits["train"].n, info.splits["test"].n) == (3, 9)


@pytest.mark.gpu
def test_cuda_with_autocast_matches_cpu(tiny_folder, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = run(small_cfg(tiny_folder, tmp_path / "cpu.h5", device="cpu")).path
    gpu = run(small_cfg(tiny_folder, tmp_path / "gpu.h5", device="cuda", workers=2)).path
    assert read_info(gpu).extra["amp"] is True
    for split in ("train", "test"):
        a, b = load_split(cpu, split).features, load_split(gpu, split).features
        np.testing.assert_allclose(b, a, rtol=5e-2, atol=5e-2 * float(np.abs(a).mean()))
