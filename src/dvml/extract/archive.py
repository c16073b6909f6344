"""Safe, atomic extraction of a dataset archive (``.tgz``/``.tar``/``.zip``).

Contract of :func:`safe_extract`:

* **Nothing escapes the destination.** Every member is checked before anything is written: absolute
  names, names with a ``..`` component, device and FIFO members are refused; a symbolic or hard link is
  refused when its target is absolute or leaves the destination (resolved lexically before extraction,
  and again with the links already on disk while extracting, so a chain of links cannot walk out), and no
  member is written through a link. On Python versions that have it, tarfile's own ``data`` filter is
  applied as well.
* **Atomic.** The archive is unpacked into a hidden temporary directory beside the destination
  (``.dvml-extract-<name>-<pid>``) and only the expected top-level folder is renamed into place at the
  end, one ``os.rename``. A refused, failed or killed extraction therefore never leaves a folder that
  looks complete; the temporary directory is removed on failure, and stale ones from a killed run are
  removed by the next run.

Errors are :class:`ArchiveError` (a :class:`~dvml.errors.DvmlError`): one line naming the archive, the
member and the problem.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from dvml.errors import DvmlError

log = logging.getLogger(__name__)

TMP_PREFIX = ".dvml-extract-"

# progress(members_done, members_total)
ExtractProgress = Callable[[int, int], None]


class ArchiveError(DvmlError):
    """An archive that cannot be extracted safely (or at all); the message names it and the member."""


def _member_path_problem(name: str) -> str | None:
    """Why a member name is unsafe, or None. Names are ``/``-separated inside archives."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "has a '..' component (would write outside the destination)"
    return None


def _inside(rel: str) -> bool:
    """A normalised relative posix path that stays inside its root (``''``/``'.'`` is the root itself)."""
    return not (rel == ".." or rel.startswith("../") or rel.startswith("/"))


def _link_problem(name: str, target: str, hard: bool) -> str | None:
    """Why a link member is unsafe (lexical check), or None. ``hard`` links name a path from the archive root."""
    if not target:
        return "is a link with an empty target"
    if target.startswith(("/", "\\")) or (len(target) > 1 and target[1] == ":"):
        return f"is a link to the absolute path {target!r}"
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if not _inside(resolved):
        return f"is a link to {target!r}, outside the destination"
    return None


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _check_on_disk(root: Path, name: str, link_target: str | None, hard: bool) -> str | None:
    """Checks against what is already extracted (earlier links): the parent must not be reached through a link,
    and a link's target must resolve, following the links on disk, inside ``root``."""
    rel = posixpath.normpath(name.replace("\\", "/"))
    if rel == "." and link_target is None:
        return None
    parent = (root / rel).parent
    if parent.resolve() != root.resolve() / Path(rel).parent:
        return "would be written through a link"
    if link_target is not None:
        base = root if hard else parent
        if not _is_within((base / link_target).resolve(), root.resolve()):
            return f"is a link to {link_target!r}, which resolves outside the destination"
    return None


def _scan_tar(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        problem = _member_path_problem(m.name)
        if problem is None and (m.ischr() or m.isblk() or m.isfifo() or m.isdev()):
            problem = "is a device or FIFO"
        if problem is None and (m.issym() or m.islnk()):
            problem = _link_problem(m.name, m.linkname, hard=m.islnk())
        if problem is not None:
            raise ArchiveError(f"{archive}: member {m.name!r} {problem}; refusing to extract this archive")
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # a Unix symlink stored by `zip --symlinks`
        return zf.read(info).decode("utf-8", "replace")
    return None


def _scan_zip(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        problem = _member_path_problem(info.filename)
        if problem is None:
            target = _zip_link_target(zf, info)
            if target is not None:
                problem = _link_problem(info.filename, target, hard=False)
        if problem is not None:
            raise ArchiveError(f"{archive}: member {info.filename!r} {problem}; refusing to extract this archive")
    return infos


def _extract_tar(archive: Path, dest: Path, progress: ExtractProgress | None) -> None:
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(f"{archive}: not a readable tar archive ({e})") from None
    with tf:
        members = _scan_tar(archive, tf)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for i, m in enumerate(members, start=1):
            link = m.linkname if (m.issym() or m.islnk()) else None
            problem = _check_on_disk(dest, m.name, link, hard=m.islnk())
            if problem is not None:
                raise ArchiveError(f"{archive}: member {m.name!r} {problem}; refusing to extract this archive")
            try:
                tf.extract(m, dest, set_attrs=not m.isdir(), **kwargs)
            except tarfile.FilterError as e:  # a second opinion from tarfile itself
                raise ArchiveError(f"{archive}: member {m.name!r} refused by tarfile ({e})") from None
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ArchiveError(f"{archive}: cannot extract member {m.name!r} ({e}); the archive may be "
                                   "truncated or damaged") from None
            if progress is not None:
                progress(i, len(members))


def _extract_zip(archive: Path, dest: Path, progress: ExtractProgress | None) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive}: not a readable zip archive ({e})") from None
    with zf:
        infos = _scan_zip(archive, zf)
        for i, info in enumerate(infos, start=1):
            target = _zip_link_target(zf, info)
            problem = _check_on_disk(dest, info.filename, target, hard=False)
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
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ArchiveError(f"{archive}: cannot extract member {info.filename!r} ({e}); the archive may "
                                   "be truncated or damaged") from None
            if progress is not None:
                progress(i, len(infos))


def archive_kind(archive: Path) -> str:
    """``"zip"`` or ``"tar"`` by content (not by name). Raises ArchiveError for anything else."""
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except OSError:
        pass
    raise ArchiveError(f"{archive}: neither a tar nor a zip archive")


def remove_stale_temporaries(parent: Path, folder: str) -> None:
    """Remove temporary directories a killed extraction of ``folder`` left under ``parent``."""
    for p in parent.glob(f"{TMP_PREFIX}{folder}-*"):
        log.info("removing %s (left by an interrupted extraction)", p)
        shutil.rmtree(p, ignore_errors=True)


def unpack(archive: str | Path, tmp: Path, top: str, *, progress: ExtractProgress | None = None) -> Path:
    """Unpack ``archive`` into the (empty, private) directory ``tmp`` with every safety check of this module
    and return ``tmp / top``, the top-level folder the archive must contain.

    Raises ArchiveError (unsafe member, unreadable archive, no folder ``top``). The caller removes ``tmp``.
    """
    archive = Path(archive)
    kind = archive_kind(archive)
    (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp, progress)
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
                 progress: ExtractProgress | None = None) -> Path:
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
        extracted = unpack(archive, tmp, folder, progress=progress)
        os.rename(extracted, final)  # the one step that makes the folder appear, complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s into %s", archive, final)
    return final
