"""Bad input and faults on the command line (issue 12, items 4, 5, 6, 8, 9): each case checks the exit code, the
one-line message without a traceback, and that no file was lost or left looking complete."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dvml
from dvml import runs as R
from dvml.cache import Split, load_split
from dvml.cli import app
from dvml.errors import DvmlError
from dvml.experiments import ablate, tune
from dvml.extract.synth import SynthConfig, generate
from dvml.heads import FitConfig, fit
from dvml.heads.batch import fit_batch
from dvml.retrieval import knn

runner = CliRunner()
TINY = ["--embedding-size", "8", "--decoder-hidden", "8", "-T", "2", "--eval-every", "0", "--device", "cpu"]
SET_TINY = ["--embedding-size", "8", "--samples", "2", "--eval-every", "0", "--device", "cpu", "--set",
            "decoder_hidden=8"]


def world(path: Path, train_classes: int, images: int = 6) -> Path:
    return generate(SynthConfig(n_classes=2 * train_classes, images_per_class=images, views=2, feature_dim=16,
                                class_dim=8, variation_dim=4, hidden_dim=16), path)


@pytest.fixture(scope="module")
def c22(tmp_path_factory) -> Path:
    """A 22-class training split (the issue's real folder data set had 22 classes)."""
    return world(tmp_path_factory.mktemp("c22") / "c22.h5", 22)


@pytest.fixture(scope="module")
def c3(tmp_path_factory) -> Path:
    return world(tmp_path_factory.mktemp("c3") / "c3.h5", 3)


def one_line_error(r, *needles: str, code: int = 1) -> str:
    """The result failed with ``code`` and one ``error:`` line holding every needle, and no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    text = " ".join(r.output.split())  # rich may wrap a long line on a narrow terminal
    for n in needles:
        assert n in text, (n, r.output)
    return text


# ---------------------------------------------------------------------------------------------- item 4


@pytest.mark.skipif(knn.gpu_available(), reason="this faiss has a usable GPU")
def test_evaluate_gpu_with_faiss_cpu_is_refused_not_run_on_the_cpu(c22, tmp_path):
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["evaluate", str(c22), "--device", "cuda", "--json", str(out)])
    one_line_error(r, "--device cuda", "no GPU support", "--device cpu")
    assert not out.exists()
    old = runner.invoke(app, ["evaluate", str(c22), "--gpu", "--json", str(out)])  # the old spelling, hidden
    one_line_error(old, "--device cuda", "no GPU support", "--device cpu")
    ok = runner.invoke(app, ["evaluate", str(c22), "--device", "cpu", "--no-clustering", "--json", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["faiss_gpu"] is False


def test_config_file_values_are_checked_by_type_and_name(c22, tmp_path):
    bad = tmp_path / "c.json"
    for content, needles in (({"lr": "fast"}, ("c.json", "lr", "expected a number", "'fast'")),
                             ({"epochs": 2.5}, ("c.json", "epochs", "an integer")),
                             ({"lambdas_phase2": [1, 2]}, ("c.json", "lambdas_phase2", "4 numbers")),
                             ({"loss": "nope"}, ("c.json", "loss", "expected one of")),
                             ({"learning_rate": 0.1}, ("c.json", "unknown", "learning_rate"))):
        bad.write_text(json.dumps(content))
        r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(tmp_path / "run"), "--config", str(bad)])
        one_line_error(r, *needles)
        assert not (tmp_path / "run").exists()


def test_config_that_is_a_directory_or_not_text_names_the_option(c22, tmp_path):
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00")
    for path, needle in ((tmp_path, "is a directory"), (binary, "not a text file")):
        r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(tmp_path / "run"), "--config", str(path)])
        one_line_error(r, f"--config {path}: {needle}", "expected a JSON file")
        assert not (tmp_path / "run").exists()


def test_ablate_set_with_a_bad_value_is_one_line_and_writes_nothing(c22, tmp_path):
    for item, needle in (("lr=abc", "expected a number"), ("batch_size=8.5", "an integer"),
                         ("device=tpu", "expected one of")):
        r = runner.invoke(app, ["ablate", str(c22), "--out", str(tmp_path / "A"), "--set", item])
        one_line_error(r, f"--set {item}", needle)
    assert not (tmp_path / "A").exists()


def test_tune_bad_storage_or_search_leaves_no_output_directory(c22, tmp_path):
    out = tmp_path / "T"
    r = runner.invoke(app, ["tune", str(c22), "--out", str(out), "--storage", "bogus://x", "--trials", "1"])
    one_line_error(r, "--storage bogus://x", "cannot open")
    assert not out.exists()
    r = runner.invoke(app, ["tune", str(c22), "--out", str(out), "--search", "bogus", "--trials", "1"])
    one_line_error(r, "cannot search", "bogus")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- item 5


def _env() -> dict:
    src = str(Path(dvml.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def test_killed_fit_then_evaluate_then_resume(c22, tmp_path):
    """SIGKILL a real fit-heads process after a few epochs; evaluate says the run is unfinished and records the
    checkpoint it scored; --resume deletes that metrics.json; evaluate then scores the finished checkpoint, the
    same as an uninterrupted run's."""
    run = tmp_path / "run"
    args = ["fit-heads", str(c22), "--out", str(run), "--epochs", "400", *TINY]
    cmd = [sys.executable, "-c", "from dvml.cli import main; main()", *args]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and p.poll() is None:
            log = run / R.LOG_FILE
            if log.exists() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert p.poll() is None, f"fit ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(30)
    ckpt = torch.load(run / R.HEADS_FILE, weights_only=True)
    done = int(ckpt["epochs_done"])
    assert 2 <= done < 400 and not ckpt["finished"]  # the log line of an epoch is written just before its checkpoint

    r = runner.invoke(app, ["evaluate", str(run), "--no-clustering"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"epoch {done} of 400, unfinished" in text and "Traceback" not in text
    m = json.loads((run / R.METRICS_FILE).read_text())
    assert m["checkpoint"]["status"] == "unfinished" and m["checkpoint"]["epochs_done"] == done
    assert m["checkpoint"]["sha256"] == R.file_sha256(run / R.HEADS_FILE)

    # resume to a short end (--epochs may change on resume); the stale metrics.json goes at once
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(run), "--epochs", str(done + 2), "--resume", *TINY])
    assert r.exit_code == 0, r.output
    assert not (run / R.METRICS_FILE).exists()
    r = runner.invoke(app, ["evaluate", str(run), "--no-clustering"])
    assert r.exit_code == 0 and "unfinished" not in r.output, r.output
    m2 = json.loads((run / R.METRICS_FILE).read_text())
    assert m2["checkpoint"]["status"] == "finished" and m2["checkpoint"]["epoch"] == done + 2
    assert m2["checkpoint"]["sha256"] == R.file_sha256(run / R.HEADS_FILE) != m["checkpoint"]["sha256"]

    # the resumed run is the uninterrupted run (same checkpoint weights, same metrics)
    ref = tmp_path / "ref"
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(ref), "--epochs", str(done + 2), *TINY])
    assert r.exit_code == 0, r.output
    a = torch.load(run / R.HEADS_FILE, weights_only=True)["model"]
    b = torch.load(ref / R.HEADS_FILE, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = runner.invoke(app, ["evaluate", str(ref), "--no-clustering"])
    assert json.loads((ref / R.METRICS_FILE).read_text())["recall@1"] == m2["recall@1"]


def test_ablate_does_not_trust_metrics_of_another_checkpoint(c22, tmp_path):
    out = tmp_path / "A"
    args = ["ablate", str(c22), "--out", str(out), "--losses", "triplet", "--seeds", "1", "--methods", "dvml",
            "--epochs", "1", "--no-clustering", *SET_TINY]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cell = out / "runs" / "triplet-dvml-s0"
    assert ablate.read_finished(cell) is not None
    ck = torch.load(cell / R.HEADS_FILE, weights_only=True)
    R.atomic_torch_save({**ck, "epoch": 7}, cell / R.HEADS_FILE)  # the checkpoint changed after evaluation
    assert ablate.read_finished(cell) is None


# ---------------------------------------------------------------------------------------------- item 6


def test_ablate_checks_every_cell_batch_before_the_first_fit(c3, tmp_path):
    out = tmp_path / "A"
    r = runner.invoke(app, ["ablate", str(c3), "--out", str(out), "--losses", "triplet,npair", "--seeds", "2",
                            "--batch-size", "8", "--epochs", "1", *SET_TINY])
    text = one_line_error(r, "npair-base-s0", "needs 4 training classes", "there are 3", "--batch-size to 6")
    assert "--per-class" not in text and "per_class" not in text  # npair takes exactly 2 per class
    assert not out.exists()  # no triplet cell ran first
    assert "queued" not in r.output and "ablation" not in r.output.replace("ablation.json", "")  # no empty table
    # a loss that can take more images per class is told the option ablate has for it
    r = runner.invoke(app, ["ablate", str(c3), "--out", str(out), "--losses", "triplet", "--seeds", "1",
                            "--batch-size", "16", *SET_TINY])
    one_line_error(r, "needs 4 training classes", "--set per-class=8")
    assert not out.exists()


def test_a_grid_without_a_finished_cell_can_be_rerun_into_the_same_out(c22, tmp_path):
    out = tmp_path / "A"
    (out / "runs" / "triplet-dvml-s0").mkdir(parents=True)  # an earlier grid died in its first cell
    (out / ablate.PROVENANCE_FILE).write_text(json.dumps({"cache_fingerprint": "0" * 16, "fit": {"lr": 1.0}}))
    r = runner.invoke(app, ["ablate", str(c22), "--out", str(out), "--losses", "triplet", "--seeds", "1",
                            "--methods", "dvml", "--epochs", "1", "--no-clustering", *SET_TINY])
    assert r.exit_code == 0, r.output
    assert "grid" in r.output  # the overall progress bar
    prov = json.loads((out / ablate.PROVENANCE_FILE).read_text())
    assert prov["fit"]["epochs"] == 1 and prov["finished"]
    # with a finished cell, other options are still refused (they would mix in one table)
    r = runner.invoke(app, ["ablate", str(c22), "--out", str(out), "--losses", "triplet", "--seeds", "1",
                            "--methods", "dvml", "--epochs", "2", "--no-clustering", *SET_TINY])
    one_line_error(r, "other fit options", "1 finished cell")
    assert ablate.read_finished(out / "runs" / "triplet-dvml-s0") is not None


# ---------------------------------------------------------------------------------------------- item 8


def test_readme_walkthrough_uses_only_runs_it_created():
    readme = (Path(dvml.__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## On real data")[1].split("```bash")[1].split("```")[0]
    made: set[str] = set()
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("dvml "):
            continue
        argv = shlex.split(line)
        for flag in ("--baseline",):
            if flag in argv:
                assert argv[argv.index(flag) + 1] in made, line
        if argv[1] in ("evaluate", "analyze") and argv[2].startswith("runs/"):
            assert argv[2] in made, line
        for flag in ("--out", "-o"):
            if flag in argv:
                made.add(argv[argv.index(flag) + 1])
    assert "runs/triplet-base" in made


def test_fit_heads_help_states_the_loss_dependent_defaults():
    r = runner.invoke(app, ["fit-heads", "--help"], terminal_width=250, env={"COLUMNS": "250"})
    text = " ".join(r.output.replace("│", " ").split())
    needles = ("(default: 0.1, whatever --lr is", "120 for triplet, 128 otherwise", "2 for npair, 4 otherwise",
               "depends on the loss")
    for needle in needles:
        assert needle in text, needle


def test_nan_at_epoch_1_names_no_heads_pt_that_does_not_exist(c22, tmp_path):
    train = load_split(c22, "train")
    huge = Split(features=train.features * np.float32(1e30), labels=train.labels)  # squared distances overflow
    out = tmp_path / "run"
    cfg = FitConfig(cache=c22, out=out, epochs=2, embedding_size=8, decoder_hidden=8, samples=2, eval_every=0,
                    device="cpu")
    with pytest.raises(DvmlError) as e:
        fit(cfg, train=huge)
    assert "epoch 1" in str(e.value) and "no checkpoint was written" in str(e.value)
    assert "heads.pt" not in str(e.value) and not (out / R.HEADS_FILE).exists()


def test_tune_with_short_fits_does_not_search_phase2_lambdas(c22, tmp_path):
    short = tune.TuneConfig(cache=c22, out=tmp_path / "T", fit={"epochs": 3})
    assert not set(tune.search_space(short)) & set(tune.LAMBDA_NAMES)
    assert set(tune.LAMBDA_NAMES) <= set(tune.search_space(tune.TuneConfig(cache=c22, fit={"epochs": 40})))
    moved = tune.TuneConfig(cache=c22, fit={"epochs": 3, "phase2_epoch": 1})
    assert set(tune.LAMBDA_NAMES) <= set(tune.search_space(moved))
    r = runner.invoke(app, ["tune", str(c22), "--out", str(tmp_path / "T"), "--epochs", "3", "--search",
                            "lr,lambda1"])
    one_line_error(r, "lambda1", "phase 2", "epoch 30", "--set phase2-epoch")
    assert not (tmp_path / "T").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_unsafe_heads_pt_is_refused_without_torchs_weights_only_false_advice(c22, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(run), "--epochs", "1", *TINY])
    assert r.exit_code == 0, r.output
    torch.save({"model": {}, "x": _Boom()}, run / R.HEADS_FILE)
    before = (run / R.HEADS_FILE).read_bytes()
    r = runner.invoke(app, ["evaluate", str(run)])
    text = one_line_error(r, "heads.pt", "refused")
    assert "weights_only" not in text and "weights_only=False" not in text
    assert (run / R.HEADS_FILE).read_bytes() == before and not (run / R.METRICS_FILE).exists()
    assert not Path("pwned.txt").exists()


def test_a_heads_pt_of_random_bytes_is_called_damaged_not_unsafe(c22, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(run), "--epochs", "1", *TINY])
    assert r.exit_code == 0, r.output
    (run / R.HEADS_FILE).write_bytes(bytes(range(7, 250)) * 3)
    r = runner.invoke(app, ["evaluate", str(run)])
    text = one_line_error(r, "heads.pt", "not a PyTorch checkpoint (damaged, truncated or another kind of file)")
    assert "refused" not in text and not (run / R.METRICS_FILE).exists()


def test_finetune_has_skip_bad():
    r = runner.invoke(app, ["finetune", "--help"], terminal_width=250)
    assert "--skip-bad" in r.output and "--no-skip-bad" in r.output


def test_finetune_refuses_resume_with_overwrite(tiny_folder, tmp_path):
    r = runner.invoke(app, ["finetune", "folder", "--root", str(tiny_folder), "--out", str(tmp_path / "ft"),
                            "--resume", "--overwrite"])
    one_line_error(r, "--resume continues the run in --out and --overwrite replaces it")
    assert not (tmp_path / "ft").exists()


def test_finetune_drop_unreadable_lists_and_leaves_out_bad_images(tiny_folder, tmp_path):
    from dvml.extract.datasets import read_dataset
    from dvml.finetune.data import drop_unreadable

    index = read_dataset("folder", tiny_folder)
    victim = tiny_folder / index.train[1].path
    victim.write_bytes(b"not an image")
    kept, bad = drop_unreadable(index)
    assert len(kept.train) == len(index.train) - 1 and len(bad) == 1 and victim.name in bad[0]
    assert index.train[1] not in kept.train and kept.test == index.test


# ---------------------------------------------------------------------------------------------- item 9


def test_default_batch_is_fitted_to_a_22_class_cache_and_an_explicit_one_is_refused(c22, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(run), "--epochs", "1", *TINY])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "batch fitted to the data: 22 training classes x 4 images per class = 88" in text
    rec = json.loads((run / R.CONFIG_FILE).read_text())
    assert rec["config"]["batch_size"] == 88
    assert rec["batch"] == {"batch_size": 88, "per_class": 4, "classes": 22, "source": "fitted", "default": 120}

    bad = tmp_path / "bad"
    r = runner.invoke(app, ["fit-heads", str(c22), "--out", str(bad), "--epochs", "1", "--batch-size", "120",
                            *TINY])
    one_line_error(r, "a batch of 120 with 4 images per class needs 30 training classes", "there are 22",
                   "--batch-size to 88")
    assert not bad.exists()


def test_fit_batch_rule_against_the_sampler(c22):
    labels = load_split(c22, "train").labels
    cfg = FitConfig(cache=c22, out=Path("x"), loss="npair")
    fitted, note = fit_batch(cfg, labels)
    assert (fitted.batch_size, note["source"]) == (44, "fitted")  # 22 classes x 2 (npair's pairs)
    same, note = fit_batch(FitConfig(cache=c22, out=Path("x"), batch_size=40), labels)
    assert same.batch_size == 40 and note["source"] == "given"
    held, _ = fit_batch(FitConfig(cache=c22, out=Path("x"), val_classes=5, eval_every=1), labels)
    assert held.batch_size == 17 * 4  # the held-out validation classes are not in any batch
    from dvml.heads.sampler import ClassBalancedSampler

    s = ClassBalancedSampler(torch.as_tensor(labels), fitted.batch_size, fitted.per_class, torch.Generator())
    assert s.epoch().shape == (len(labels) // 44, 44)
    with pytest.raises(DvmlError, match=re.escape("needs 23 training classes")):
        fit_batch(FitConfig(cache=c22, out=Path("x"), batch_size=92), labels)


def test_finetune_skip_bad_leaves_a_bad_image_out_and_fits_the_batch(tiny_cub, tmp_path):
    from dvml.extract.datasets import read_dataset
    from dvml.finetune import FinetuneConfig, finetune

    index = read_dataset("cub", tiny_cub)
    victim = index.root / index.train[0].path
    victim.write_bytes(b"not a jpeg")
    small = dict(dataset="cub", root=tiny_cub, weights="none", resize=40, crop=32, per_class=2, samples=2,
                 embedding_size=8, decoder_hidden=8, workers=0, epochs=1, device="cpu")
    with pytest.raises(DvmlError, match="pass skip_bad to leave unreadable images out\\)$"):
        finetune(FinetuneConfig(out=tmp_path / "a", **small))
    assert not (tmp_path / "a" / R.HEADS_FILE).exists()
    out = finetune(FinetuneConfig(out=tmp_path / "b", skip_bad=True, **small))
    rec = json.loads((out / R.CONFIG_FILE).read_text())
    assert rec["status"] == "finished" and len(rec["skipped_images"]) == 1 and victim.name in rec["skipped_images"][0]
    # 3 training classes: the default batch (120) is fitted to them, 3 x 2 images
    assert rec["batch"]["source"] == "fitted" and rec["config"]["batch_size"] == 6


def test_fitted_batch_splits_evenly_over_processes(c22):
    labels = np.repeat(np.arange(3), 4)
    cfg = FitConfig(cache=c22, out=Path("x"), loss="npair")
    assert fit_batch(cfg, labels)[0].batch_size == 6
    assert fit_batch(cfg, labels, multiple_of=4)[0].batch_size == 4  # 2 classes x 2, divisible by 4 processes
