"""One ablation grid, many workers: cells claimed through an Optuna RDB storage (``dvml ablate --storage URL``).

Every worker runs the same command (same cache, grid, fit options and ``--out``). The grid's identity -- the
cache fingerprint, the cells, the fit and evaluation options (:func:`grid_digest`) -- names one Optuna study,
``dvml-ablate-<digest>``, in the storage (SQLite ``sqlite:///PATH`` on one machine; PostgreSQL or MySQL URLs
across machines) and is recorded in ``OUT/grid.json``: a worker with another grid is refused before it writes
anything, whichever of the two files it meets.

Claims: the worker that creates the study queues one WAITING trial per cell (``user_attrs["cell"]`` = the cell's
name) and marks the study ready; every worker then pops WAITING trials (``Study.ask``: a WAITING -> RUNNING
transition that only one process wins; on SQLite, whose driver reads outside the transaction, the pop is also
serialised by an ``flock`` beside the database file). A claimed trial carries Optuna's heartbeat: a worker
killed mid-cell stops beating, and after ``grace`` seconds any waiting worker fails the trial
(``optuna.storages.fail_stale_trials``), whose :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
queues it again; the next worker to take it continues the fit from the cell's checkpoint when ``OUT`` is
shared (``fit --resume``), else starts it over. A finished cell's trial is COMPLETE (value: its Recall@1) and
holds the cell's results row, so the summary needs no shared directory.

Exactly once: a cell is fit by the worker holding its RUNNING trial; another worker takes it only after the
holder's heartbeat is ``grace`` seconds old (a live worker beats every ``heartbeat`` seconds from a thread),
and a live fit also holds its run directory's writer lock, so on a shared ``OUT`` a mistaken retry waits
instead of fitting twice.

Summary: the worker that sees every cell COMPLETE takes ``OUT``'s writer lock and, unless the study says it
was done, writes the usual outputs (:func:`dvml.experiments.ablate.write_summary`); ``dvml ablate --summarize
OUT`` does the same from the run directories alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dvml import files
from dvml import runs as R
from dvml.cache import load_split, read_info
from dvml.errors import DvmlError
from dvml.experiments import ablate as A
from dvml.experiments.gridlog import GridWarnings

log = logging.getLogger(__name__)

GRID_FILE = "grid.json"
STUDY_PREFIX = "dvml-ablate-"
DEFAULT_HEARTBEAT_S = 30
READY_ATTR = "dvml_grid"
SUMMARY_ATTR = "dvml_summary_written"


def grid_facts(cfg: A.AblateConfig, fp: str, cells: list) -> dict:
    """What makes two grids the same grid: everything but the cache's path and ``--out``."""
    config = A._jsonable(dataclasses.asdict(cfg))
    config.pop("cache", None)
    config.pop("out", None)
    return {"cache_fingerprint": fp, "cells": [c.name for c in cells], "config": config}


def grid_digest(facts: dict) -> str:
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=8).hexdigest()


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va != vb:
            if isinstance(va, dict) and isinstance(vb, dict):
                return _first_difference(va, vb, f"{prefix}{k}.")
            return f"{prefix}{k}: {vb!r} there, {va!r} here"
    return "?"


def claim_out(cfg: A.AblateConfig, facts: dict) -> str:
    """Record the grid in ``OUT/grid.json`` (atomically, first worker wins) or check it is the one there.
    Returns the study name. Raises DvmlError naming the first difference from the grid already in ``OUT``."""
    digest = grid_digest(facts)
    record = {"study_name": STUDY_PREFIX + digest, "digest": digest, **facts}
    path = cfg.out / GRID_FILE
    if not path.exists():
        files.make_dir(cfg.out)
        tmp = cfg.out / f".{GRID_FILE}.{os.getpid()}"
        files.write_json(record, tmp)
        try:
            os.link(tmp, path)  # fails if another worker published first: then compare with theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        there = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DvmlError(f"{path}: unreadable ({e}); use another `out`") from None
    if there.get("digest") != digest:
        raise DvmlError(f"{cfg.out} holds another ablation grid ({_first_difference(facts, there)}); every worker "
                        "of one grid needs the same command; use another `out` for another grid")
    return record["study_name"]


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not even a URL: show it as given
        return url


def open_storage(url: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S, grace_s: int | None = None):
    """An Optuna ``RDBStorage`` with heartbeats and retry of stale trials, or a DvmlError naming the URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        # under the claim lock: workers starting together would each create the schema of a new SQLite file
        with _claim_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval's
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=int(heartbeat_s),
                grace_period=int(grace_s if grace_s is not None else 4 * heartbeat_s),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except DvmlError:
        raise
    except Exception as e:  # noqa: BLE001 - sqlalchemy/optuna raise many types for a bad URL or server
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DvmlError(f"`storage` {_safe_url(url)}: cannot open the study storage ({type(e).__name__}: "
                        f"{first})") from None


@contextlib.contextmanager
def _claim_lock(url: str) -> Iterator[None]:
    """Serialise claims on a SQLite storage (an ``flock`` beside the database file); a no-op for server RDBs,
    whose row locks make Optuna's WAITING -> RUNNING transition atomic."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        yield
        return
    db = Path(url[len("sqlite:///"):])
    if not db.parent.is_dir():
        raise DvmlError(f"`storage` {url}: the directory {db.parent} does not exist")
    fd = os.open(db.with_name(f".{db.name}.claim.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_study(storage, url: str, name: str, cells: list, facts: dict, wait_s: float):
    """Create the grid's study and queue its cells, or load it once its creator has queued them."""
    import optuna

    with _claim_lock(url):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage)
        else:
            for cell in cells:
                study.enqueue_trial({}, user_attrs={"cell": cell.name})
            study.set_user_attr(READY_ATTR, facts)
            log.info("study %s: queued %d cells", name, len(cells))
    deadline = time.monotonic() + wait_s
    while READY_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise DvmlError(f"study {name}: its creator never finished queuing the cells; delete the study "
                            f"(optuna delete-study --study-name {name} --storage URL) and start again")
        time.sleep(1.0)
    if study.user_attrs[READY_ATTR] != facts:  # a digest collision or a hand-made study
        raise DvmlError(f"study {name} holds another grid ({_first_difference(facts, study.user_attrs[READY_ATTR])})")
    return study


class _Heartbeat:
    """Record the trial's heartbeat now and every ``interval`` seconds from a thread until the block ends."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 - a busy database: the next beat retries
                log.warning("heartbeat of trial %d failed: %s", self.trial_id, e)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _complete_rows(study) -> dict[str, dict]:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return {t.user_attrs["cell"]: t.user_attrs["row"] for t in trials if "row" in t.user_attrs}


def _errored_cells(study) -> dict[str, str]:
    """Cells whose latest trial failed with an error (not a stale heartbeat, which is queued again): name -> error."""
    latest: dict[str, object] = {}
    for t in study.get_trials(deepcopy=False):
        if "cell" in t.user_attrs:
            latest[t.user_attrs["cell"]] = t
    return {name: t.user_attrs["error"] for name, t in latest.items() if "error" in t.user_attrs
            and t.state.name == "FAIL"}


def _requeue_errored(study, url: str) -> None:
    """A new command retries the cells an earlier one failed with an error (each queued once: under the claim
    lock on SQLite; on a server database start the retrying workers one after another)."""
    with _claim_lock(url):
        for name in _errored_cells(study):
            log.info("%s failed earlier; queued again", name)
            study.enqueue_trial({}, user_attrs={"cell": name})


def _claim(study, storage, url: str):
    """Fail stale trials (queuing them again) and pop a WAITING one; None when there is none."""
    import optuna

    with _claim_lock(url):
        optuna.storages.fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            failed = _errored_cells(study)
            if failed and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                name, err = next(iter(failed.items()))
                raise DvmlError(f"cell {name} failed in a worker ({err}); {len(failed)} cell(s) cannot finish; "
                                "fix the cause and run the command again to retry them")
            return None
        trial = study.ask()
        if "cell" not in trial.user_attrs:  # no WAITING trial was left: ask made a new one; withdraw it
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        storage.record_heartbeat(trial._trial_id)  # at once: a claim without a beat would never go stale
        return trial


def run_shared(cfg: A.AblateConfig, storage_url: str, *, callback: A.AblateCallback | None = None,
               heartbeat_s: int = DEFAULT_HEARTBEAT_S, grace_s: int | None = None, poll_s: float | None = None,
               ready_wait_s: float = 120.0) -> dict | None:
    """Work on the grid ``cfg`` shared through ``storage_url`` until every cell is done; returns the summary (as
    :func:`dvml.experiments.ablate.run`) from the worker that wrote it, else the rows this worker saw finished
    (``{"rows": [...], "out": ..., "summarized_by_another": True}``).

    Raises DvmlError for a bad cache or fit option, another grid in ``OUT`` or in the study, or a storage that
    cannot be opened, before any cell is claimed.
    """
    import optuna

    cb = callback or (lambda _e: None)
    info, fp, cells = A.check_grid(cfg)
    facts = grid_facts(cfg, fp, cells)
    storage = open_storage(storage_url, heartbeat_s, grace_s)  # before anything is written in OUT
    prov_path = cfg.out / A.PROVENANCE_FILE
    if prov_path.exists() and not (cfg.out / GRID_FILE).exists():  # an earlier single-worker ablation in OUT
        A._check_earlier_grid(cfg, prov_path, fp)
    name = claim_out(cfg, facts)
    study = _open_study(storage, storage_url, name, cells, facts, ready_wait_s)
    _requeue_errored(study, storage_url)
    if not prov_path.exists():
        R.atomic_write_json(A.provenance(cfg, cells, info, fp), prov_path)
    by_name = {c.name: c for c in cells}
    cb(A.AblateEvent("start", cells=tuple(cells)))
    data = None
    poll = poll_s if poll_s is not None else max(1.0, heartbeat_s / 2)
    seen: set[str] = set()
    while True:
        done = _complete_rows(study)
        for cell_name in sorted(set(done) - seen, key=[c.name for c in cells].index):
            seen.add(cell_name)
            cb(A.AblateEvent("cell_skipped", cell=by_name[cell_name], row=done[cell_name]))
        if len(done) == len(cells):
            break
        trial = _claim(study, storage, storage_url)
        if trial is None:
            time.sleep(poll)  # the remaining cells are running elsewhere (or stale, failed on a later pass)
            continue
        cell = by_name[trial.user_attrs["cell"]]
        if data is None:
            data = load_split(cfg.cache, "train"), load_split(cfg.cache, "test")
        try:
            with _Heartbeat(storage, trial._trial_id, heartbeat_s), GridWarnings.quiet():
                row = _work(cfg, cell, data, cb)
        except files.BusyError:
            log.warning("%s: its run directory is being written by a live process; leaving the cell to it", cell.name)
            study.enqueue_trial({}, user_attrs={"cell": cell.name})
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            time.sleep(poll)
            continue
        except DvmlError as e:  # the cell itself fails (bad loss value, ...): every worker would fail it alike
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        except BaseException:  # interrupted: the cell goes back to the queue for another worker
            with contextlib.suppress(Exception):
                study.enqueue_trial({}, user_attrs={"cell": cell.name})
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        try:
            trial.set_user_attr("row", row)
            study.tell(trial, float(row.get("recall@1") or 0.0))
        except optuna.exceptions.UpdateFinishedTrialError:
            # alive but silent for longer than the grace period: the cell was queued again; whoever takes it
            # reads this finished run back instead of fitting it again (see _work)
            log.warning("%s: given up as stale while it ran (a longer heartbeat?); its result is in %s and will be "
                        "recorded by the worker that takes the cell again", cell.name, A.run_dir(cfg, cell))
            continue
        seen.add(cell.name)
        cb(A.AblateEvent("cell_done", cell=cell, row=row))
    rows = list(_complete_rows(study).values())
    return _summarize_once(cfg, cells, rows, info, study, cb)


def _work(cfg: A.AblateConfig, cell, data, cb) -> dict:
    """Run one claimed cell: read back a finished one, resume a checkpointed one, else start it."""
    run = A.run_dir(cfg, cell)
    with files.writer_lock(run):  # a live fit of this cell elsewhere on this OUT: BusyError
        finished = A.read_finished(run)
        if finished is not None:  # fit and scored, but its worker died before telling the storage
            return A._row(cell, finished, run)
        resume = (run / R.CONFIG_FILE).exists()
    cb(A.AblateEvent("cell_start", cell=cell))
    if resume:
        log.info("%s: continuing from its checkpoint", cell.name)
    return A._run_cell(cfg, cell, data[0], data[1], cb, resume=resume)


def _summarize_once(cfg, cells, rows, info, study, cb) -> dict:
    try:
        lock = files.WriterLock(cfg.out).acquire()
    except files.BusyError:
        return {"rows": rows, "out": str(cfg.out), "summarized_by_another": True}
    try:
        if study.user_attrs.get(SUMMARY_ATTR) and (cfg.out / A.SUMMARY_JSON).exists():
            return {"rows": rows, "out": str(cfg.out), "summarized_by_another": True}
        prov = json.loads((cfg.out / A.PROVENANCE_FILE).read_text())
        result = A.write_summary(cfg, cells, rows, info, prov, cb)
        study.set_user_attr(SUMMARY_ATTR, True)
        return result
    finally:
        lock.release()


def summarize_dir(out: Path, *, callback: A.AblateCallback | None = None) -> dict:
    """``dvml ablate --summarize OUT``: the summary of a finished grid from its run directories alone."""
    out = Path(out)
    prov_path = out / A.PROVENANCE_FILE
    try:
        prov = json.loads(prov_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DvmlError(f"{prov_path}: cannot read the grid's record ({e}); is {out} an ablation `out`?") from None
    config = {**prov["config"], "out": out}
    cfg = A.AblateConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    cells = [c for c in cfg.cells() if c.name in set(prov["cells"])]
    rows, missing = [], []
    for cell in cells:
        metrics = A.read_finished(A.run_dir(cfg, cell))
        if metrics is None:
            missing.append(cell.name)
        else:
            rows.append(A._row(cell, metrics, A.run_dir(cfg, cell)))
    if missing:
        raise DvmlError(f"{out}: {len(missing)} of {len(cells)} cells are not finished ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}); run the grid's command to finish them")
    cb = callback or (lambda _e: None)
    with files.writer_lock(out):
        return A.write_summary(cfg, cells, rows, read_info(cfg.cache), prov, cb)
