"""``dvml.extract.backbone``: GoogLeNet with fc = Identity, weights sources, the offline message."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from dvml.cli.fields import flag_message
from dvml.errors import DvmlError
from dvml.extract.backbone import load_backbone


def _torchvision_layout_state_dict(seed: int) -> dict:
    """A state dict shaped like torchvision's IMAGENET1K_V1 file (aux heads and fc included)."""
    from torchvision.models import googlenet

    torch.manual_seed(seed)
    return googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()


def test_none_is_a_seeded_googlenet_with_identity_fc():
    a, b = load_backbone("googlenet", "none"), load_backbone("googlenet", "none")
    assert isinstance(a.model.fc, nn.Identity) and a.model.aux1 is None and not a.model.training
    assert not a.transform_input and a.weights.startswith("none") and a.feature_dim == 1024
    x = a.preprocess.normalize(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    with torch.inference_mode():
        fa, fb = a.model(x), b.model(x)
        fc = load_backbone("googlenet", "none", init_seed=1).model(x)
    assert fa.shape == (2, 1024)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert not torch.allclose(fa, fc)
    # unit-scale activations: float16 storage keeps them (torchvision's own init would underflow to zero)
    assert fa.to(torch.float16).float().abs().mean() > 1e-2


def test_against_torchvision_googlenet_for_a_state_dict_file(tmp_path):
    """A state dict file loads into the same network torchvision builds from it (aux/fc dropped)."""
    from torchvision.models import googlenet

    state = _torchvision_layout_state_dict(5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "g.pth")
    ours = load_backbone("googlenet", tmp_path / "g.pth")
    assert ours.transform_input and ours.weights.startswith("state_dict:g.pth:")
    reference = googlenet(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    reference.load_state_dict(state)
    reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours.model(x), reference(x))
    # the recorded digest is of the content, not the file name
    torch.save(state, tmp_path / "h.pth")
    assert load_backbone("googlenet", tmp_path / "h.pth").weights.split(":")[-1] == ours.weights.split(":")[-1]


def test_a_file_carrying_transform_input_sets_the_default(tmp_path):
    """dvml finetune's backbone.pt layout: {"backbone": state dict, "transform_input": bool, ...}."""
    none = load_backbone("googlenet", "none")
    torch.save({"backbone": none.model.state_dict(), "transform_input": False, "global_step": 3},
               tmp_path / "backbone.pt")
    loaded = load_backbone("googlenet", tmp_path / "backbone.pt")
    assert loaded.transform_input is False
    assert load_backbone("googlenet", tmp_path / "backbone.pt", transform_input=True).transform_input is True
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), none.model(x), rtol=0, atol=0)


def test_bad_weights_files_are_named(tmp_path):
    with pytest.raises(DvmlError, match="no such file"):
        load_backbone("googlenet", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(DvmlError, match="junk.pth: cannot be loaded"):
        load_backbone("googlenet", tmp_path / "junk.pth")
    torch.save({"conv1.conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(DvmlError, match="wrong.pth: does not match torchvision's googlenet"):
        load_backbone("googlenet", tmp_path / "wrong.pth")


def test_imagenet_offline_names_the_file_torchvision_expects(monkeypatch, tmp_path):
    import torchvision.models._api as api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(DvmlError) as err:
        load_backbone("googlenet", "imagenet")
    msg = str(err.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "googlenet-1378be20.pth"
    assert str(expected) in msg and "pass weights PATH" in msg and "googlenet-1378be20.pth" in msg
    assert "pass --weights PATH" in flag_message(err.value)  # the field, as the CLI shows it


def test_imagenet_loads_what_torchvision_provides(monkeypatch):
    import torchvision.models._api as api

    state = _torchvision_layout_state_dict(7)
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *a, **k: state)
    bb = load_backbone("googlenet", "imagenet")
    assert bb.transform_input and bb.weights == "torchvision:GoogLeNet_Weights.IMAGENET1K_V1"
    assert isinstance(bb.model.fc, nn.Identity)
    torch.testing.assert_close(bb.model.conv1.conv.weight, state["conv1.conv.weight"])
