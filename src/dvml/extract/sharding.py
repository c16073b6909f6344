"""Extraction by N processes (``torchrun --nproc-per-node N -m dvml extract ...``): rank shards, then one merge.

Layout: each split's images are cut into the batches a single process would run (``batch_size`` consecutive
images, by dataset position) and rank ``r`` of ``W`` takes the contiguous block of batches
``[floor(nb·r/W), floor(nb·(r+1)/W))`` (:func:`share`): disjoint, no padding, no duplicate, every image once.
Each batch holds the same images as in a single-process run, so its features are computed from the same
input tensor (the views are seeded by image index, see :mod:`dvml.extract.transforms`) and the merged cache
is bit-identical to a single-process one: same fingerprint (:func:`dvml.cache.fingerprint`).

Files: rank ``r`` writes its rows to ``OUT.parts/rank-RRRRR-of-WWWWW.h5`` through the ordinary
:class:`~dvml.cache.CacheWriter` (chunked, resumable at row granularity, one writer at a time, the skipped
images in its ``extra``); its ``writer_config`` is the job's plus the shard's place, so a rerun with another
world size or other settings is refused rather than mixed. A shard is never marked complete (readers refuse
it); it is *done* when no process writes it and its rows plus its skipped images fill its share.

Merge: when a rank finishes its shard it takes the writer lock of ``OUT``, waiting while another rank holds it;
if every shard is done, it copies the shards in rank order into ``OUT`` (again through
:class:`~dvml.cache.CacheWriter`, so a merge killed half-way resumes at its ``n_written`` rows), marks it
complete and deletes ``OUT.parts``. Checks are serialised by that lock and each rank checks after closing its
own shard, so the last rank to finish sees every shard done: exactly one merges. A shard whose lock is held
while the checker holds ``OUT``'s is being written by its rank, which merges later. A rank that finds its own
shard locked (a checker reading it) waits for the lock rather than assuming its share was merged. No
collective runs after the start, so ranks that finish hours apart do not hit the process group's timeout.

Collectives: only at the start (:func:`agree`), to refuse ranks started with different arguments, or
seeing different image lists, with one line on every rank instead of a hang.

The caller joins the process group (the CLI uses :func:`dvml.finetune.distributed.init_distributed`); this
module only asks ``torch.distributed`` whether one is active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch.distributed as dist

from dvml import files
from dvml.cache import CacheSpec, CacheWriter
from dvml.cache import schema as S
from dvml.errors import DvmlError

log = logging.getLogger(__name__)

MERGE_ROWS = 1024  # rows copied per append while merging
LOCK_POLL_S = 0.2  # how often a rank waiting for a lock held by another rank tries again
_SHARD_RE = re.compile(r"rank-(\d+)-of-(\d+)\.h5$")
# options that do not change a single feature value: they may differ between ranks (per machine)
PER_RANK_OPTIONS = ("device", "workers")


def world_size() -> int:
    """Processes of the active ``torch.distributed`` group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def share(n_rows: int, batch_size: int, rank: int, world: int) -> range:
    """Dataset positions rank ``rank`` of ``world`` extracts: a contiguous block of whole batches.

    >>> [list(share(7, 2, r, 2)) for r in range(2)]
    [[0, 1, 2, 3], [4, 5, 6]]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    n_batches = -(-n_rows // batch_size)
    lo, hi = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(min(lo * batch_size, n_rows), min(hi * batch_size, n_rows))


def parts_dir(out: Path) -> Path:
    """``OUT.parts``: where the ranks' shards live until the merge."""
    return Path(out).with_name(Path(out).name + ".parts")


def shard_path(out: Path, rank: int, world: int) -> Path:
    return parts_dir(out) / f"rank-{rank:05d}-of-{world:05d}.h5"


def _leftover_worlds(out: Path) -> set[int]:
    d = parts_dir(out)
    if not d.is_dir():
        return set()
    return {int(m.group(2)) for p in d.iterdir() if (m := _SHARD_RE.search(p.name))}


def refuse_leftover_shards(out: Path, overwrite: bool, world: int = 1) -> None:
    """Refuse to start over the shards of an interrupted run with another number of processes (they would be lost
    or mixed); with ``overwrite`` delete them. Called by a single process, or rank 0 before the others start."""
    worlds = _leftover_worlds(out) - {world}
    if not worlds:
        return
    if overwrite:
        log.info("%s: removing the shards of an earlier %s-process run (--overwrite)", parts_dir(out),
                 "/".join(map(str, sorted(worlds))))
        shutil.rmtree(parts_dir(out))
        return
    n = max(worlds)
    raise DvmlError(f"{parts_dir(out)}: holds the unfinished shards of a {n}-process extraction; resume it with "
                    f"torchrun --nproc-per-node {n} (same arguments), or pass `overwrite` to start over")


def agree(facts: dict, error: str | None = None, token: str | None = None) -> str | None:
    """All-gather ``facts`` (and this rank's ``error``) and raise the same DvmlError on every rank if any rank
    failed or the ranks' facts differ (naming the first differing key). Returns rank 0's ``token``. No-op in one
    process."""
    if world_size() == 1:
        if error:
            raise DvmlError(error)
        return token
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (facts, error, token))
    for r, (_, err, _) in enumerate(gathered):
        if err:
            raise DvmlError(err if r == rank() else f"rank {r}: {err}")
    ref = gathered[0][0]
    for r, (f, _, _) in enumerate(gathered[1:], start=1):
        for key in sorted(set(ref) | set(f)):
            if ref.get(key) != f.get(key):
                raise DvmlError(f"the ranks disagree about {key}: {ref.get(key)!r} on rank 0, {f.get(key)!r} on "
                                f"rank {r}; start every rank with the same command and the same data")
    return gathered[0][2]


def check_same_arguments(cfg) -> str:
    """Every rank was started with the same extraction arguments (except :data:`PER_RANK_OPTIONS`). Returns this
    run's token (rank 0's random id, the same on every rank), which the merge records in the cache."""
    facts = {("--" + k.replace("_", "-")): (str(v) if isinstance(v, Path) else v)
             for k, v in dataclasses.asdict(cfg).items() if k not in PER_RANK_OPTIONS}
    return agree(facts, token=uuid.uuid4().hex)


def _shard_spec(spec: CacheSpec, rows: dict[str, range], r: int, world: int) -> CacheSpec:
    where = {"rank": r, "world_size": world, **{split: [rg.start, rg.stop] for split, rg in rows.items()}}
    return dataclasses.replace(spec, extra={**spec.extra, "shard": where})


ExtractRows = Callable[[CacheWriter, str, range, list, object], int]


def run_rank(cfg, index, spec: CacheSpec, *, token: str, extract_rows: ExtractRows, extra: dict, progress=None):
    """This rank's part of a sharded extraction: write its shard, then merge if it is the last one done.

    ``extract_rows(writer, split, rows, skipped, progress)`` writes the images ``rows`` of ``split`` (resuming after
    the writer's ``n_written``) and returns how many it processed. Returns ``(n_train, n_test, skipped,
    processed, merged)``: the merged cache's counts and skipped images when this rank merged (``merged`` its
    path), else this rank's own and ``merged`` None.
    """
    r, world = rank(), world_size()
    rows = {split: share(len(index.split(split)), cfg.batch_size, r, world) for split in S.SPLITS}
    path = shard_path(cfg.out, r, world)
    log.info("rank %d/%d: train images %d..%d, test images %d..%d -> %s", r, world, rows[S.TRAIN].start,
             rows[S.TRAIN].stop, rows[S.TEST].start, rows[S.TEST].stop, path)
    processed, skipped, counts = 0, [], [0, 0]
    # held by another rank checking or merging the shards: wait; if it merged this share, `already` says so
    writer = _waiting(lambda: CacheWriter(path, _shard_spec(spec, rows, r, world), overwrite=cfg.overwrite))
    with writer:
        # holding this shard's lock, no merge can start or be under way: a cache stamped with this run's token was
        # merged, from the earlier run's copy of this share, before this rank got here
        already = _merged_in_run(cfg.out, token)
        if not already:
            writer.set_extra(**extra)
            skipped = list(writer.extra().get("skipped", []))
            for split in S.SPLITS:
                processed += extract_rows(writer, split, rows[split], skipped, progress)
            writer.set_extra(skipped=skipped)
            counts = [writer.n_written(split) for split in S.SPLITS]
    if already:
        path.unlink(missing_ok=True)  # the fresh empty shard the writer just created
        with contextlib.suppress(OSError):
            parts_dir(cfg.out).rmdir()
        return counts[0], counts[1], skipped, processed, None
    merged = merge(cfg.out, spec, world, token=token, overwrite=cfg.overwrite)
    if merged is not None:
        return merged[0], merged[1], merged[2], processed, cfg.out
    return counts[0], counts[1], skipped, processed, None


def _waiting(acquire: Callable[[], object]):
    """``acquire()`` (which raises :class:`~dvml.files.BusyError` while another process holds the lock it takes),
    tried again every :data:`LOCK_POLL_S` seconds until it succeeds; logs once when it has to wait."""
    told = False
    while True:
        try:
            return acquire()
        except files.BusyError as e:
            if not told:
                log.info("waiting: %s", e)
                told = True
            time.sleep(LOCK_POLL_S)


def _merged_in_run(out: Path, token: str) -> bool:
    """``out`` is complete and was merged by this run (its ``extra["run_token"]`` is ``token``)."""
    try:
        with h5py.File(out, "r") as f:
            return bool(f.attrs.get(S.ATTR_COMPLETE, False)) and \
                json.loads(f.attrs.get(S.ATTR_EXTRA, "{}")).get("run_token") == token
    except OSError:
        return False


def _shard_state(path: Path, spec: CacheSpec) -> tuple[dict, dict[str, int]] | None:
    """``(extra, n_written per split)`` of a finished shard written with ``spec``; None while it is written, or when
    it is missing, unfinished or another job's (a leftover of a run with other settings)."""
    if files.writer_pid(path) is not None or not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        if json.loads(f.attrs.get(S.ATTR_WRITER_CONFIG, "{}")) != json.loads(spec.to_json()):
            return None
        extra = json.loads(f.attrs.get(S.ATTR_EXTRA, "{}"))
        n = {split: int(f[split].attrs[S.ATTR_N_WRITTEN]) for split in S.SPLITS}
    where = extra.get("shard", {})
    for split in S.SPLITS:
        lo, hi = where[split]
        skipped = sum(1 for s in extra.get("skipped", []) if s["split"] == split)
        if n[split] + skipped != hi - lo:
            return None
    return extra, n


def merge(out: Path, spec: CacheSpec, world: int, *, token: str, overwrite: bool = False):
    """Copy every done shard into ``out`` in rank order and mark it complete (stamped with the run's ``token``);
    returns ``(n_train, n_test, skipped)``, or None when a shard is not done yet or the merge already happened
    (here or by another rank). Holds the writer locks of ``out`` (waiting for it while another rank checks or merges)
    and of every shard throughout."""
    out = Path(out)
    locks = [_waiting(files.WriterLock(out).acquire)]
    try:
        if not parts_dir(out).is_dir():
            return None  # merged already
        shard_specs = []
        for r in range(world):
            locks.append(files.WriterLock(shard_path(out, r, world)).acquire())  # BusyError: a rank writes it
            with h5py.File(shard_path(out, r, world), "r") if shard_path(out, r, world).is_file() else \
                    contextlib.nullcontext() as f:
                where = json.loads(f.attrs.get(S.ATTR_EXTRA, "{}")).get("shard") if f is not None else None
            if where is None:
                return None
            rows = {split: range(*where[split]) for split in S.SPLITS}
            shard_specs.append(_shard_spec(spec, rows, r, world))
        states = [_shard_state(shard_path(out, r, world), shard_specs[r]) for r in range(world)]
        if any(s is None for s in states):
            return None  # the last rank to finish merges
        log.info("merging %d shards into %s", world, out)
        skipped = [s for split in S.SPLITS for extra, _ in states for s in extra.get("skipped", [])
                   if s["split"] == split]
        with CacheWriter(out, spec, overwrite=overwrite) as writer:
            first = states[0][0]
            writer.set_extra(root=first.get("root"), device=first.get("device"), amp=first.get("amp"),
                             world_size=world, run_token=token)
            for split in S.SPLITS:
                done, offset = writer.n_written(split), 0
                for r, (_, n) in enumerate(states):
                    lo = max(0, done - offset)
                    if lo < n[split]:
                        _copy_rows(shard_path(out, r, world), split, lo, n[split], writer)
                    offset += n[split]
            writer.set_extra(skipped=skipped)
            counts = [writer.n_written(split) for split in S.SPLITS]
            writer.finalize()
        shutil.rmtree(parts_dir(out))  # while holding the shards' locks: no rank reopens a shard half-deleted
        return counts[0], counts[1], skipped
    except files.BusyError:
        return None  # a rank writes its shard: it checks again when it is done
    finally:
        for lock in reversed(locks):
            lock.release()


def _copy_rows(path: Path, split: str, lo: int, hi: int, writer: CacheWriter) -> None:
    with h5py.File(path, "r") as f:
        g = f[split]
        for a in range(lo, hi, MERGE_ROWS):
            b = min(a + MERGE_ROWS, hi)
            paths = list(g[S.PATHS].asstr()[a:b]) if S.PATHS in g else None
            roles = np.asarray(g[S.ROLES][a:b]) if S.ROLES in g else None
            writer.append(split, np.asarray(g[S.FEATURES][a:b]), np.asarray(g[S.LABELS][a:b]), paths, roles)
