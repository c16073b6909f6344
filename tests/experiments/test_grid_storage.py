"""``dvml ablate --storage``: three workers on one grid through SQLite -- each cell fit once, results equal to one
worker's, a worker killed mid-cell does not stop the grid; bad storage / another grid refused; ``--summarize``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dvml
from dvml.cli import app
from dvml.experiments import ablate
from dvml.experiments import grid_storage as G
from dvml.extract.synth import SynthConfig, generate

GRID = ["--losses", "triplet", "--seeds", "2", "--epochs", "3", "--embedding-size", "16", "--batch-size", "12",
        "--eval-every", "0", "--device", "cpu", "--set", "decoder_hidden=16", "--set", "samples=2"]
CELLS = ["triplet-base-s0", "triplet-dvml-s0", "triplet-base-s1", "triplet-dvml-s1"]
ENV = {**os.environ, "PYTHONPATH": str(Path(dvml.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}

# a worker that logs every fit it starts ("<cell> <resume>") and, with KILL_AFTER_EPOCH, SIGKILLs itself there
WORKER = """
import os, signal, sys
from dvml.experiments import ablate as A
fit = A.fit
def logged_fit(cfg, **kw):
    with open(os.environ["FITS_LOG"], "a") as f:
        f.write(f"{cfg.out.name} {int(cfg.resume)}\\n")
    cb, kill = kw.get("callback"), os.environ.get("KILL_AFTER_EPOCH")
    def on_event(ev):
        if cb is not None:
            cb(ev)
        if kill and ev.kind == "epoch" and ev.epoch >= int(kill):
            os.kill(os.getpid(), signal.SIGKILL)
    kw["callback"] = on_event
    return fit(cfg, **kw)
A.fit = logged_fit
from dvml.__main__ import main
sys.argv = ["dvml", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "w.h5"
    return generate(SynthConfig(n_classes=12, images_per_class=6, views=2, feature_dim=32, class_dim=8,
                                variation_dim=4, hidden_dim=16), path)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The grid run by one ordinary ``dvml ablate`` (no storage)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = CliRunner().invoke(app, ["ablate", str(cache), "--out", str(out), *GRID])
    assert r.exit_code == 0, r.output
    return out


def _metrics(out: Path) -> list[dict]:
    """results.csv without the columns that differ between runs (paths, timings)."""
    with open(out / ablate.RESULTS_FILE, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("run_dir", "fit_seconds", "eval_seconds")}
                for r in csv.DictReader(f)]


def _worker(tmp_path: Path, cache: Path, out: Path, db: Path, fits: Path, **env) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, str(script), "ablate", str(cache), "--out", str(out), *GRID, "--storage",
           f"sqlite:///{db}", "--heartbeat", "2"]  # stale after 8 s of silence
    return subprocess.Popen(cmd, env={**ENV, "FITS_LOG": str(fits), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _study_trials(db: Path):
    import optuna

    url = f"sqlite:///{db}"
    (name,) = optuna.study.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_three_workers_fit_each_cell_once_and_match_one_worker(cache, reference, tmp_path):
    out, db, fits = tmp_path / "out", tmp_path / "grid.db", tmp_path / "fits.txt"
    procs = [_worker(tmp_path, cache, out, db, fits) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert sorted(fits.read_text().split("\n")[:-1]) == sorted(f"{c} 0" for c in CELLS)  # each cell fit once
    complete = [t.user_attrs["cell"] for t in _study_trials(db) if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(CELLS)
    assert _metrics(out) == _metrics(reference)
    assert json.loads((out / ablate.SUMMARY_JSON).read_text()) == json.loads((reference / ablate.SUMMARY_JSON)
                                                                             .read_text())
    said = [out_ for out_, _ in results]
    assert sum("results:" in s for s in said) == 1  # one worker wrote (and printed) the summary
    assert sum("summary is written by another worker" in s for s in said) == 2

    # --summarize rewrites the same summary from the run directories alone
    (out / ablate.SUMMARY_JSON).unlink()
    r = CliRunner().invoke(app, ["ablate", "--summarize", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / ablate.SUMMARY_JSON).read_text()) == json.loads((reference / ablate.SUMMARY_JSON)
                                                                             .read_text())

    # another grid pointed at the same storage and --out: one line, nothing of the first grid touched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = CliRunner().invoke(app, ["ablate", str(cache), "--out", str(out), *GRID[:-2], "--set", "samples=3",
                                 "--storage", f"sqlite:///{db}"])
    assert r.exit_code == 1
    assert r.output.startswith(f"error: {out} holds another ablation grid (config.fit.samples: 2 there, 3 here)")
    assert len(r.output.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert len(_study_trials(db)) == len(CELLS)


def test_a_worker_killed_mid_cell_leaves_its_cell_to_the_others(cache, reference, tmp_path):
    out, db, fits = tmp_path / "out", tmp_path / "grid.db", tmp_path / "fits.txt"
    killer = _worker(tmp_path, cache, out, db, fits, KILL_AFTER_EPOCH="2")
    deadline = time.monotonic() + 300
    while not fits.exists() and time.monotonic() < deadline:  # the killer holds a cell before the others start
        time.sleep(0.2)
    others = [_worker(tmp_path, cache, out, db, fits) for _ in range(2)]
    killer.communicate(timeout=600)
    assert killer.returncode == -9
    for p in others:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    lines = fits.read_text().split("\n")[:-1]
    killed_cell = lines[0].split()[0]
    # every cell started once; the killed one once more, from its checkpoint
    assert sorted(ln for ln in lines if ln.endswith(" 0")) == sorted(f"{c} 0" for c in CELLS)
    assert [ln for ln in lines if ln.endswith(" 1")] == [f"{killed_cell} 1"]
    trials = _study_trials(db)
    assert sorted(t.user_attrs["cell"] for t in trials if t.state.name == "COMPLETE") == sorted(CELLS)
    assert [t.user_attrs["cell"] for t in trials if t.state.name == "FAIL"] == [killed_cell]  # stale, retried
    assert _metrics(out) == _metrics(reference)  # the resumed fit is the uninterrupted one
    assert (out / ablate.SUMMARY_MD).exists()


@pytest.mark.parametrize("url,needle", [
    ("sqlite:///{tmp}/no/such/dir/grid.db", "does not exist"),
    ("nosuchdb://host/db", "cannot open the study storage (NoSuchModuleError"),
    ("postgresql://user:secret@127.0.0.1:1/db", "postgresql://user:***@127.0.0.1:1/db: cannot open"),
])
def test_a_storage_that_cannot_be_opened_is_one_line_and_writes_nothing(cache, tmp_path, url, needle):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ablate", str(cache), "--out", str(out), *GRID,
                                 "--storage", url.format(tmp=tmp_path)])
    assert r.exit_code == 1
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "secret" not in r.output
    assert not out.exists()


def test_summarize_refuses_an_unfinished_grid(cache, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "runs" / CELLS[1] / "metrics.json").unlink()
    r = CliRunner().invoke(app, ["ablate", "--summarize", str(out)])
    assert r.exit_code == 1
    assert f"1 of 4 cells are not finished ({CELLS[1]})" in r.output


def test_grid_identity_ignores_paths_only(cache, tmp_path):
    a = ablate.AblateConfig(cache=cache, out=tmp_path / "a", losses=("triplet",), seeds=(0, 1))
    b = ablate.AblateConfig(cache=Path(os.path.relpath(cache)), out=tmp_path / "b", losses=("triplet",), seeds=(0, 1))
    c = ablate.AblateConfig(cache=cache, out=tmp_path / "a", losses=("triplet",), seeds=(0, 2))
    digest = {k: G.grid_digest(G.grid_facts(cfg, "fp", cfg.cells())) for k, cfg in (("a", a), ("b", b), ("c", c))}
    assert digest["a"] == digest["b"] != digest["c"]
    assert G.grid_digest(G.grid_facts(a, "other-cache", a.cells())) != digest["a"]
