"""The run directory written by ``fit-heads``: files, atomic writes, loading and embedding.

::

    RUN_DIR/heads.pt     torch.save of a dict of tensors and plain python values (torch.load(weights_only=True)):
                           kind "heads", model (state_dict of the reported model: last epoch, or best on the
                           validation classes), loss (its proxies), config (FitConfig dict), seed, cache (abs
                           path), cache_fingerprint, epoch (of the reported model), epochs_done, finished,
                           selection ("last" | "val"), in_dim, embedding_size, train_classes (original label of
                           each proxy row), versions, and resume (latest model/loss/optimizer state, RNG
                           states, best-so-far) for --resume
    RUN_DIR/config.json  {"kind", "config", "cache", "cache_fingerprint", "seed", "versions", "status",
                           "epochs_done"}: the same facts, readable
    RUN_DIR/log.jsonl    one JSON object per finished epoch: loss terms, λs, phase, timing, watch-only test
                           Recall@1 and validation Recall@1 when evaluated

Every file is written to a temporary name in the same directory and renamed over the old one
(``os.replace``), so a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from dvml import __version__
from dvml.errors import DvmlError

HEADS_FILE = "heads.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = 1


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
    """Versions of dvml, python and the packages that shape a fit."""
    out = {"dvml": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "pytorch-metric-learning", "h5py"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


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
    path = Path(run_dir) / LOG_FILE
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(RUN_DIR/heads.pt, weights_only=True)`` with errors that name the file."""
    path = Path(run_dir) / HEADS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {HEADS_FILE} (not a fit-heads run directory, or the fit never finished an "
                       "epoch)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RunError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunError(f"{path}: not a dvml heads checkpoint (no 'model' entry)")
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


def embedding_layer(ckpt: dict, where: str | Path) -> torch.nn.Linear:
    """The z_I layer of a heads checkpoint (the only part used at test time)."""
    sd = ckpt["model"]
    if "embedding.weight" not in sd or "embedding.bias" not in sd:
        raise RunError(f"{where}: checkpoint has no embedding layer (keys: {', '.join(list(sd)[:6])} ...)")
    w, b = sd["embedding.weight"], sd["embedding.bias"]
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    layer.load_state_dict({"weight": w, "bias": b})
    return layer.eval()


def embed(run_dir: str | Path, features: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    """Embed features with a run's heads: z_I only (the test-time output of DVML).

    Args:
        run_dir: a fit-heads run directory.
        features: (N, D) float array, D the run's feature dimension.
    Returns:
        (N, E) float32 embeddings.
    Raises:
        RunError: not a heads run, or D mismatch.
    """
    ckpt = load_checkpoint(run_dir)
    if ckpt.get("kind", "heads") != "heads":
        raise RunError(f"{run_dir}: a {ckpt.get('kind')} run; embed() takes fit-heads runs")
    layer = embedding_layer(ckpt, Path(run_dir) / HEADS_FILE)
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != layer.in_features:
        raise RunError(f"{run_dir}: features must be (N, {layer.in_features}) (the run's feature dimension), "
                       f"got shape {x.shape}")
    out = np.empty((x.shape[0], layer.out_features), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
            out[i:i + batch_size] = layer(chunk).numpy()
    return out
