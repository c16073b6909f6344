"""The loss registry: one entry is a loss, for the library and the CLI alike (a toy loss fitted end to end)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dvml.heads.config import FitConfig, default_batch_size, default_per_class
from dvml.losses import CROSS_PAIR_LOSSES, LOSS_PARAM_DEFAULTS, PROXY_LOSSES, LossName, make_metric_loss
from dvml.losses.metric import LoopOverT
from dvml.losses.names import DOT_PRODUCT_LOSSES
from dvml.losses.registry import LossKey, LossSpec, loss_names, loss_spec, register_loss, unregister_loss

runner = CliRunner()
TOY = "toy-centroid"


class CentroidSoftmax(nn.Module):
    """Toy loss: cross-entropy of the cosine logits (/ temperature) of each embedding against its batch's class
    centroids."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings, labels):
        u = F.normalize(embeddings, dim=-1)
        classes, target = torch.unique(labels, return_inverse=True)
        centroids = F.normalize(torch.stack([u[labels == c].mean(0) for c in classes]), dim=-1)
        return F.cross_entropy(u @ centroids.T / self.temperature, target)


@pytest.fixture
def toy_loss():
    calls = []

    def factory(num_classes, embedding_size, *, temperature):
        calls.append({"num_classes": num_classes, "embedding_size": embedding_size, "temperature": temperature})
        return CentroidSoftmax(temperature)

    register_loss(LossSpec(TOY, factory, params={"temperature": 0.5}, batch_size=24, per_class=3))
    yield calls
    unregister_loss(TOY)


def test_derived_names_and_traits_match_the_registry():
    assert [n.value for n in LossName] == list(loss_names())[:len(LossName)]
    assert LossName("triplet-dws") is LossName.triplet_dws
    assert PROXY_LOSSES == {LossName.proxy_nca, LossName.proxy_anchor, LossName.dr_proxy_nca, LossName.proxy_nca_pp}
    assert CROSS_PAIR_LOSSES == {LossName.triplet, LossName.triplet_dws, LossName.npair}
    assert DOT_PRODUCT_LOSSES == {LossName.npair}
    assert LOSS_PARAM_DEFAULTS[LossName.triplet] == {"margin": 0.2} and LossName.npair not in LOSS_PARAM_DEFAULTS
    assert (default_batch_size(LossName.triplet), default_batch_size(LossName.npair)) == (120, 128)
    assert (default_per_class(LossName.npair), default_per_class(LossName.proxy_anchor)) == (2, 4)


def test_a_registered_loss_is_a_config_choice(toy_loss):
    cfg = FitConfig(cache="c.h5", out="o", loss=TOY)
    assert isinstance(cfg.loss, LossKey) and cfg.loss.value == TOY
    assert (cfg.batch_size, cfg.per_class, cfg.temperature, cfg.margin) == (24, 3, 0.5, None)
    assert cfg.to_dict()["loss"] == TOY and FitConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="does not apply"):
        FitConfig(cache="c.h5", out="o", loss=TOY, margin=0.1)
    metric = make_metric_loss(TOY, num_classes=5, embedding_size=8, temperature=0.25)
    assert isinstance(metric, LoopOverT) and toy_loss[-1] == {"num_classes": 5, "embedding_size": 8,
                                                              "temperature": 0.25}
    with pytest.raises(ValueError, match="already registered"):
        register_loss(loss_spec(TOY))
    with pytest.raises(ValueError, match="built-in"):
        unregister_loss("triplet")


def test_a_registered_loss_fits_through_the_cli(tmp_path, toy_loss):
    from dvml.cli import app

    cache, out = tmp_path / "w.h5", tmp_path / "run"
    r = runner.invoke(app, ["synth", str(cache), "--classes", "16", "--images-per-class", "8", "--views", "2",
                            "--feature-dim", "32", "--class-dim", "16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(out), "--loss", TOY, "--temperature", "0.3",
                            "--epochs", "2", "--embedding-size", "16", "--decoder-hidden", "16", "-T", "3",
                            "--phase2-epoch", "1", "--kl-warmup-epochs", "1", "--eval-every", "1"])
    assert r.exit_code == 0, r.output
    assert toy_loss == [{"num_classes": 8, "embedding_size": 16, "temperature": 0.3}]  # built once, as asked
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["loss"], cfg["temperature"], cfg["per_class"], cfg["batch_size"]) == (TOY, 0.3, 3, 24)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 < rec["metric_invariant"] < 10 for rec in records)
    r = runner.invoke(app, ["evaluate", str(out)])
    assert r.exit_code == 0, r.output

    unregister_loss(TOY)  # the same command is refused once the loss is gone
    r = runner.invoke(app, ["fit-heads", str(cache), "--out", str(tmp_path / "r2"), "--loss", TOY])
    assert r.exit_code == 2 and "is not one of" in r.output
    register_loss(LossSpec(TOY, CentroidSoftmax, params={"temperature": 0.5}))  # for the fixture's clean-up


def test_tune_takes_a_loss_name_as_the_fits_do(toy_loss, tmp_path):
    from dvml.experiments.tune import TuneConfig

    assert TuneConfig(cache=tmp_path / "c.h5", loss="triplet-dws").loss is LossName.triplet_dws
    assert TuneConfig(cache=tmp_path / "c.h5", loss=TOY).loss == TOY
    with pytest.raises(ValueError, match="^loss must be one of triplet, npair, .*, got 'nope'$"):
        TuneConfig(cache=tmp_path / "c.h5", loss="nope")
