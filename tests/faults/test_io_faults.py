"""Bad targets and file-system faults (issue 12, items 2, 3 and 7), end to end through the CLI.

Each case asserts the exit code, one ``error:`` line naming the path and the cause with no traceback, and that no
file was lost or left looking complete (no temporary file, a cache still ``complete=false`` and resumable, a run
not marked finished, no half-written JSON). Concurrent writers are real second processes holding the writer lock.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import threading
import tty
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dvml
from dvml import files
from dvml.cache import load_split, read_info
from dvml.cli import app
from dvml.experiments import ablate
from dvml.extract.synth import SynthConfig, generate

runner = CliRunner()
SYNTH = ["--classes", "20", "--images-per-class", "6", "--views", "2", "--feature-dim", "32", "--class-dim", "8"]
FIT = ["--epochs", "2", "--batch-size", "12", "--embedding-size", "16", "--decoder-hidden", "16", "-T", "2",
       "--device", "cpu", "--eval-every", "0"]
FIT_SET = ["--epochs", "1", "--batch-size", "12", "--embedding-size", "16", "--samples", "2", "--device", "cpu",
           "--set", "decoder_hidden=16"]
ENV = {**os.environ, "PYTHONPATH": str(Path(dvml.__file__).parents[1]), "OMP_NUM_THREADS": "1",
       "COLUMNS": "200"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(SynthConfig(n_classes=20, images_per_class=6, views=2, feature_dim=32, class_dim=8),
                    tmp_path_factory.mktemp("faults") / "w.h5")


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r, r.output


def assert_one_line_error(r, output: str, *fragments: str) -> str:
    """Exit code 1, exactly one ``error:`` line holding every fragment, no traceback; returns the line."""
    assert r.exit_code == 1, output
    assert "Traceback" not in output, output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert output.count("error:") == 1, output
    lines = ["error:" + ln.split("error:", 1)[1] for ln in output.splitlines() if "error:" in ln]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def leftovers(d: Path) -> list[str]:
    """Temporary files (``.NAME.*.tmp``) and lock files left in ``d`` (recursively)."""
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*") if p.name.endswith((".tmp", ".lock")))


def dvml_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from dvml.cli import main; main()", *map(str, args)]


# --------------------------------------------------------------------------------------------------
# item 2: where --json and the other writers write


def test_json_writes_through_a_symlink_and_the_link_stays(world, tmp_path):
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("real.json")
    (tmp_path / "dangling.json").symlink_to("new.json")
    for name in ("link.json", "dangling.json"):
        r, out = invoke("evaluate", world, "--json", tmp_path / name, "--no-clustering")
        assert r.exit_code == 0, out
        assert (tmp_path / name).is_symlink()
    for real in ("real.json", "new.json"):
        saved = json.loads((tmp_path / real).read_text())
        assert saved["recall@1"] >= 0 and not (tmp_path / real).is_symlink()
    assert leftovers(tmp_path) == []


def test_checkpoints_and_caches_write_through_a_symlink(world, tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "real.h5").write_bytes(b"old")
    (tmp_path / "link.h5").symlink_to(tmp_path / "store" / "real.h5")
    r, out = invoke("synth", tmp_path / "link.h5", *SYNTH, "--overwrite")
    assert r.exit_code == 0, out
    assert (tmp_path / "link.h5").is_symlink() and read_info(tmp_path / "store" / "real.h5").complete
    run = tmp_path / "run"
    r, out = invoke("fit-heads", world, "--out", run, "--epochs", "1", *FIT[2:])
    assert r.exit_code == 0, out
    (tmp_path / "store" / "heads.pt").write_bytes((run / "heads.pt").read_bytes())
    (run / "heads.pt").unlink()
    (run / "heads.pt").symlink_to(tmp_path / "store" / "heads.pt")
    r, out = invoke("fit-heads", world, "--out", run, *FIT, "--resume")  # epoch 2 saves through the link
    assert r.exit_code == 0, out
    assert (run / "heads.pt").is_symlink()
    assert torch.load(tmp_path / "store" / "heads.pt", weights_only=True)["epochs_done"] == 2
    assert leftovers(tmp_path) == []


def _json_reader(fd: int, box: list) -> None:
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except OSError:  # a pty master reports EIO once the slave is closed
            break
        if not b:
            break
        chunks.append(b)
        try:
            box.append(json.loads(b"".join(chunks).decode().replace("\r\n", "\n")))
            return
        except ValueError:
            continue


def _fifo_json_reader(fifo: Path, box: list) -> threading.Thread:
    """A started thread that opens ``fifo`` for reading and appends the JSON document it reads to ``box``."""

    def read():
        fd = os.open(fifo, os.O_RDONLY)
        try:
            _json_reader(fd, box)
        finally:
            os.close(fd)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_json_into_a_fifo_writes_it_directly(world, tmp_path):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    box: list = []
    t = _fifo_json_reader(fifo, box)
    r, out = invoke("evaluate", world, "--json", fifo, "--no-clustering")
    t.join(30)
    assert r.exit_code == 0, out
    assert box and box[0]["n_test"] == 60
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the FIFO, not replaced by a regular file
    assert leftovers(tmp_path) == []


def test_json_into_a_pseudo_terminal_writes_it_directly(world):
    master, slave = pty.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    box: list = []
    t = threading.Thread(target=_json_reader, args=(master, box), daemon=True)
    t.start()
    try:
        r, out = invoke("evaluate", world, "--json", name, "--no-clustering")
        t.join(30)
        assert stat.S_ISCHR(os.stat(name).st_mode)  # still the terminal device
    finally:
        os.close(slave)
        os.close(master)
    assert r.exit_code == 0, out
    assert box and box[0]["n_test"] == 60


def test_json_dash_is_standard_output(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r, _ = invoke("evaluate", world, "--json", "-", "--no-clustering")
    assert r.exit_code == 0, r.output
    saved = json.loads(r.stdout)  # standard output holds the JSON alone; the table went to standard error
    assert saved["n_test"] == 60 and "R@1" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_a_directory_as_json_target_is_refused_before_scoring(world, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    r, out = invoke("evaluate", world, "--json", target)
    assert_one_line_error(r, out, f"cannot write {target}: is a directory")
    assert "kNN" not in out  # refused before the scoring
    assert list(target.iterdir()) == [] and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# item 3: write errors, one line each


@pytest.mark.parametrize("command", ["synth", "extract", "fit-heads", "ablate", "tune", "evaluate --json"])
def test_a_path_under_a_regular_file_is_one_line(command, world, tmp_path, tiny_folder):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me\n")
    target = blocker / "sub" / "out"
    args = {
        "synth": ["synth", target, *SYNTH],
        "extract": ["extract", "folder", "--root", tiny_folder, "--out", target, "--weights", "none", "--resize",
                    "40", "--crop", "32", "--workers", "0"],
        "fit-heads": ["fit-heads", world, "--out", target, *FIT],
        "ablate": ["ablate", world, "--out", target, "--losses", "triplet", "--seeds", "1", *FIT_SET],
        "tune": ["tune", world, "--out", target, "--trials", "1", "--epochs", "1", "--batch-size", "12",
                 "--device", "cpu"],
        "evaluate --json": ["evaluate", world, "--json", target, "--no-clustering"],
    }[command]
    r, out = invoke(*args)
    line = assert_one_line_error(r, out, "cannot write", f"{blocker} is not a directory")
    assert str(blocker / "sub") in line or str(target) in line
    assert blocker.read_text() == "keep me\n" and leftovers(tmp_path) == []


def test_a_read_only_file_system_is_one_line(world, tmp_path, monkeypatch):
    """On /sys when it is mounted read-only; elsewhere the file system's answer (EROFS) is simulated."""
    ro = Path("/sys/fs")
    if not (os.statvfs(ro).f_flag & os.ST_RDONLY):
        ro = tmp_path

        def mkstemp(*_a, **_k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    r, out = invoke("evaluate", world, "--json", ro / "m.json", "--no-clustering")
    assert_one_line_error(r, out, f"cannot write {ro / 'm.json'}: Read-only file system")
    assert not (ro / "m.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_missing_permission_is_one_line(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    r, out = invoke("evaluate", world, "--json", locked / "m.json", "--no-clustering")
    assert_one_line_error(r, out, f"cannot write {locked / 'm.json'}: Permission denied")


def test_an_unwritable_output_directory_fails_before_the_scoring(world, tmp_path, monkeypatch):
    """What the permission test above checks, as root too (os.access answers as a normal user's would), and
    before any kNN or k-means runs."""
    from dvml.evaluate import core

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))

    def scored(*_a, **_k):
        raise AssertionError("scored before checking the output")

    monkeypatch.setattr(core, "evaluate_embeddings", scored)
    for option in ("--json", "--per-class"):
        r, out = invoke("evaluate", world, option, locked / "sub" / "m.out", "--no-clustering")
        assert_one_line_error(r, out, f"cannot write {locked / 'sub' / 'm.out'}: Permission denied (cannot create "
                                      f"files in {locked})")


def test_a_full_disk_in_evaluate_json_is_one_line(world, tmp_path):
    """A real ENOSPC: /dev/full behind a symlink (written directly, like any character device)."""
    (tmp_path / "m.json").symlink_to("/dev/full")
    r, out = invoke("evaluate", world, "--json", tmp_path / "m.json", "--no-clustering")
    assert_one_line_error(r, out, f"cannot write {tmp_path / 'm.json'}: No space left on device")
    assert (tmp_path / "m.json").is_symlink() and leftovers(tmp_path) == []


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_fit_heads_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the second checkpoint hits a full disk half-way through
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            _enospc()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    r, out = invoke("fit-heads", world, "--out", run, *FIT)
    assert_one_line_error(r, out, f"cannot write {run / 'heads.pt'}: No space left on device")
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(run / "heads.pt", weights_only=True)  # the epoch-1 checkpoint, whole
    assert ckpt["epochs_done"] == 1 and ckpt["finished"] is False
    assert json.loads((run / "config.json").read_text())["status"] == "running"
    assert len((run / "log.jsonl").read_text().splitlines()) == 2 and leftovers(tmp_path) == []
    r, out = invoke("fit-heads", world, "--out", run, *FIT, "--resume")  # space freed: resumes
    assert r.exit_code == 0, out
    assert json.loads((run / "config.json").read_text())["status"] == "finished"


def test_a_full_disk_in_synth_leaves_a_resumable_cache(world, tmp_path, monkeypatch):
    """The cache writer checks free space before HDF5 writes (HDF5 cannot recover from a failed write)."""
    out = tmp_path / "c.h5"
    real_statvfs, calls = os.statvfs, []

    def statvfs(p):
        calls.append(1)
        st = real_statvfs(p)
        if len(calls) < 5:
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *tuple(st)[5:]))

    monkeypatch.setattr(files.os, "statvfs", statvfs)
    r, text = invoke("synth", out, *SYNTH)
    assert_one_line_error(r, text, f"cannot write {out}: No space left on device")
    info = read_info(out, require_complete=False)
    assert not info.complete and 0 < info.splits["train"].n < 60
    monkeypatch.setattr(files.os, "statvfs", real_statvfs)
    r, text = invoke("synth", out, *SYNTH)  # space freed: resumes to the same file an uninterrupted run writes
    assert r.exit_code == 0, text
    for split in ("train", "test"):
        np.testing.assert_array_equal(load_split(out, split).features, load_split(world, split).features)
    assert leftovers(tmp_path) == []


def test_a_full_disk_in_ablate_leaves_no_finished_grid(world, tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):  # a full disk shows at fsync (delayed allocation), here for the summary
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{ablate.SUMMARY_MD}."):
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    out = tmp_path / "abl"
    r, text = invoke("ablate", world, "--out", out, "--losses", "triplet", "--seeds", "1", *FIT_SET)
    assert_one_line_error(r, text, f"cannot write {out / ablate.SUMMARY_MD}: No space left on device")
    assert json.loads((out / ablate.PROVENANCE_FILE).read_text())["finished"] is None
    assert not (out / ablate.SUMMARY_MD).exists() and leftovers(tmp_path) == []


def test_a_write_error_inside_hdf5_is_one_line_in_a_real_process(tmp_path):
    """A file-size limit makes HDF5's own write fail (EFBIG): HDF5 cannot close such a file (it crashes at exit),
    so the CLI prints the one line and ends the process at once; the file is not complete."""
    out = tmp_path / "big.h5"
    limit = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (300000, 300000)); "
             "from dvml.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", limit, "synth", str(out), "--classes", "40", "--images-per-class",
                        "20", "--feature-dim", "256", "--class-dim", "16"], env=ENV, capture_output=True,
                       text=True, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: cannot write {out}: File too large"], text
    r, text = invoke("cache", "info", out)  # refused: not a cache anyone could take for complete
    assert r.exit_code == 1 and "Traceback" not in text
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# item 7: concurrent writers


HOLDER = """
import sys, time
from {module} import {cls} as C
orig = C.{method}
n = 0
def hold(self, *a, **k):
    global n
    out = orig(self, *a, **k)
    n += 1
    if n == {after}:
        print("ready", flush=True)
        time.sleep(600)
    return out
C.{method} = hold
from dvml.cli import main
main()
"""


def start_holder(log: Path, module: str, cls: str, method: str, after: int, *args) -> subprocess.Popen:
    """A real ``dvml ARGS`` process that stops (holding its writer lock) after ``after`` calls of ``method``."""
    code = HOLDER.format(module=module, cls=cls, method=method, after=after)
    err = open(log, "w")  # noqa: SIM115 - the holder's log (not a pipe nobody reads, which could fill)
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                         stderr=err, text=True)
    err.close()
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"holder did not start: {line}{Path(log).read_text()}")
    return p


def kill9(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(30)


def test_a_second_cache_writer_is_refused_and_a_killed_one_resumes(world, tmp_path):
    out = tmp_path / "c.h5"
    holder = start_holder(tmp_path / "holder.log", "dvml.cache.writer", "CacheWriter", "append", 3,
                          "synth", out, *SYNTH)
    try:
        before = os.stat(out)
        for args in (["synth", out, *SYNTH, "--overwrite"], ["synth", out, *SYNTH]):
            r, text = invoke(*args)
            assert_one_line_error(r, text, f"{out}: is being written by another process (pid {holder.pid})")
        for args in (["cache", "info", out], ["evaluate", out]):
            r, text = invoke(*args)
            line = assert_one_line_error(r, text, "being written by another process", f"pid {holder.pid}")
            assert "not an HDF5 file" not in line
        after = os.stat(out)
        assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)  # not deleted, not touched
    finally:
        kill9(holder)
    # kill -9 left the lock file but no lock: the same command resumes and completes
    r, text = invoke("synth", out, *SYNTH)
    assert r.exit_code == 0, text
    assert read_info(out).complete
    for split in ("train", "test"):
        np.testing.assert_array_equal(load_split(out, split).features, load_split(world, split).features)
    assert leftovers(tmp_path) == []


def test_a_second_run_writer_is_refused_and_a_killed_fit_resumes(world, tmp_path):
    run = tmp_path / "run"
    holder = start_holder(tmp_path / "holder.log", "dvml.heads.train", "_HeadsFit", "save", 1,
                          "fit-heads", world, "--out", run, *FIT)
    try:
        heads = (run / "heads.pt").read_bytes()
        for args in (["fit-heads", world, "--out", run, *FIT, "--overwrite"],
                     ["fit-heads", world, "--out", run, *FIT, "--resume"],
                     ["evaluate", run, "--no-clustering"]):
            r, text = invoke(*args)
            assert_one_line_error(r, text, f"{run}: is being written by another process (pid {holder.pid})")
        assert (run / "heads.pt").read_bytes() == heads and not (run / "metrics.json").exists()
    finally:
        kill9(holder)
    r, text = invoke("fit-heads", world, "--out", run, *FIT, "--resume")
    assert r.exit_code == 0, text
    assert json.loads((run / "config.json").read_text())["status"] == "finished"
    r, text = invoke("evaluate", run, "--no-clustering")
    assert r.exit_code == 0, text
    assert leftovers(tmp_path) == []


def test_the_lock_names_the_holder_and_goes_with_its_process(tmp_path):
    """Unit level: a live holder is reported with its pid; a holder killed with -9 blocks nobody."""
    target = tmp_path / "t.h5"
    code = ("import sys, time; from dvml.files import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n    print('ready', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert files.writer_pid(target) == p.pid
        with pytest.raises(files.BusyError, match=f"pid {p.pid}"):
            with files.writer_lock(target):
                pass
    finally:
        kill9(p)
    assert files.writer_pid(target) is None
    with files.writer_lock(target), files.writer_lock(target):  # re-entrant in one process
        assert files.writer_pid(target) is None  # this process is not "another process"
    assert not files.lock_path(target).exists()


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    old = tmp_path / "old.json"
    old.write_text("{}")
    old.chmod(0o640)
    files.write_json({"a": 1}, old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o640 and json.loads(old.read_text()) == {"a": 1}
    umask = os.umask(0o022)
    try:
        files.write_json({"b": 2}, tmp_path / "new.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o644  # not mkstemp's 0600


def test_a_failed_log_append_leaves_no_half_line(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n')
    real_fsync = os.fsync

    def fsync(fd):
        os.write(fd, b'{"epo')  # part of the line reached the disk before it filled up
        _enospc()

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(files.WriteError, match=f"cannot write {log}: No space left on device"):
        files.append_line(log, json.dumps({"epoch": 2}))
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert log.read_text() == '{"epoch": 1}\n'


# --------------------------------------------------------------------------------------------------
# write_via_path: write_file's guarantees for a writer that needs a file name (dvml export)


def test_write_via_path_replaces_through_a_symlink_and_leaves_nothing_on_failure(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "real.bin").write_bytes(b"old")
    (store / "real.bin").chmod(0o640)
    (tmp_path / "link.bin").symlink_to(store / "real.bin")
    (tmp_path / "dangling.bin").symlink_to(store / "new.bin")

    def write(tmp: Path) -> None:  # writes by name, then reads its file back (a self-check)
        tmp.write_bytes(b"new")
        assert tmp.read_bytes() == b"new" and tmp.parent == store

    for name in ("link.bin", "dangling.bin"):
        files.write_via_path(tmp_path / name, write)
        assert (tmp_path / name).is_symlink()
    assert (store / "real.bin").read_bytes() == (store / "new.bin").read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(store / "real.bin").st_mode) == 0o640

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        _enospc()

    def refused(tmp: Path) -> None:
        tmp.write_bytes(b"bad")
        raise ValueError("the self-check failed")

    link = tmp_path / "link.bin"
    with pytest.raises(files.WriteError, match=f"^cannot write {link}: No space left on device$"):
        files.write_via_path(link, full)
    with pytest.raises(ValueError, match="the self-check failed"):  # not a write error: passes through
        files.write_via_path(link, refused)
    with pytest.raises(files.WriteError, match=f"^cannot write {store}: is a directory$"):
        files.write_via_path(store, write)
    assert (store / "real.bin").read_bytes() == b"new" and leftovers(tmp_path) == []


def test_write_via_path_copies_into_a_fifo_and_standard_output(tmp_path, capsysbinary):
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps({"a": 1}))

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    box: list = []
    t = _fifo_json_reader(fifo, box)
    files.write_via_path(fifo, write)
    t.join(30)
    assert box == [{"a": 1}] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    files.write_via_path("-", write)
    assert json.loads(capsysbinary.readouterr().out) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fifo"]
