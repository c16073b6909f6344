"""``torchrun -m dvml extract``: rank shares, the merged cache against a single-process one, resume after kill -9,
ranks that disagree (gloo on the CPU, random weights, the tiny CUB tree)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import dvml
from dvml.cache import CacheSpec, CacheWriter, fingerprint, load_split, read_info
from dvml.cli import app
from dvml.extract import sharding

ARGS = ["--weights", "none", "--resize", "40", "--crop", "32", "--workers", "0", "--views", "3", "--batch-size", "2"]
ENV = {**os.environ, "PYTHONPATH": str(Path(dvml.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # unwrapped log lines
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# rank 1 kills itself (SIGKILL, nothing cleaned up) right after its first train batch reached the disk
KILLER = """
import os, signal, sys
from dvml.cache import writer as W
append = W.CacheWriter.append
def killing_append(self, split, *a, **k):
    append(self, split, *a, **k)
    if os.environ["RANK"] == "1" and split == "train" and self.n_written(split) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
W.CacheWriter.append = killing_append
from dvml.__main__ import main
sys.argv = ["dvml", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("n,b,world", [(9, 2, 2), (7, 2, 3), (1, 4, 2), (10, 3, 4), (0, 2, 2), (33, 4, 5)])
def test_shares_are_disjoint_whole_batches_covering_every_row(n, b, world):
    shares = [sharding.share(n, b, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))  # in rank order: no gap, no duplicate, no padding
    for s in shares:
        assert s.start % b == 0 or s.start == n  # each begins where a single-process batch begins
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= b  # balanced to a batch


def _torchrun(tmp_path, root, out, *extra, script: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + (script or ["-m", "dvml"]) + ["extract", "cub", "--root", str(root), "--out", str(out), *ARGS,
                                                   *extra]
    return subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_two_ranks_give_the_single_process_cache_and_resume_after_kill(tiny_cub, tmp_path):
    single = tmp_path / "single.h5"
    r = CliRunner().invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(single), *ARGS])
    assert r.exit_code == 0, r.output
    want = fingerprint(single)

    out = tmp_path / "two.h5"
    p = _torchrun(tmp_path, tiny_cub, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert fingerprint(out) == want
    assert not sharding.parts_dir(out).exists()  # the shards are gone once merged
    assert load_split(out, "train").features.shape == load_split(single, "train").features.shape

    # kill -9 of rank 1 mid-run: torchrun fails, the shards stay, rank 1's holds its first batch
    killed = tmp_path / "killed.h5"
    (tmp_path / "killer.py").write_text(KILLER)
    p = _torchrun(tmp_path, tiny_cub, killed, script=[str(tmp_path / "killer.py")])
    assert p.returncode != 0
    assert not killed.exists()
    shard1 = sharding.shard_path(killed, 1, 2)
    with h5py.File(shard1, "r") as f:
        assert int(f["train"].attrs["n_written"]) == 2 and f.attrs["complete"] == False  # noqa: E712
    # a single process would start over and lose those rows: refused, shards untouched
    r = CliRunner().invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(killed), *ARGS])
    assert r.exit_code == 1 and "unfinished shards of a 2-process extraction" in r.output
    assert len(r.output.strip().splitlines()) == 1 and shard1.exists()

    p = _torchrun(tmp_path, tiny_cub, killed)  # the same command again resumes
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train: resuming at image 6 of 9" in p.stderr + p.stdout  # rank 1 (images 4..8) continues after 2 rows
    assert fingerprint(killed) == want
    assert not sharding.parts_dir(killed).exists()


MERGE_KILLER = """
import os, signal, sys
from dvml.cache import writer as W
append = W.CacheWriter.append
def killing_append(self, split, *a, **k):
    append(self, split, *a, **k)
    if self.path.name == "merged.h5" and split == "test" and self.n_written(split) >= 4:
        os.kill(os.getpid(), signal.SIGKILL)
W.CacheWriter.append = killing_append
from dvml.__main__ import main
sys.argv = ["dvml", *sys.argv[1:]]
main()
"""


def test_a_merge_killed_half_way_resumes_at_its_rows(tiny_cub, tmp_path):
    single = tmp_path / "single.h5"
    r = CliRunner().invoke(app, ["extract", "cub", "--root", str(tiny_cub), "--out", str(single), *ARGS])
    assert r.exit_code == 0, r.output
    out = tmp_path / "merged.h5"
    (tmp_path / "killer.py").write_text(MERGE_KILLER)
    p = _torchrun(tmp_path, tiny_cub, out, script=[str(tmp_path / "killer.py")])
    assert p.returncode != 0
    with h5py.File(out, "r") as f:  # the merger died after rank 0's test rows: train merged, test half
        assert (int(f["train"].attrs["n_written"]), int(f["test"].attrs["n_written"])) == (9, 4)
        assert f.attrs["complete"] == False  # noqa: E712
    p = _torchrun(tmp_path, tiny_cub, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming {out} at train=9 test=4 rows" in p.stderr + p.stdout  # the merge, not a new one
    assert fingerprint(out) == fingerprint(single)
    assert not sharding.parts_dir(out).exists()


def test_ranks_that_disagree_refuse_alike_and_write_nothing(tiny_cub, tmp_path):
    out = tmp_path / "bad.h5"
    args = " ".join(["extract", "cub", "--root", str(tiny_cub), "--out", str(out), *ARGS[:-4]])
    # every rank gets the same command except --views, which depends on the rank
    cmd = TORCHRUN + ["--no-python", "sh", "-c",
                      f'exec {sys.executable} -m dvml {args} --views $((3 + RANK)) --batch-size 2']
    p = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert lines and all(ln == "error: the ranks disagree about --views: 3 on rank 0, 4 on rank 1; start every "
                         "rank with the same command and the same data" for ln in lines)
    assert not out.exists() and not sharding.parts_dir(out).exists()


def _spec(dtype="float32") -> CacheSpec:
    return CacheSpec(dataset="toy", backbone="toy", weights="none", feature_dim=4, views=("a", "b"), dtype=dtype,
                     with_paths=True)


def _write_shard(out, spec, r, world, feats, labels, batch=2):
    rows = {s: sharding.share(len(labels[s]), batch, r, world) for s in ("train", "test")}
    with CacheWriter(sharding.shard_path(out, r, world), sharding._shard_spec(spec, rows, r, world)) as w:
        for s, rg in rows.items():
            if len(rg):
                w.append(s, feats[s][rg.start:rg.stop], labels[s][rg.start:rg.stop],
                         [f"{s}/{i}.jpg" for i in rg])


def _toy(n_train=7, n_test=5):
    rng = np.random.default_rng(0)
    feats = {"train": rng.normal(size=(n_train, 2, 4)).astype("f4"), "test": rng.normal(size=(n_test, 1, 4))
             .astype("f4")}
    labels = {"train": np.arange(n_train) % 3, "test": 10 + np.arange(n_test) % 2}
    return feats, labels


def test_merge_joins_the_shards_in_rank_order_against_one_writer(tmp_path):
    spec, (feats, labels) = _spec(), _toy()
    spec = dataclasses.replace(spec, test_views=1)
    one = tmp_path / "one.h5"
    with CacheWriter(one, spec) as w:  # the reference: every row written by one writer
        for s in ("train", "test"):
            w.append(s, feats[s], labels[s], [f"{s}/{i}.jpg" for i in range(len(labels[s]))])
        w.finalize()
    out = tmp_path / "out.h5"
    for r in range(3):
        _write_shard(out, spec, r, 3, feats, labels)
    assert sharding.merge(out, spec, 3, token="run-a") == (7, 5, [])
    assert fingerprint(out) == fingerprint(one)
    assert read_info(out).extra["run_token"] == "run-a" and not sharding.parts_dir(out).exists()
    assert sharding._merged_in_run(out, "run-a") and not sharding._merged_in_run(out, "run-b")
    assert sharding.merge(out, spec, 3, token="run-a") is None  # merged already: nothing to do


def test_merge_waits_for_every_shard_and_ignores_another_jobs_leftovers(tmp_path):
    spec, (feats, labels) = dataclasses.replace(_spec(), test_views=1), _toy()
    out = tmp_path / "out.h5"
    _write_shard(out, spec, 0, 2, feats, labels)
    assert sharding.merge(out, spec, 2, token="t") is None and not out.exists()  # rank 1 not there yet
    _write_shard(out, dataclasses.replace(spec, dtype="float16"), 1, 2, feats, labels)  # other settings
    assert sharding.merge(out, spec, 2, token="t") is None and not out.exists()
    sharding.shard_path(out, 1, 2).unlink()
    _write_shard(out, spec, 1, 2, feats, labels)
    assert sharding.merge(out, spec, 2, token="t") == (7, 5, [])


HOLD = """
import sys, time
from dvml import files
with files.writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(tmp_path, target, seconds):
    """Another process (standing in for a rank that checks the shards) holds ``target``'s writer lock."""
    (tmp_path / "hold.py").write_text(HOLD)
    p = subprocess.Popen([sys.executable, str(tmp_path / "hold.py"), str(target), str(seconds)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_rank_whose_shard_another_rank_is_checking_waits_and_writes_its_share(tmp_path, monkeypatch):
    # rank 0 finished first and, checking whether every shard is done, holds rank 1's shard lock just as rank 1
    # (re)starts: rank 1 must wait and write its rows, not take the lock for a merge of its share and leave
    spec, (feats, labels) = dataclasses.replace(_spec(), test_views=1), _toy()
    out = tmp_path / "out.h5"
    _write_shard(out, spec, 0, 2, feats, labels)
    monkeypatch.setattr(sharding, "rank", lambda: 1)
    monkeypatch.setattr(sharding, "world_size", lambda: 2)
    cfg = type("Cfg", (), {"batch_size": 2, "out": out, "overwrite": False})()
    index = type("Index", (), {"split": staticmethod(lambda split: labels[split])})()

    def extract_rows(writer, split, rows, skipped, progress):
        rows = rows[writer.n_written(split):]
        writer.append(split, feats[split][rows.start:rows.stop], labels[split][rows.start:rows.stop],
                      [f"{split}/{i}.jpg" for i in rows])
        return len(rows)

    holder = _hold_lock(tmp_path, sharding.shard_path(out, 1, 2), 1.0)
    try:
        n_train, n_test, _, processed, merged = sharding.run_rank(cfg, index, spec, token="t",
                                                                  extract_rows=extract_rows, extra={})
    finally:
        holder.wait(timeout=30)
    assert processed == 3 + 3  # rank 1's share: train images 4..6, test images 2..4
    assert merged == out and (n_train, n_test) == (7, 5)


def test_a_merge_waits_for_a_rank_that_holds_the_output_lock_instead_of_giving_up(tmp_path):
    # the last rank to finish finds the output locked by a rank that checked before the last shard was closed:
    # giving up would leave no rank to merge
    spec, (feats, labels) = dataclasses.replace(_spec(), test_views=1), _toy()
    out = tmp_path / "out.h5"
    for r in range(2):
        _write_shard(out, spec, r, 2, feats, labels)
    holder = _hold_lock(tmp_path, out, 1.0)
    try:
        assert sharding.merge(out, spec, 2, token="t") == (7, 5, [])
    finally:
        holder.wait(timeout=30)
    assert read_info(out).complete and not sharding.parts_dir(out).exists()
