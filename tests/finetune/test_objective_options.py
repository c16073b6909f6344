"""finetune takes fit-heads' DVML objective options (issue 14): they reach the heads, the losses, the recorded
config and the trained run; runs from before them keep the paper's heads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvml import runs as R
from dvml.cli import app
from dvml.errors import DvmlError
from dvml.finetune import distributed as D
from dvml.finetune import finetune, load_finetuned
from dvml.finetune.config import LEGACY_HEAD_FIELDS
from dvml.finetune.model import init_model
from dvml.finetune.train import _Finetune
from dvml.heads.config import Likelihood, Reduction, VarianceScale, VarianceSpace
from dvml.heads.objective import TERMS
from dvml.losses import MetricReduction

from .test_finetune_train import PAPER_HEADS, cli_args, small_cfg

#: Every option away from its default.
REMEDIES = dict(likelihood="l2", variance_space="raw", variance_scale="unit", variance_kappa=0.5, free_bits=0.05,
                metric_grad_to_variance=True, centre_mu=True, reduction="mean", metric_reduction="mean",
                synthetic_pairs="cross")


def test_the_model_and_both_losses_receive_the_options(tiny_cub: Path, tmp_path: Path):
    """init_model's heads, metric and DVML loss, and the training loop's gathered loss, carry the options."""
    for kw, want in ((REMEDIES, REMEDIES),
                     ({}, dict(likelihood="gaussian", variance_space="normalized", variance_scale="class",
                               variance_kappa=1.0, free_bits=0.0, metric_grad_to_variance=False, centre_mu=False,
                               reduction="sum", metric_reduction="sum", synthetic_pairs="within"))):  # fit-heads'
        # defaults for triplet
        cfg = small_cfg(tiny_cub, tmp_path / f"run{len(kw)}", **kw)
        run = _Finetune(cfg, D.DistContext(), None, None)  # what finetune() trains with (one process)
        for model in (init_model(cfg, n_classes=3), run.model):
            heads = model.net.heads
            assert (heads.variance_space, heads.variance_scale, heads.variance_kappa, heads.metric_grad_to_variance,
                    heads.centre_mu) == tuple(want[k] for k in ("variance_space", "variance_scale", "variance_kappa",
                                                                 "metric_grad_to_variance", "centre_mu"))
            assert model.metric.reducer == want["metric_reduction"]
        for loss in (run.model.loss, run.train_loss):
            assert (loss.likelihood, loss.reduction, loss.free_bits, loss.synthetic_pairs) == (
                want["likelihood"], want["reduction"], want["free_bits"], want["synthetic_pairs"])
        assert run.train_loss.gather is D.gather_batch and run.model.loss.gather is None
        assert run.train_loss.metric.inner is run.model.metric  # GatheredMetric around the same metric loss


def _finite_terms(out: Path) -> dict:
    records = R.read_log(out)
    assert records and all(math.isfinite(r[k]) for r in records for k in TERMS), records
    return records[-1]


def test_tiny_runs_record_the_options_and_train(tiny_cub: Path, tmp_path: Path):
    """`dvml finetune` with every option away from its default, and with the defaults: config.json records the
    options as strings, the loss terms are finite, and the saved heads are built with them."""
    runner = CliRunner()
    short = dict(epochs=2, steps_per_epoch=1)
    for name, kw in (("remedies", REMEDIES), ("defaults", {})):
        out = tmp_path / name
        r = runner.invoke(app, ["finetune", *cli_args(tiny_cub, out, **short, **kw)])
        assert r.exit_code == 0, r.output
        conf = json.loads((out / R.CONFIG_FILE).read_text())["config"]
        want = REMEDIES if kw else dict(
            likelihood="gaussian", variance_space="normalized", variance_scale="class", reduction="sum",
            metric_reduction="sum", standardize=False)
        assert {k: conf[k] for k in want} == want
        assert all(type(conf[k]) is str for k in ("likelihood", "variance_space", "variance_scale"))
        _finite_terms(out)
        heads = load_finetuned(out, read_index=False).heads
        assert (heads.variance_space, heads.variance_scale) == (conf["variance_space"], conf["variance_scale"])


def test_a_noise_arm_run_loads_back_as_the_noise_arm(tiny_cub: Path, tmp_path: Path):
    """A finetune run trained with ``variance_source=noise`` (no μ, log σ² layers) is read back with that source:
    its heads load (a learned-source model would miss nothing but have extra layers) and draw noise."""
    out = tmp_path / "noise"
    finetune(small_cfg(tiny_cub, out, epochs=1, steps_per_epoch=1, variance_source="noise"))
    assert json.loads((out / R.CONFIG_FILE).read_text())["config"]["variance_source"] == "noise"
    heads = load_finetuned(out, read_index=False).heads
    assert heads.variance_source.value == "noise"
    assert not any(k.startswith(("mu", "logvar")) for k in heads.state_dict())


def test_bad_choices_and_standardize_are_refused(tiny_cub: Path, tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", *cli_args(tiny_cub, tmp_path / "a"), "--likelihood", "laplace"])
    assert r.exit_code == 2 and "--likelihood" in r.output and "'l2'" in r.output and "'gaussian'" in r.output
    r = runner.invoke(app, ["finetune", *cli_args(tiny_cub, tmp_path / "b"), "--standardize"])
    assert r.exit_code == 1 and "--standardize is for fit-heads only" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    cfg = small_cfg(tiny_cub, tmp_path / "c", likelihood="l2", variance_scale="class", metric_reduction="nonzero")
    assert (cfg.likelihood, cfg.variance_scale, cfg.metric_reduction, cfg.reduction) == (
        Likelihood.l2, VarianceScale.class_, MetricReduction.nonzero, Reduction.sum)
    assert cfg.to_dict()["variance_scale"] == "class"


def _strip_options(out: Path) -> None:
    """Make ``out`` a run as finetune wrote it before the options existed: no such keys in its three files."""
    def strip(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in LEGACY_HEAD_FIELDS}

    conf = json.loads((out / R.CONFIG_FILE).read_text())
    (out / R.CONFIG_FILE).write_text(json.dumps({**conf, "config": strip(conf["config"])}))
    for name in (R.CHECKPOINT_FILE, R.HEADS_FILE):
        ckpt = torch.load(out / name, weights_only=False)
        torch.save({**ckpt, "config": strip(ckpt["config"])}, out / name)


def test_a_run_from_before_the_options_loads_and_resumes_as_the_paper_heads(tiny_cub: Path, tmp_path: Path):
    out = tmp_path / "old"
    finetune(small_cfg(tiny_cub, out, epochs=1, steps_per_epoch=1, **PAPER_HEADS))
    _strip_options(out)
    heads = load_finetuned(out, read_index=False).heads
    assert (heads.variance_space, heads.variance_scale, heads.centre_mu) == (VarianceSpace.raw, VarianceScale.unit,
                                                                              False)
    with pytest.raises(DvmlError, match="resume with a different config.*likelihood: 'l2' -> 'gaussian'.*rerun with "
                                         "the original options or use overwrite$"):
        finetune(small_cfg(tiny_cub, out, epochs=2, steps_per_epoch=1, resume=True))  # today's defaults
    finetune(small_cfg(tiny_cub, out, epochs=2, steps_per_epoch=1, resume=True, **PAPER_HEADS))
    assert json.loads((out / R.CONFIG_FILE).read_text())["epochs_done"] == 2
    assert _finite_terms(out)["epoch"] == 2
