"""fit(): learning on a synth world, determinism, resume, NaN handling, the run directory, embed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dvml.cache import Split, fingerprint, load_split
from dvml.errors import DvmlError
from dvml.evaluate import evaluate_embeddings
from dvml.heads import FitConfig, embed, fit
from dvml.heads import objective as loss_module
from dvml.heads.config import DEFAULT_PROXY_LR
from dvml.runs import load_checkpoint, load_run, read_log

FAST = dict(embedding_size=16, decoder_hidden=16, samples=3, batch_size=16, per_class=4, lr=3e-3,
            kl_warmup_epochs=1, phase2_epoch=1, eval_every=0)


def _cfg(cache, out, **kw):
    return FitConfig(cache=cache, out=out, **{**FAST, **kw})


def _r1(emb, labels):
    return evaluate_embeddings(emb, labels, ks=(1,), clustering=False)["recall@1"]


@pytest.mark.parametrize("dvml", [False, True])
def test_short_fit_raises_test_recall_well_above_raw_features(small_cache, tmp_path, dvml):
    test = load_split(small_cache, "test", views=[0])
    raw = _r1(test.features[:, 0], test.labels)
    cfg = FitConfig(cache=small_cache, out=tmp_path / "run", dvml=dvml, embedding_size=32, decoder_hidden=32,
                    samples=4, batch_size=32, lr=3e-3, epochs=6, phase2_epoch=3, kl_warmup_epochs=2, eval_every=3)
    run_dir = fit(cfg)
    learned = _r1(embed(run_dir, test.features[:, 0]), test.labels)
    assert learned > raw + 0.1, (raw, learned)
    logged = [r["test_recall@1"] for r in read_log(run_dir) if "test_recall@1" in r]
    assert len(logged) == 2 and logged[-1] == pytest.approx(learned, abs=1e-6)


def test_same_seed_gives_identical_runs_and_another_seed_does_not(tiny_cache, tmp_path):
    runs = [fit(_cfg(tiny_cache, tmp_path / name, epochs=2, seed=seed)) for name, seed in
            (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_checkpoint(r)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embedding.weight"], c["embedding.weight"])
    assert [r["total"] for r in read_log(runs[0])] == [r["total"] for r in read_log(runs[1])]


class _Stop(KeyboardInterrupt):
    pass


def test_resume_equals_uninterrupted(tiny_cache, tmp_path):
    full = fit(_cfg(tiny_cache, tmp_path / "full", epochs=4, loss="triplet-dws"))

    def stop_after_2(ev):
        if ev.kind == "epoch" and ev.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit(_cfg(tiny_cache, tmp_path / "cut", epochs=4, loss="triplet-dws"), callback=stop_after_2)
    ck = load_checkpoint(tmp_path / "cut")
    assert ck["epochs_done"] == 2 and not ck["finished"] and load_run(tmp_path / "cut").status == "running"
    with pytest.raises(DvmlError, match="pass resume to continue it or overwrite to start again$"):
        fit(_cfg(tiny_cache, tmp_path / "cut", epochs=4, loss="triplet-dws"))
    resumed = fit(_cfg(tiny_cache, tmp_path / "cut", epochs=4, loss="triplet-dws", resume=True))
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["epoch"] for r in read_log(resumed)] == [1, 2, 3, 4]
    assert [r["total"] for r in read_log(resumed)] == [r["total"] for r in read_log(full)]
    assert b["finished"] and load_run(resumed).status == "finished"


def test_resume_with_another_config_is_refused(tiny_cache, tmp_path):
    fit(_cfg(tiny_cache, tmp_path / "r", epochs=1))
    with pytest.raises(DvmlError, match="samples"):
        fit(_cfg(tiny_cache, tmp_path / "r", epochs=2, samples=5, resume=True))
    more = fit(_cfg(tiny_cache, tmp_path / "r", epochs=2, resume=True))  # more epochs is allowed
    assert load_checkpoint(more)["epochs_done"] == 2


def test_data_dependent_option_errors_say_which_option(tiny_cache, tmp_path):
    with pytest.raises(DvmlError, match="val_classes 40 holds out every training class \\(there are 12\\)"):
        fit(_cfg(tiny_cache, tmp_path / "v", epochs=1, eval_every=1, val_classes=40))
    # 10 images x 3 views = 30 (image, view) pairs per class: 32 per class cannot be drawn
    with pytest.raises(DvmlError, match="images per class x 3 views is below 32: lower per_class K\\)$"):
        fit(_cfg(tiny_cache, tmp_path / "p", epochs=1, per_class=32, batch_size=64))
    assert not (tmp_path / "v").exists() and not (tmp_path / "p").exists()


def test_finished_run_needs_overwrite(tiny_cache, tmp_path):
    fit(_cfg(tiny_cache, tmp_path / "r", epochs=1))
    with pytest.raises(DvmlError, match="pass overwrite to replace it \\(or choose another out\\)$"):
        fit(_cfg(tiny_cache, tmp_path / "r", epochs=1))
    (tmp_path / "r" / "metrics.json").write_text("{}")
    fit(_cfg(tiny_cache, tmp_path / "r", epochs=1, seed=3, overwrite=True))
    assert load_checkpoint(tmp_path / "r")["seed"] == 3
    assert not (tmp_path / "r" / "metrics.json").exists()  # stale metrics of the replaced run are gone


def _finished_run_with_derived(cache, out):
    fit(_cfg(cache, out, epochs=1))
    (out / "metrics.json").write_text('{"recall@1": 0.5}')
    (out / "analysis").mkdir()
    (out / "analysis" / "analysis.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a run file: never touched
    return (out / "heads.pt").read_bytes()


def test_overwrite_replaces_derived_files_and_keeps_others(tiny_cache, tmp_path):
    from dvml.runs import REPLACED_DIR

    out = tmp_path / "r"
    _finished_run_with_derived(tiny_cache, out)
    fit(_cfg(tiny_cache, out, epochs=1, seed=3, overwrite=True))
    assert load_checkpoint(out)["seed"] == 3
    assert not (out / "analysis").exists() and not (out / "metrics.json").exists()  # derived from the old run
    assert (out / "notes.txt").read_text() == "mine" and not (out / REPLACED_DIR).exists()


def test_overwrite_that_fails_before_a_checkpoint_puts_the_old_run_back(tiny_cache, tmp_path, monkeypatch):
    from dvml.heads import train as train_module

    out = tmp_path / "r"
    old = _finished_run_with_derived(tiny_cache, out)

    def boom(self, callback):
        raise DvmlError("failed before the first epoch")

    monkeypatch.setattr(train_module._HeadsFit, "train", boom)
    with pytest.raises(DvmlError, match="before the first epoch"):
        fit(_cfg(tiny_cache, out, epochs=1, seed=3, overwrite=True))
    assert (out / "heads.pt").read_bytes() == old and load_checkpoint(out)["seed"] == 0
    assert json.loads((out / "metrics.json").read_text()) == {"recall@1": 0.5}
    assert (out / "analysis" / "analysis.json").exists() and sorted(p.name for p in out.iterdir()) == sorted(
        ["analysis", "config.json", "heads.pt", "log.jsonl", "metrics.json", "notes.txt"])


def test_interrupted_overwrite_keeps_the_old_run_until_the_new_one_finishes(tiny_cache, tmp_path):
    from dvml.runs import REPLACED_DIR

    out = tmp_path / "r"
    old = _finished_run_with_derived(tiny_cache, out)

    def stop_after_first_epoch(event):
        if event.kind == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_cache, out, epochs=3, seed=3, overwrite=True), callback=stop_after_first_epoch)
    kept = out / REPLACED_DIR
    assert (kept / "heads.pt").read_bytes() == old and (kept / "analysis" / "analysis.json").exists()
    assert load_checkpoint(out)["epochs_done"] == 1  # the new run, resumable
    # a second --overwrite discards the unfinished replacement, not the kept finished run
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_cache, out, epochs=3, seed=4, overwrite=True), callback=stop_after_first_epoch)
    assert (kept / "heads.pt").read_bytes() == old and load_checkpoint(out)["seed"] == 4
    fit(_cfg(tiny_cache, out, epochs=3, seed=4, resume=True))  # the replacement finishes: the old run goes
    assert load_checkpoint(out)["finished"] and not kept.exists()


def test_nan_features_stop_with_an_error_naming_epoch_and_step(tiny_cache, tmp_path):
    train = load_split(tiny_cache, "train")
    bad = Split(features=np.full_like(train.features, np.nan), labels=train.labels)
    with pytest.raises(DvmlError, match=r"non-finite loss at epoch 1, step 1 of"):
        fit(_cfg(tiny_cache, tmp_path / "nan", epochs=2), train=bad)
    assert not (tmp_path / "nan" / "heads.pt").exists()


def test_nan_loss_later_keeps_the_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = loss_module.DVMLLoss.forward

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps + 3:  # epoch 2, step 3
            terms["total"] = terms["total"] * float("nan")
        return terms

    steps = len(load_split(tiny_cache, "train").labels) // FAST["batch_size"]
    monkeypatch.setattr(loss_module.DVMLLoss, "forward", poisoned)
    with pytest.raises(DvmlError, match=rf"epoch 2, step 3 of {steps}") as e:
        # grad_every=0: the count above assumes one loss forward per step (the sampled gradient statistics
        # evaluate the loss on the halves of the draws too)
        fit(_cfg(tiny_cache, tmp_path / "nan", epochs=3, grad_every=0))
    assert "last good checkpoint (epoch 1)" in str(e.value)
    ck = load_checkpoint(tmp_path / "nan")
    assert ck["epochs_done"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert [r["epoch"] for r in read_log(tmp_path / "nan")] == [1]


def test_run_directory_contract(tiny_cache, tmp_path):
    run_dir = fit(_cfg(tiny_cache, tmp_path / "r", epochs=2, eval_every=1))
    ck = torch.load(run_dir / "heads.pt", weights_only=True)
    for key in ("model", "loss", "config", "cache_fingerprint", "epoch", "versions", "seed", "resume"):
        assert key in ck
    assert ck["cache_fingerprint"] == fingerprint(tiny_cache) and ck["epoch"] == 2 and ck["selection"] == "last"
    assert "state" in ck["resume"]["optimizer"] and set(ck["resume"]["rng"]) >= {"sampler", "noise", "torch"}
    cj = json.loads((run_dir / "config.json").read_text())
    assert cj["kind"] == "heads" and cj["cache"] == str(tiny_cache.resolve()) and cj["seed"] == 0
    assert cj["config"]["samples"] == 3 and cj["cache_fingerprint"] == ck["cache_fingerprint"]
    info = load_run(run_dir)
    assert info.kind == "heads" and info.cache == tiny_cache.resolve() and info.config["embedding_size"] == 16
    log = read_log(run_dir)
    assert len(log) == 2
    for r in log:
        assert {"kl", "recon", "metric_invariant", "metric_synthetic", "total", "test_recall@1", "phase"} <= set(r)
    assert [r["phase"] for r in log] == [1, 2]


def test_embed_uses_z_i_only(tiny_cache, tmp_path):
    """Deviation 3 of public reimplementations: z_I + z_V used at test time."""
    run_dir = fit(_cfg(tiny_cache, tmp_path / "r", epochs=1))
    x = load_split(tiny_cache, "test", views=[0]).features[:, 0]
    sd = load_checkpoint(run_dir)["model"]
    expected = x @ sd["embedding.weight"].numpy().T + sd["embedding.bias"].numpy()
    got = embed(run_dir, x)
    assert got.dtype == np.float32 and got.shape == (len(x), 16)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DvmlError, match="features must be"):
        embed(run_dir, x[:, :10])


def test_validation_classes_select_the_reported_epoch(tiny_cache, tmp_path):
    run_dir = fit(_cfg(tiny_cache, tmp_path / "r", epochs=3, eval_every=1, val_classes=3))
    ck = load_checkpoint(run_dir)
    log = read_log(run_dir)
    vals = [r["val_recall@1"] for r in log]
    assert ck["selection"] == "val" and ck["epoch"] == 1 + int(np.argmax(vals))
    assert len(ck["train_classes"]) == 12 - 3


def test_proxy_loss_trains_its_proxies_in_their_own_group(tiny_cache, tmp_path):
    run_dir = fit(_cfg(tiny_cache, tmp_path / "r", epochs=1, loss="proxy-nca", proxy_lr=0.05))
    ck = load_checkpoint(run_dir)
    proxies = ck["loss"]["metric.loss.proxies"]
    assert proxies.shape == (12, 16)
    groups = ck["resume"]["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == 0.05 and groups[0]["lr"] == FAST["lr"]
    # same seed, proxies (almost) frozen: the trained proxies moved away from their seeded initialisation
    frozen = fit(_cfg(tiny_cache, tmp_path / "r0", epochs=1, loss="proxy-nca", proxy_lr=1e-12))
    assert not torch.allclose(load_checkpoint(frozen)["loss"]["metric.loss.proxies"], proxies, atol=1e-3)
    # without --proxy-lr the proxies get DEFAULT_PROXY_LR whatever the heads' lr (issue 14, seventh round)
    dflt = fit(_cfg(tiny_cache, tmp_path / "rd", epochs=1, loss="proxy-nca", lr=3e-4))
    groups = load_checkpoint(dflt)["resume"]["optimizer"]["param_groups"]
    assert groups[1]["lr"] == DEFAULT_PROXY_LR == 0.1 and groups[0]["lr"] == 3e-4
    assert json.loads((dflt / "config.json").read_text())["config"]["proxy_lr"] == 0.1


def test_cuda_request_without_cuda_is_a_clear_error(tiny_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DvmlError, match="^device cuda: CUDA is not available here"):
        fit(_cfg(tiny_cache, tmp_path / "r", epochs=1, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_the_contract(tiny_cache, tmp_path):
    run_dir = fit(_cfg(tiny_cache, tmp_path / "r", epochs=2, device="cuda", loss="triplet-dws"))
    ck = torch.load(run_dir / "heads.pt", weights_only=True, map_location="cpu")
    assert ck["model"]["embedding.weight"].device.type == "cpu" and ck["finished"]


def test_each_epoch_draws_views_beyond_the_centre_one(tiny_cache, tmp_path):
    """Only view 1 is poisoned: a fit that touched view 0 alone would finish; drawing views hits it."""
    train = load_split(tiny_cache, "train")
    feats = train.features.copy()
    feats[:, 1] = np.nan
    fit(_cfg(tiny_cache, tmp_path / "centre", epochs=1), train=Split(features=feats[:, :1], labels=train.labels))
    with pytest.raises(DvmlError, match="non-finite loss at epoch 1"):
        fit(_cfg(tiny_cache, tmp_path / "views", epochs=1), train=Split(features=feats, labels=train.labels))


@pytest.mark.parametrize("loss", ["proxy-nca-pp", "proxy-anchor"])
def test_baseline_and_dvml_start_from_the_same_proxies_at_one_seed(tiny_cache, tmp_path, loss):
    """Proxies frozen (lr ~ 0): the baseline's and DVML's checkpointed proxies are their initialisation; they agree
    at one seed although DVML builds more layers before the loss, and differ at another seed."""
    def proxies(dvml, seed):
        run = fit(_cfg(tiny_cache, tmp_path / f"{dvml}{seed}", epochs=1, loss=loss, proxy_lr=1e-12, dvml=dvml,
                       seed=seed))
        return load_checkpoint(run)["loss"]["metric.loss.proxies"]

    base = proxies(False, 0)
    torch.testing.assert_close(proxies(True, 0), base, rtol=0, atol=1e-9)
    assert not torch.allclose(proxies(False, 1), base, atol=1e-3)


def test_a_small_class_never_puts_the_same_image_and_view_twice_in_a_batch(tiny_cache, tmp_path, monkeypatch):
    """Every (image, view) feature is unique; class 0 has 2 images, per_class is 4, 3 views: the batches the loss
    sees hold each of class 0's two images twice, in two different views, and never a repeated row."""
    rng = np.random.default_rng(0)
    counts = [2] + [6] * 5
    labels = np.repeat(np.arange(len(counts)), counts)
    feats = rng.normal(size=(len(labels), 3, 64)).astype(np.float32)  # the tiny cache's D
    seen = []
    original = loss_module.DVMLLoss.forward

    def spy(self, out, x, labels_, lam=None):
        seen.append((x.detach().clone(), labels_.clone()))
        return original(self, out, x, labels_, lam)

    monkeypatch.setattr(loss_module.DVMLLoss, "forward", spy)
    fit(_cfg(tiny_cache, tmp_path / "r", epochs=20, dvml=False, batch_size=8, per_class=4),
        train=Split(features=feats, labels=labels))
    small = 0
    for x, y in seen:
        assert len(torch.unique(x, dim=0)) == len(x)  # no (image, view) twice
        rows = x[y == 0].numpy()
        if len(rows):
            small += 1
            hits = [np.argwhere((feats[:2] == r).all(axis=-1))[0] for r in rows]  # (image, view) of each row
            assert sorted(int(h[0]) for h in hits) == [0, 0, 1, 1]
    assert small > 0
