"""``dvml.extract.transforms``: view 0 is torchvision's own preprocessing, random views are seeded crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dvml.extract.backbone import load_backbone
from dvml.extract.datasets import Sample
from dvml.extract.transforms import BadImageError, ViewDataset, ViewSpec, load_rgb, resize_shorter


@pytest.fixture
def cub_sized_jpeg(tmp_path, image_writer):
    return image_writer(tmp_path / "bird.jpg", np.random.default_rng(0), (500, 375))


def test_against_torchvision_transforms(cub_sized_jpeg):
    """View 0, normalised on the device side, is exactly GoogLeNet_Weights.IMAGENET1K_V1.transforms()."""
    from torchvision.models import GoogLeNet_Weights

    pre = load_backbone("googlenet", "none").preprocess
    assert (pre.resize, pre.crop) == (256, 224)
    ds = ViewDataset(cub_sized_jpeg.parent, [Sample("bird.jpg", 7)], "test", pre, ViewSpec(crop=224, test_flip=True))
    item = ds[0]
    assert item["views"].shape == (2, 3, 224, 224) and item["views"].dtype == torch.uint8 and not item["error"]
    ours = pre.normalize(item["views"])
    reference = GoogLeNet_Weights.IMAGENET1K_V1.transforms()(Image.open(cub_sized_jpeg).convert("RGB"))
    torch.testing.assert_close(ours[0], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], reference.flip(-1), atol=1e-5, rtol=0)


def _find_window(big: np.ndarray, view: np.ndarray) -> tuple[int, int, bool] | None:
    """Brute force: where in ``big`` (H, W, 3) the (3, c, c) ``view`` was cut, and whether it is mirrored."""
    c = view.shape[-1]
    v = view.transpose(1, 2, 0)
    for flipped in (False, True):
        target = v[:, ::-1] if flipped else v
        for top in range(big.shape[0] - c + 1):
            for left in range(big.shape[1] - c + 1):
                if np.array_equal(big[top:top + c, left:left + c], target):
                    return top, left, flipped
    return None


def test_random_views_are_seeded_crops_of_the_resized_image(tmp_path, image_writer):
    path = image_writer(tmp_path / "a.jpg", np.random.default_rng(1), (80, 64))
    resized = resize_shorter(load_rgb(path), 40)
    assert resized.shape == (40, 50, 3)
    spec = ViewSpec(crop=32, train_views=6, seed=3)
    views = spec.cut(resized, 5, "train")
    assert views.shape == (6, 3, 32, 32)
    assert _find_window(resized, views[0]) == (4, 9, False)  # centre: round((40-32)/2), round((50-32)/2)
    windows = [_find_window(resized, v) for v in views[1:]]
    assert all(w is not None for w in windows)
    assert len(set(windows)) > 1 and {w[2] for w in windows} == {False, True}  # varied, both orientations
    # per (seed, image index, view): independent of P and reproducible; another seed or image differs
    np.testing.assert_array_equal(ViewSpec(crop=32, train_views=3, seed=3).cut(resized, 5, "train"), views[:3])
    other_seed = ViewSpec(crop=32, train_views=6, seed=4).cut(resized, 5, "train")
    np.testing.assert_array_equal(other_seed[0], views[0])
    assert not np.array_equal(other_seed[1:], views[1:])
    assert not np.array_equal(spec.cut(resized, 6, "train")[1:], views[1:])


def test_test_split_gets_centre_and_optional_mirror(tmp_path, image_writer):
    resized = resize_shorter(load_rgb(image_writer(tmp_path / "a.jpg", np.random.default_rng(2))), 40)
    assert ViewSpec(crop=32, train_views=5).cut(resized, 0, "test").shape == (1, 3, 32, 32)
    two = ViewSpec(crop=32, train_views=5, test_flip=True).cut(resized, 0, "test")
    np.testing.assert_array_equal(two[1], two[0][:, :, ::-1])


def test_bad_images_name_the_file(tmp_path, image_writer):
    good = image_writer(tmp_path / "good.jpg", np.random.default_rng(3), (500, 375))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name, msg in (("truncated.jpg", "truncated"), ("text.jpg", "cannot decode"), ("gone.jpg", "not found")):
        with pytest.raises(BadImageError, match=msg) as err:
            load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    pre = load_backbone("googlenet", "none").preprocess
    ds = ViewDataset(tmp_path, [Sample("truncated.jpg", 0)], "train", pre, ViewSpec(crop=224, train_views=2))
    item = ds[0]  # returned, not raised: the loop decides
    assert "truncated.jpg" in item["error"] and item["views"].shape == (2, 3, 224, 224)
