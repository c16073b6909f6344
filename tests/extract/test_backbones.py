"""``dvml.extract.backbone`` beyond GoogLeNet: torchvision models by name, ``timm:NAME``, TorchScript files,
the offline messages, and the cache recording what each backbone needs (dimension, preprocessing, views).

References are the libraries themselves: torchvision's model with its classifier replaced by hand, timm's
``num_classes=0`` model and data config, the eager module a TorchScript file was exported from."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dvml.cache import load_split, read_info
from dvml.cli import app
from dvml.cli.fields import flag_message
from dvml.errors import DvmlError
from dvml.extract.backbone import (
    Preprocess,
    backbone_from_cache,
    load_backbone,
    parse_spec,
    save_torchscript,
)
from dvml.extract.datasets import read_dataset
from dvml.extract.extractor import ExtractConfig, run
from dvml.extract.transforms import ViewDataset, ViewSpec, collate_views

runner = CliRunner()


def _torchvision_reference(name: str, seed: int, head: str) -> nn.Module:
    """torchvision's model built with the same seed, its classifier's last Linear replaced by hand."""
    from torchvision import models

    torch.manual_seed(seed)
    model = models.get_model(name, weights=None)
    parent, _, attr = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model.eval()


def test_resnet18_none_is_torchvisions_resnet18_without_fc():
    from torchvision.models import ResNet18_Weights

    bb = load_backbone("resnet18", "none", init_seed=3)
    assert (bb.name, bb.feature_dim, bb.transform_input) == ("torchvision.resnet18", 512, None)
    assert bb.weights == "none(random init, seed=3)" and "fc = Identity" in bb.feature
    t = ResNet18_Weights.DEFAULT.transforms()  # preprocessing from the weights enum, even for random weights
    assert (bb.preprocess.resize, bb.preprocess.crop) == (t.resize_size[0], t.crop_size[0])
    assert bb.preprocess.mean == pytest.approx(t.mean) and bb.preprocess.interpolation == t.interpolation.value
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), _torchvision_reference("resnet18", 3, "fc")(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,head,dim,crop,resize", [
    ("mobilenet_v3_small", "classifier.3", 1024, 224, 256),
    ("efficientnet_b0", "classifier.1", 1280, 224, 256),
    ("inception_v3", "fc", 2048, 299, 342),
    ("vit_b_16", "heads.head", 768, 224, 256),
])
def test_torchvision_heads_and_input_sizes_come_from_the_model(name, head, dim, crop, resize):
    from torchvision.models import get_model_weights

    bb = load_backbone(name, "none")
    assert bb.feature_dim == dim and f"({head} = Identity)" in bb.feature
    assert isinstance(bb.model.get_submodule(head), nn.Identity)
    t = get_model_weights(name).DEFAULT.transforms()
    assert (bb.preprocess.crop, bb.preprocess.resize) == (crop, resize) == (t.crop_size[0], t.resize_size[0])
    if name == "mobilenet_v3_small":  # the feature is what the last Linear would have seen
        x = torch.randn(2, 3, 64, 64)
        with torch.inference_mode():
            torch.testing.assert_close(bb.model(x), _torchvision_reference(name, 0, head)(x), rtol=0, atol=0)
    if name == "inception_v3":
        assert bb.transform_input is False and bb.model.AuxLogits is None


def test_bad_specs_are_named(tmp_path):
    with pytest.raises(DvmlError, match="resnet51: not a torchvision classification model"):
        parse_spec("resnet51")
    with pytest.raises(DvmlError, match="no such model file"):
        parse_spec(str(tmp_path / "model.pt"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(DvmlError, match="junk.pt: not a TorchScript model file"):
        load_backbone(tmp_path / "junk.pt")
    with pytest.raises(DvmlError, match="no Linear classifier"):
        load_backbone("squeezenet1_0", "none")
    with pytest.raises(DvmlError, match="^transform_input applies to"):
        load_backbone("resnet18", "none", transform_input=True)
    assert parse_spec("torchvision.googlenet") == parse_spec("googlenet") == parse_spec("torchvision:googlenet")
    assert parse_spec("timm:resnet50.a1_in1k").kind == "timm"


def test_torchvision_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(9)
    full = resnet18().eval()
    torch.save({"model": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "r18.pth")
    bb = load_backbone("resnet18", tmp_path / "r18.pth")
    assert bb.weights.startswith("state_dict:r18.pth:")
    full.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), full(x), rtol=0, atol=0)
    with pytest.raises(DvmlError, match="r18.pth: does not match torchvision's resnet34"):
        load_backbone("resnet34", tmp_path / "r18.pth")


def test_torchvision_imagenet_offline_names_the_file_and_directory(monkeypatch, tmp_path):
    import torchvision.models._api as api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(DvmlError) as err:
        load_backbone("resnet18", "imagenet")
    msg = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "pass weights PATH" in msg
    assert "pass --weights PATH" in flag_message(err.value)


# --------------------------------------------------------------------------- timm (optional extra)

def test_timm_model_matches_timm_num_classes_0():
    timm = pytest.importorskip("timm")

    bb = load_backbone("timm:test_vit", "none", init_seed=2)
    torch.manual_seed(2)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    cfg = timm.data.resolve_model_data_config(ref)
    assert bb.name == "timm:test_vit" and bb.feature_dim == ref.num_features == 64
    assert bb.preprocess.crop == cfg["input_size"][-1] == 160
    # timm's eval transform resizes the shorter side to floor(160 / crop_pct) then centre-crops 160
    resize = timm.data.create_transform(**cfg, is_training=False).transforms[0]
    assert bb.preprocess.resize == resize.size[0] if isinstance(resize.size, (list, tuple)) else resize.size
    assert bb.preprocess.interpolation == cfg["interpolation"] == "bicubic"
    assert bb.preprocess.mean == pytest.approx(cfg["mean"]) and bb.preprocess.std == pytest.approx(cfg["std"])
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), ref(x), rtol=0, atol=0)


def test_timm_state_dict_file_and_offline_message(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    torch.manual_seed(4)
    full = timm.create_model("test_vit", pretrained=False).eval()  # with its classifier: dropped on load
    torch.save(full.state_dict(), tmp_path / "tv.pth")
    bb = load_backbone("timm:test_vit", tmp_path / "tv.pth")
    assert bb.weights.startswith("state_dict:tv.pth:")
    full.reset_classifier(0)
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model(x), full(x), rtol=0, atol=0)

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no network: fail at once instead of retrying
    with pytest.raises(DvmlError) as err:
        load_backbone("timm:test_vit", "imagenet")
    msg = str(err.value)
    assert "timm/test_vit.r160_in1k" in msg and str(hf.HF_HUB_CACHE) in msg and "pass weights PATH" in msg
    assert "pass --weights PATH" in flag_message(err.value)


# --------------------------------------------------------------------------- TorchScript files

class _SizeCheckingNet(nn.Module):
    """Refuses any input that is not (B, 3, 40, 40): proves the views are cut at the file's stored size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 40 or x.shape[-2] != 40:
            raise RuntimeError("wrong input size")
        return self.proj(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _r18_file(tmp_path, crop: int = 48):
    bb = load_backbone("resnet18", "none", init_seed=1)
    pre = bb.preprocess.with_sizes(resize=round(crop / 0.875), crop=crop)
    return bb, pre, save_torchscript(bb.model, pre, tmp_path / "r18.pt", note="resnet18 random")


def test_torchscript_file_extracts_what_its_module_extracts(tmp_path, tiny_cub):
    from dataclasses import replace

    bb, pre, path = _r18_file(tmp_path)
    ts = load_backbone(path)
    assert ts.preprocess == pre and ts.feature_dim == 512 and ts.name == "torchscript:r18.pt"
    assert ts.weights.startswith("file:r18.pt:") and ts.source["model_file"] == str(path.resolve())
    common = dict(dataset="cub", root=tiny_cub, views=3, workers=0, batch_size=4, dtype="float32")
    run(ExtractConfig(out=tmp_path / "module.h5", **common), backbone=replace(bb, preprocess=pre))
    run(ExtractConfig(out=tmp_path / "file.h5", backbone=str(path), **common))
    for split in ("train", "test"):
        a, b = load_split(tmp_path / "module.h5", split), load_split(tmp_path / "file.h5", split)
        assert np.abs(a.features - b.features).max() <= 1e-5
        assert a.features.std() > 0
    info = read_info(tmp_path / "file.h5")
    assert (info.backbone, info.feature_dim) == ("torchscript:r18.pt", 512)
    assert Preprocess.from_dict(info.preprocess) == pre
    recorded = backbone_from_cache(info)
    assert recorded.load().weights == info.weights and recorded.preprocess == pre
    save_torchscript(load_backbone("resnet18", "none", init_seed=2).model, pre, path)  # another model, same name
    with pytest.raises(DvmlError, match="differs from the model file the cache was made with"):
        recorded.load()


@pytest.mark.parametrize("weights", ["none", "state_dict"])
def test_backbone_from_cache_rebuilds_the_network_that_wrote_it(tmp_path, tiny_cub, weights):
    """A cache's recorded backbone, rebuilt, embeds the cache's own images to the cache's features."""
    from torchvision.models import resnet18

    if weights == "state_dict":
        torch.manual_seed(6)
        torch.save(resnet18().state_dict(), tmp_path / "mine.pth")
        weights = str(tmp_path / "mine.pth")
    out = tmp_path / "c.h5"
    run(ExtractConfig(dataset="cub", root=tiny_cub, out=out, backbone="resnet18", weights=weights, views=1,
                      crop=48, workers=0, dtype="float32"))
    info = read_info(out)
    recorded = backbone_from_cache(info)
    assert recorded.spec == "resnet18" and recorded.preprocess.crop == 48 and recorded.preprocess.resize == 55
    if weights != "none":
        with pytest.raises(DvmlError, match="local state dict mine.pth"):
            recorded.load()
        torch.save(resnet18().state_dict(), tmp_path / "other.pth")
        with pytest.raises(DvmlError, match="differs from the state dict the cache was made with"):
            recorded.load(tmp_path / "other.pth")
    bb = recorded.load(weights if weights != "none" else None)
    test = load_split(out, "test")
    index = read_dataset("cub", tiny_cub)
    views = collate_views([ViewDataset(tiny_cub, index.test, "test", bb.preprocess, ViewSpec(crop=48))[i]
                           for i in range(len(index.test))])["views"][:, 0]
    with torch.inference_mode():
        mine = bb.model(bb.preprocess.normalize(views)).numpy()
    assert np.abs(mine - test.features[:, 0]).max() <= 1e-4


def test_views_follow_the_files_input_size(tmp_path, tiny_cub):
    pre = Preprocess(resize=46, crop=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic")
    path = save_torchscript(_SizeCheckingNet(), pre, tmp_path / "net.pt", method="script")
    out = tmp_path / "c.h5"
    r = runner.invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(out), "--backbone", str(path),
                            "--views", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output
    info = read_info(out)
    assert info.feature_dim == 6 and info.views[0] == "centre(resize=46,crop=40)"
    assert info.preprocess == {**pre.as_dict()} and info.extra["preprocess"]["interpolation"] == "bicubic"
    r = runner.invoke(app, ["cache", "info", str(out), "--no-fingerprint"])
    assert r.exit_code == 0 and all(f in r.output for f in ("preprocess", "resize 46 (bicubic)", "crop 40"))
    # an override that the network refuses fails loudly (no silent resize)
    r = runner.invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(tmp_path / "d.h5"),
                            "--backbone", str(path), "--crop", "32", "--workers", "0"])
    assert r.exit_code != 0


def test_a_file_without_stored_preprocessing_needs_options(tmp_path, tiny_cub):
    torch.jit.save(torch.jit.script(_SizeCheckingNet()), str(tmp_path / "bare.pt"))
    base = ["extract", "cub", "--root", str(tiny_cub), "--backbone", str(tmp_path / "bare.pt"), "--workers", "0"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 1 and "bare.pt stores no preprocessing" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b.h5"), "--crop", "40", "--mean", "0.5,0.5,0.5",
                            "--std", "0.2,0.2,0.2"])
    assert r.exit_code == 0, r.output
    info = read_info(tmp_path / "b.h5")
    assert info.preprocess == {"resize": 46, "crop": 40, "mean": [0.5] * 3, "std": [0.2] * 3,
                               "interpolation": "bilinear"}
    assert info.feature_dim == 6  # found by one forward pass
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "c.h5"), "--crop", "40", "--mean", "0.5,0.5",
                            "--std", "0.2,0.2,0.2"])
    assert r.exit_code == 1 and "--mean needs three" in r.output


# --------------------------------------------------------------------------- end to end: extract -> fit -> evaluate

def _extract_fit_evaluate(tmp_path, root, backbone: str, dim: int, crop: int):
    out = tmp_path / "cub.h5"
    r = runner.invoke(app, ["extract", "cub", "--root", str(root), "--out", str(out), "--backbone", backbone,
                            "--weights", "none", "--views", "2", "--workers", "0", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    info = read_info(out)
    assert info.feature_dim == dim and info.extra["feature_dim"] == dim
    assert info.preprocess["crop"] == crop and info.views[0].endswith(f"crop={crop})")
    assert json.loads(json.dumps(info.preprocess)) == info.extra["preprocess"]
    assert load_split(out, "train").features.shape == (9, 2, dim)
    run_dir = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(out), "--out", str(run_dir), "--epochs", "2", "--embedding-size", "8",
                            "--decoder-hidden", "16", "-T", "2", "--batch-size", "6", "--per-class", "2",
                            "--device", "cpu", "--eval-every", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(run_dir), "--ks", "1,2"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["recall@1"] <= 1
    return info


def test_resnet18_extract_fit_evaluate(tmp_path, tiny_cub):
    info = _extract_fit_evaluate(tmp_path, tiny_cub, "resnet18", 512, 224)
    assert info.backbone == "torchvision.resnet18" and info.preprocess["resize"] == 256


def test_timm_extract_fit_evaluate(tmp_path, tiny_cub):
    pytest.importorskip("timm")
    info = _extract_fit_evaluate(tmp_path, tiny_cub, "timm:test_vit", 64, 160)
    assert info.backbone == "timm:test_vit" and info.preprocess["resize"] == 168
    assert info.preprocess["interpolation"] == "bicubic" and info.preprocess["mean"] == [0.5, 0.5, 0.5]


def test_timm_missing_is_one_clear_error(monkeypatch, tmp_path, tiny_cub):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if the optional extra were not installed
    r = runner.invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(tmp_path / "o.h5"),
                            "--backbone", "timm:resnet50.a1_in1k", "--workers", "0"])
    assert r.exit_code == 1 and "needs timm: pip install 'dvml[timm]'" in r.output and "Traceback" not in r.output
