"""THE run-directory format (``fit-heads`` and ``finetune`` runs): every file name, the checkpoint keys, atomic
writers, provenance (:func:`versions`), loading, and the epoch log. The one module that knows these names, as
:mod:`dvml.cache.schema` is for the feature cache.

::

    RUN_DIR/heads.pt     torch.save of a dict of tensors and plain python values (torch.load(weights_only=True)):
                           kind "heads", model (state_dict of the reported model: last epoch, or best on the
                           validation classes), loss (its proxies), config (FitConfig dict), seed, cache (abs
                           path), cache_fingerprint, epoch (of the reported model), epochs_done, finished,
                           selection ("last" | "val"), in_dim, embedding_size, train_classes (original label of
                           each proxy row), versions, and resume (latest model/loss/optimizer state, RNG
                           states, best-so-far) for --resume
    RUN_DIR/config.json  {"kind", "config", "cache", "cache_fingerprint", "seed", "versions", "status",
                           "epochs_done", "batch"}: the same facts, readable; "batch" says whether the batch size
                           was given, the loss's default, or fitted to the data (:mod:`dvml.heads.batch`)
    RUN_DIR/log.jsonl    one JSON object per finished epoch: loss terms, λs, phase, timing, watch-only test
                           Recall@1 and validation Recall@1 when evaluated
    RUN_DIR/metrics.json written by ``dvml evaluate`` (and every ablation cell); its ``checkpoint`` entry
                           (:func:`checkpoint_facts`) says which checkpoint it scored (epoch, status, sha256),
                           and a fit that continues the run deletes it (:func:`invalidate_metrics`), so it never
                           describes an older checkpoint than the one on disk

A finetune run adds ``backbone.pt`` and ``checkpoint.pt`` and writes ``kind "finetune"`` (see
:mod:`dvml.finetune.train` for their keys). ``heads.pt``'s ``format`` is :data:`CHECKPOINT_FORMAT`; a checkpoint
without the key predates it and is read as format 1; a newer format is refused with an error naming both.

Every file is written by :func:`dvml.files.write_file`: to a temporary name in the same directory, then renamed
over the old one (``os.replace``), so a crash or a full disk leaves either the old or the new file, never half of
one (a symlink is written through). One process at a time writes a run directory: fit-heads, finetune and evaluate
hold its :func:`run_lock`, so ``--overwrite`` never clears a run under a live writer.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dvml import __version__, files
from dvml.errors import DvmlError

log = logging.getLogger(__name__)

HEADS_FILE = "heads.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
BACKBONE_FILE = "backbone.pt"  # finetune: the tuned backbone (usable as ``dvml extract --weights``)
CHECKPOINT_FILE = "checkpoint.pt"  # finetune: everything needed to resume
#: Every file a run directory may hold (what ``--overwrite`` replaces).
RUN_FILES = (CHECKPOINT_FILE, BACKBONE_FILE, HEADS_FILE, CONFIG_FILE, LOG_FILE, METRICS_FILE)
#: What other commands derive from a run inside its directory (``dvml analyze``, ``dvml ablate``): stale once the
#: run is replaced, so ``--overwrite`` replaces them too.
DERIVED_FILES = ("analysis", "per_class.csv")
#: Where ``--overwrite`` keeps the run it replaces until the new one finishes (:func:`set_aside_run`).
REPLACED_DIR = ".replaced-run"

HEADS_KIND = "heads"
FINETUNE_KIND = "finetune"
#: ``heads.pt`` format (both kinds) and finetune ``checkpoint.pt`` format.
CHECKPOINT_FORMAT = 1
FINETUNE_CHECKPOINT_FORMAT = 1
#: How a file ``torch.save`` wrote begins: a zip archive (the format since PyTorch 1.6) or a pickle (the legacy
#: format, protocol 2+); anything else is no checkpoint.
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")
#: Packages whose versions are recorded with every artifact (those installed).
VERSIONED_PACKAGES = ("torch", "numpy", "faiss-cpu", "faiss-gpu", "pytorch-metric-learning", "h5py", "scipy")


class RunError(DvmlError):
    """A run directory that is missing, malformed, or in a state the request does not allow."""


@dataclass(frozen=True)
class RunInfo:
    """What a run directory says about itself (from ``config.json``).

    run_dir, kind ("heads" | "finetune"), config (the stage's config dict), cache (feature cache path, or None),
    cache_fingerprint, seed, status ("running" | "finished"), epochs_done.
    """

    run_dir: Path
    kind: str
    config: dict
    cache: Path | None
    cache_fingerprint: str | None
    seed: int | None = None
    status: str = "finished"
    epochs_done: int | None = None


def versions() -> dict[str, str]:
    """Versions of dvml, python and the installed :data:`VERSIONED_PACKAGES` (recorded with every artifact)."""
    out = {"dvml": __version__, "python": platform.python_version()}
    for dist in VERSIONED_PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`dvml.files.write_file` (temporary file beside ``path``, then renamed)."""
    import torch

    files.write_file(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    files.write_text(text, Path(path))


def atomic_write_json(obj, path: Path, *, default=None) -> None:
    files.write_json(obj, path, default=default)


def run_lock(run_dir: Path):
    """The writer lock of a run directory (see :func:`dvml.files.writer_lock`): held by fit-heads, finetune
    (rank 0) and evaluate while they write into it."""
    return files.writer_lock(Path(run_dir))


def cpu_state(sd):
    """Deep copy of a (nested) state dict with every tensor on the CPU (what a checkpoint stores)."""
    import torch

    if isinstance(sd, torch.Tensor):
        return sd.detach().to("cpu", copy=True)
    if isinstance(sd, dict):
        return {k: cpu_state(v) for k, v in sd.items()}
    if isinstance(sd, list | tuple):
        return type(sd)(cpu_state(v) for v in sd)
    return copy.deepcopy(sd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _run_entries(out: Path) -> list[Path]:
    return [p for p in (Path(out) / n for n in RUN_FILES + DERIVED_FILES) if p.exists() or p.is_symlink()]


def clear_run(out: Path) -> None:
    """Remove every run file (:data:`RUN_FILES`) and what was derived from it (:data:`DERIVED_FILES`) from
    ``out``; other files are left alone."""
    for p in _run_entries(out):
        _remove(p)


def set_aside_run(out: Path) -> None:
    """``--overwrite``: move the run in ``out`` (:data:`RUN_FILES`, :data:`DERIVED_FILES`) into
    ``out/`` :data:`REPLACED_DIR`, where it stays until its replacement finishes (:func:`drop_replaced_run`) or
    comes back if the replacement fails before its first checkpoint (:func:`restore_replaced_run`). So a failed or
    interrupted ``--overwrite`` never loses a run. If a replaced run is already kept there (an earlier
    ``--overwrite`` that did not finish), what ``out`` holds is that unfinished replacement: it is discarded and
    the kept run stays. Other files are left alone."""
    out = Path(out)
    entries = _run_entries(out)
    keep = out / REPLACED_DIR
    if not entries:
        return
    if keep.is_dir():
        for p in entries:
            _remove(p)
        return
    keep.mkdir()
    for p in entries:
        p.replace(keep / p.name)


def restore_replaced_run(out: Path) -> bool:
    """After a failed ``--overwrite``: put the kept run (:func:`set_aside_run`) back if the new run wrote no
    checkpoint yet (its ``config.json`` and empty log are removed). Returns whether it did; with a checkpoint the
    new run stays resumable and the old one stays kept."""
    out = Path(out)
    keep = out / REPLACED_DIR
    if not keep.is_dir() or (out / HEADS_FILE).exists() or (out / CHECKPOINT_FILE).exists():
        return False
    clear_run(out)
    for p in keep.iterdir():
        p.replace(out / p.name)
    keep.rmdir()
    return True


def drop_replaced_run(out: Path) -> None:
    """The replacement finished: delete the run :func:`set_aside_run` kept (if any)."""
    keep = Path(out) / REPLACED_DIR
    if keep.is_dir():
        shutil.rmtree(keep)


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[None]:
    """Around writing a run into ``out``: on success the run it replaced (:func:`set_aside_run`) is deleted; on any
    failure (an error, Ctrl-C) that run comes back if the new one has no checkpoint yet, else it stays kept and a
    warning says where."""
    try:
        yield
    except BaseException:
        if restore_replaced_run(out):
            log.warning("%s: the run --overwrite was replacing is back in place", out)
        elif (Path(out) / REPLACED_DIR).is_dir():
            log.warning("%s: the run --overwrite is replacing is kept in %s until this one finishes (--resume)",
                        out, Path(out) / REPLACED_DIR)
        raise
    drop_replaced_run(out)


@contextlib.contextmanager
def run_writer(out: Path) -> Iterator[None]:
    """Around a fit writing the run directory ``out``: its writer lock (:func:`run_lock`: one writer at a time, so
    ``--overwrite`` never clears a live run) and :func:`replacing` (the run ``--overwrite`` set aside goes only once
    the new one is done)."""
    with run_lock(out), replacing(out):
        yield


def load_torch(path: Path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with an error that names the file."""
    import pickle

    import torch

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({files.describe(e)})") from None
    if not head.startswith(TORCH_FILE_MAGIC):
        raise RunError(f"{path}: not a PyTorch checkpoint (damaged, truncated or another kind of file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises retrying with weights_only=False: impossible from the CLI, and exactly what
        # must not be done with an untrusted file. Say what was refused instead.
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise RunError(f"{path}: refused: it holds Python objects other than tensors and plain values (it "
                           "could run code when loaded); dvml loads only weights-only checkpoints, so re-create "
                           "it with dvml") from None
        raise RunError(f"{path}: cannot be loaded (UnpicklingError: {e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RunError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None


def read_log(run_dir: Path) -> list[dict]:
    """The records of ``log.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"{path}: line {i} is not valid JSON") from None
    return out


def write_log(run_dir: Path, records: list[dict]) -> None:
    """Replace ``log.jsonl`` with ``records`` (atomic)."""
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), Path(run_dir) / LOG_FILE)


def append_log(run_dir: Path, record: dict) -> None:
    """Append one epoch's record to ``log.jsonl`` (one line; flushed and fsynced)."""
    files.append_line(Path(run_dir) / LOG_FILE, json.dumps(record))


#: Keys every ``heads.pt`` holds (both kinds; fit-heads adds ``resume``, finetune ``global_step``).
HEADS_KEYS = frozenset({"kind", "model", "loss", "config", "seed", "cache", "cache_fingerprint", "dataset", "epoch",
                        "epochs_done", "finished", "selection", "in_dim", "embedding_size", "train_classes",
                        "versions"})


def save_heads(run_dir: Path, **entries) -> None:
    """Write ``RUN_DIR/heads.pt`` (atomic): ``entries`` (every key of :data:`HEADS_KEYS`) and ``format``."""
    missing = HEADS_KEYS - entries.keys()
    if missing:
        raise ValueError(f"heads.pt entries missing: {', '.join(sorted(missing))}")
    atomic_torch_save({**entries, "format": CHECKPOINT_FORMAT}, Path(run_dir) / HEADS_FILE)


def write_config(run_dir: Path, record: dict) -> None:
    """Write ``RUN_DIR/config.json`` (atomic): the run's kind, config, provenance, status and progress."""
    atomic_write_json(record, Path(run_dir) / CONFIG_FILE)


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> dict:
    """``torch.load(RUN_DIR/heads.pt, weights_only=True)`` with errors that name the file.

    Raises:
        RunError: no file, a damaged file, not a heads checkpoint, or a ``format`` newer than
            :data:`CHECKPOINT_FORMAT` (naming both versions).
    """
    path = Path(run_dir) / HEADS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {HEADS_FILE} (not a fit-heads run directory, or the fit never finished an "
                       "epoch)")
    ckpt = load_torch(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunError(f"{path}: not a dvml heads checkpoint (no 'model' entry)")
    fmt = ckpt.get("format", 1)
    if not isinstance(fmt, int) or fmt > CHECKPOINT_FORMAT:
        raise RunError(f"{path}: checkpoint format {fmt!r}, this dvml {__version__} reads format "
                       f"{CHECKPOINT_FORMAT} and older; upgrade dvml")
    return ckpt


def load_run(run_dir: str | Path) -> RunInfo:
    """Read ``RUN_DIR/config.json``.

    Raises:
        RunError: no such directory, no/invalid config.json.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: invalid JSON ({e})") from None
    missing = [k for k in ("kind", "config") if k not in d]
    if missing:
        raise RunError(f"{path}: missing key(s) {', '.join(missing)}")
    cache = d.get("cache")
    return RunInfo(run_dir=run_dir, kind=str(d["kind"]), config=dict(d["config"]),
                   cache=Path(cache) if cache else None, cache_fingerprint=d.get("cache_fingerprint"),
                   seed=d.get("seed"), status=str(d.get("status", "finished")), epochs_done=d.get("epochs_done"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_facts(run_dir: str | Path, ckpt: dict | None = None) -> dict:
    """Which checkpoint of a run an evaluation scores (recorded as ``metrics.json``'s ``checkpoint``).

    Returns ``{"file", "epoch" (of the scored model), "epochs_done", "epochs" (planned), "status"
    ("finished" | "unfinished"), "selection", "sha256" (of heads.pt, and of backbone.pt as "backbone_sha256"
    when the run has one), "mtime"}``. ``ckpt``: the loaded ``heads.pt`` if already at hand.
    """
    run_dir = Path(run_dir)
    path = run_dir / HEADS_FILE
    sha = file_sha256(path) if path.is_file() else None
    ckpt = load_checkpoint(run_dir) if ckpt is None else ckpt
    done = int(ckpt.get("epochs_done", 0))
    epochs = (ckpt.get("config") or {}).get("epochs")
    out = {"file": HEADS_FILE, "epoch": int(ckpt.get("epoch", done)), "epochs_done": done, "epochs": epochs,
           "status": "finished" if ckpt.get("finished") else "unfinished", "selection": ckpt.get("selection"),
           "sha256": sha, "mtime": path.stat().st_mtime}
    if (run_dir / BACKBONE_FILE).is_file():
        out["backbone_sha256"] = file_sha256(run_dir / BACKBONE_FILE)
    return out


def metrics_current(run_dir: str | Path, metrics: dict) -> bool:
    """True when ``metrics`` (a run's metrics.json) scored the checkpoint now on disk (same sha256)."""
    run_dir = Path(run_dir)
    recorded = metrics.get("checkpoint") if isinstance(metrics, dict) else None
    if not isinstance(recorded, dict) or not (run_dir / HEADS_FILE).is_file():
        return False
    if recorded.get("sha256") != file_sha256(run_dir / HEADS_FILE):
        return False
    backbone = run_dir / BACKBONE_FILE
    return not backbone.is_file() or recorded.get("backbone_sha256") == file_sha256(backbone)


def invalidate_metrics(run_dir: str | Path) -> None:
    """Delete ``RUN_DIR/metrics.json``: called when a fit is about to change the run's checkpoint (resume,
    continued training), so no metrics file ever describes an older checkpoint than the one on disk."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        path.unlink()
