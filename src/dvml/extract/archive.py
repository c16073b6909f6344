"""Safe, atomic extraction of a dataset archive (``.tgz``/``.tar``/``.zip``).

Contract of :func:`safe_extract`:

* **Nothing escapes the destination.** Every member is checked before anything is written: absolute
  names, names with a ``..`` component, device and FIFO members are refused; a symbolic or hard link is
  refused when its target is absolute or leaves the destination (resolved lexically before extraction,
  and again with the links already on disk while extracting, so a chain of links cannot walk out), and no
  member is written through a link. On Python versions that have it, tarfile's own ``data`` filter is
  applied as well.
* **Links stay in the dataset folder.** A link inside the expected top-level folder must resolve inside
  that folder (the one that is renamed into place), not merely inside the temporary directory.
* **Names are printable UTF-8.** A member (or link target) whose name is not valid UTF-8 or holds a control
  character (a newline, an escape) is refused.
* **Bounded.** The members' total unpacked size (from the headers, before anything is written) may not exceed
  :attr:`Limits.max_bytes`, and above :data:`RATIO_FLOOR` bytes it may not exceed :attr:`Limits.max_ratio`
  times the archive's size (a "zip bomb"). The defaults fit every published dataset with room to spare
  (:data:`DEFAULT_MAX_BYTES`, :data:`DEFAULT_MAX_RATIO`); both can be raised.
* **Atomic.** The archive is unpacked into a hidden temporary directory beside the destination
  (``.dvml-extract-<name>-<pid>``) and only the expected top-level folder is renamed into place at the
  end, one ``os.rename``. A refused, failed or killed extraction therefore never leaves a folder that
  looks complete; the temporary directory is removed on failure, and stale ones from a killed run are
  removed by the next run.

Errors are :class:`ArchiveError` (a :class:`~dvml.errors.DvmlError`): one line naming the archive, the
member and the problem; a truncated or damaged archive (of any compression) is one such line too.
"""

from __future__ import annotations

import logging
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dvml.errors import DvmlError

log = logging.getLogger(__name__)

TMP_PREFIX = ".dvml-extract-"

# progress(members_done, members_total)
ExtractProgress = Callable[[int, int], None]

DEFAULT_MAX_BYTES = 16 * 10**9  # the largest release (SOP's 2.9 GB zip of JPEGs) unpacks to about 3 GB
DEFAULT_MAX_RATIO = 20.0  # JPEG archives unpack to about 1x their size; lists and text are small beside them
RATIO_FLOOR = 64 * 2**20  # below this many unpacked bytes the ratio is not checked (tiny archives of text)

# what a damaged or truncated archive raises, by compression: gzip (EOFError, zlib), bz2/lzma, tar and zip
DAMAGED = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


class ArchiveError(DvmlError):
    """An archive that cannot be extracted safely (or at all); the message names it and the member."""


class ArchiveLimitError(ArchiveError):
    """An archive over :class:`Limits`: perhaps genuine, so the caller keeps it (the limits can be raised)."""


@dataclass(frozen=True)
class Limits:
    """How much an archive may unpack to: ``max_bytes`` in all, and ``max_ratio`` times its own size (checked
    above :data:`RATIO_FLOOR`)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO

    def __post_init__(self):
        if self.max_bytes < 1 or not self.max_ratio > 0:
            raise ValueError(f"archive limits must be positive, got {self.max_bytes} bytes and ratio "
                             f"{self.max_ratio}")

    def check(self, archive: Path, total: int) -> None:
        if total > self.max_bytes:
            raise ArchiveLimitError(f"{archive}: its members unpack to {total:,} bytes, more than the limit of "
                               f"{self.max_bytes:,}; refusing to extract it (raise the limit if the archive is "
                               "genuine)")
        size = max(archive.stat().st_size, 1)
        if total > RATIO_FLOOR and total > self.max_ratio * size:
            raise ArchiveLimitError(f"{archive}: its members unpack to {total:,} bytes, {total / size:,.0f} times its "
                               f"{size:,} bytes (limit {self.max_ratio:g}x): a decompression bomb? refusing to "
                               "extract it (raise the ratio limit if the archive is genuine)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _name_problem(name: str, what: str = "name") -> str | None:
    """Why a name is not printable UTF-8 (tarfile keeps invalid bytes as surrogates), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"has a {what} that is not valid UTF-8"
    if not name.isprintable():
        return f"has a {what} with a control character (newline, tab, escape, ...)"
    return None


def _member_path_problem(name: str) -> str | None:
    """Why a member name is unsafe, or None. Names are ``/``-separated inside archives."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "has a '..' component (would write outside the destination)"
    return _name_problem(name)


def _under(name: str, top: str | None) -> bool:
    """A member inside the top-level folder ``top`` (which becomes the dataset folder)."""
    rel = posixpath.normpath(name.replace("\\", "/"))
    return top is not None and (rel == top or rel.startswith(top + "/"))


def _inside(rel: str) -> bool:
    """A normalised relative posix path that stays inside its root (``''``/``'.'`` is the root itself)."""
    return not (rel == ".." or rel.startswith("../") or rel.startswith("/"))


def _link_problem(name: str, target: str, hard: bool, top: str | None = None) -> str | None:
    """Why a link member is unsafe (lexical check), or None. ``hard`` links name a path from the archive root.
    A link inside ``top`` must stay inside ``top`` (the folder that is kept)."""
    if not target:
        return "is a link with an empty target"
    if target.startswith(("/", "\\")) or (len(target) > 1 and target[1] == ":"):
        return f"is a link to the absolute path {target!r}"
    problem = _name_problem(target, "link target")
    if problem:
        return problem
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if not _inside(resolved):
        return f"is a link to {target!r}, outside the destination"
    if _under(name, top) and not _under(resolved, top):
        return f"is a link to {target!r}, outside the dataset folder {top}/"
    return None


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _check_on_disk(root: Path, name: str, link_target: str | None, hard: bool, top: str | None = None) -> str | None:
    """Checks against what is already extracted (earlier links): the parent must not be reached through a link,
    and a link's target must resolve, following the links on disk, inside ``root`` (inside ``root / top`` for a
    member under ``top``)."""
    rel = posixpath.normpath(name.replace("\\", "/"))
    if rel == "." and link_target is None:
        return None
    parent = (root / rel).parent
    if parent.resolve() != root.resolve() / Path(rel).parent:
        return "would be written through a link"
    if link_target is not None:
        base = root if hard else parent
        fence = root / top if _under(name, top) else root
        if not _is_within((base / link_target).resolve(), fence.resolve()):
            where = f"the dataset folder {top}/" if fence != root else "the destination"
            return f"is a link to {link_target!r}, which resolves outside {where}"
    return None


def _scan_tar(archive: Path, tf: tarfile.TarFile, top: str | None, limits: Limits) -> list[tarfile.TarInfo]:
    try:
        members = tf.getmembers()
    except DAMAGED as e:
        raise ArchiveError(f"{archive}: truncated or damaged ({_one_line(e)}); download or copy it again") from None
    total = 0
    for m in members:
        problem = _member_path_problem(m.name)
        if problem is None and (m.ischr() or m.isblk() or m.isfifo() or m.isdev()):
            problem = "is a device or FIFO"
        if problem is None and (m.issym() or m.islnk()):
            problem = _link_problem(m.name, m.linkname, hard=m.islnk(), top=top)
        if problem is not None:
            raise ArchiveError(f"{archive}: member {m.name!r} {problem}; refusing to extract this archive")
        if m.isfile():
            total += max(m.size, getattr(m, "sparse", None) and max(o + n for o, n in m.sparse) or 0)
    limits.check(archive, total)
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # a Unix symlink stored by `zip --symlinks`
        return zf.read(info).decode("utf-8", "replace")
    return None


def _zip_name_problem(info: zipfile.ZipInfo) -> str | None:
    """A name stored without zip's UTF-8 flag is decoded as cp437 by zipfile: its bytes must still be UTF-8."""
    if info.flag_bits & 0x800 or info.filename.isascii():
        return None
    try:
        info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return "has a name that is not valid UTF-8"
    return None


def _scan_zip(archive: Path, zf: zipfile.ZipFile, top: str | None, limits: Limits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    total = 0
    for info in infos:
        problem = _member_path_problem(info.filename) or _zip_name_problem(info)
        if problem is None:
            try:
                target = _zip_link_target(zf, info)
            except DAMAGED as e:
                raise ArchiveError(f"{archive}: member {info.filename!r} is damaged ({_one_line(e)})") from None
            if target is not None:
                problem = _link_problem(info.filename, target, hard=False, top=top)
        if problem is not None:
            raise ArchiveError(f"{archive}: member {info.filename!r} {problem}; refusing to extract this archive")
        total += info.file_size
    limits.check(archive, total)
    return infos


def _extract_tar(archive: Path, dest: Path, progress: ExtractProgress | None, top: str | None = None,
                 limits: Limits = Limits()) -> None:
    try:
        tf = tarfile.open(archive, "r:*")
    except DAMAGED as e:
        raise ArchiveError(f"{archive}: not a readable tar archive ({_one_line(e)})") from None
    with tf:
        members = _scan_tar(archive, tf, top, limits)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for i, m in enumerate(members, start=1):
            link = m.linkname if (m.issym() or m.islnk()) else None
            problem = _check_on_disk(dest, m.name, link, hard=m.islnk(), top=top)
            if problem is not None:
                raise ArchiveError(f"{archive}: member {m.name!r} {problem}; refusing to extract this archive")
            try:
                tf.extract(m, dest, set_attrs=not m.isdir(), **kwargs)
            except tarfile.FilterError as e:  # a second opinion from tarfile itself
                raise ArchiveError(f"{archive}: member {m.name!r} refused by tarfile ({e})") from None
            except DAMAGED as e:
                raise ArchiveError(f"{archive}: cannot extract member {m.name!r} ({_one_line(e)}); the archive may "
                                   "be truncated or damaged") from None
            if progress is not None:
                progress(i, len(members))


def _extract_zip(archive: Path, dest: Path, progress: ExtractProgress | None, top: str | None = None,
                 limits: Limits = Limits()) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except DAMAGED as e:
        raise ArchiveError(f"{archive}: not a readable zip archive ({_one_line(e)})") from None
    with zf:
        infos = _scan_zip(archive, zf, top, limits)
        for i, info in enumerate(infos, start=1):
            try:
                target = _zip_link_target(zf, info)
            except DAMAGED as e:
                raise ArchiveError(f"{archive}: member {info.filename!r} is damaged ({_one_line(e)})") from None
            problem = _check_on_disk(dest, info.filename, target, hard=False, top=top)
            if problem is not None:
                raise ArchiveError(f"{archive}: member {info.filename!r} {problem}; refusing to extract "
                                   "this archive")
            try:
                if target is not None:
                    path = dest / info.filename.rstrip("/")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(target, path)
                else:
                    zf.extract(info, dest)
            except DAMAGED as e:
                raise ArchiveError(f"{archive}: cannot extract member {info.filename!r} ({_one_line(e)}); the "
                                   "archive may be truncated or damaged") from None
            if progress is not None:
                progress(i, len(infos))


def archive_kind(archive: Path) -> str:
    """``"zip"`` or ``"tar"`` by content (not by name). Raises ArchiveError for anything else."""
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except DAMAGED as e:  # a compressed tar cut short can fail already here
        raise ArchiveError(f"{archive}: truncated or damaged ({_one_line(e)}); download or copy it again") from None
    raise ArchiveError(f"{archive}: neither a tar nor a zip archive (or one truncated before its first member)")


def remove_stale_temporaries(parent: Path, folder: str) -> None:
    """Remove temporary directories a killed extraction of ``folder`` left under ``parent``."""
    for p in parent.glob(f"{TMP_PREFIX}{folder}-*"):
        log.info("removing %s (left by an interrupted extraction)", p)
        shutil.rmtree(p, ignore_errors=True)


def unpack(archive: str | Path, tmp: Path, top: str, *, progress: ExtractProgress | None = None,
           limits: Limits = Limits()) -> Path:
    """Unpack ``archive`` into the (empty, private) directory ``tmp`` with every safety check of this module
    and return ``tmp / top``, the top-level folder the archive must contain.

    Raises ArchiveError (unsafe member, over ``limits``, unreadable or damaged archive, no folder ``top``). The
    caller removes ``tmp``.
    """
    archive = Path(archive)
    kind = archive_kind(archive)
    (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp, progress, top, limits)
    extracted = tmp / top
    if not extracted.is_dir() or extracted.is_symlink():
        found = sorted(p.name for p in tmp.iterdir())[:5]
        raise ArchiveError(f"{archive}: has no top-level folder {top!r} (top level: {', '.join(found) or 'empty'})")
    dropped = sorted(p.name for p in tmp.iterdir() if p.name != top)
    if dropped:
        log.info("%s: ignoring top-level entries outside %s/: %s", archive.name, top, ", ".join(dropped))
    return extracted


def temporary_dir(parent: Path, folder: str) -> Path:
    """A fresh hidden work directory ``parent/.dvml-extract-<folder>-<pid>`` (stale ones removed first)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(parent, folder)
    tmp = parent / f"{TMP_PREFIX}{folder}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def safe_extract(archive: str | Path, parent: str | Path, folder: str, *,
                 progress: ExtractProgress | None = None, limits: Limits = Limits()) -> Path:
    """Unpack ``archive`` and move its top-level ``folder`` to ``parent / folder`` atomically.

    Args:
        archive: a tar (any compression) or zip file.
        parent: directory that receives ``folder`` (created if missing).
        folder: the top-level directory the archive must contain (e.g. ``CUB_200_2011``); other top-level
            entries (CUB's ``attributes.txt``) are dropped.
        progress: optional ``progress(members_done, members_total)``.
    Returns:
        ``parent / folder``.
    Raises:
        ArchiveError: unsafe member (see the module docstring), unreadable archive, no ``folder`` in it, or
        ``parent / folder`` already exists. On any error nothing is left under ``parent`` but what was there.
    """
    archive, parent = Path(archive), Path(parent)
    final = parent / folder
    if final.exists():
        raise ArchiveError(f"{final}: already exists; remove it to extract {archive.name} again")
    tmp = temporary_dir(parent, folder)
    try:
        extracted = unpack(archive, tmp, folder, progress=progress, limits=limits)
        os.rename(extracted, final)  # the one step that makes the folder appear, complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s into %s", archive, final)
    return final
