"""Getting the benchmark datasets onto disk, checked: download (resumable), MD5, safe extraction, verification.

Sources (:data:`SOURCES`, from :mod:`dvml.extract.registry`'s entries; the MD5s are the original releases'):

==========  ===================================================================  ===============================
dataset     files                                                                 download
==========  ===================================================================  ===============================
``cub``     ``CUB_200_2011.tgz`` MD5 97eceeb196236b17998738112f37df78              CaltechDATA (the old
                                                                                  vision.caltech.edu links are dead)
``sop``     ``Stanford_Online_Products.zip`` MD5 7f73d41a2f44250d4779881525aea32e  Stanford CVGL's server
``cars196`` ``car_ims.tgz`` MD5 d5c8f0aa497503f355e17dc7886c3f14,                 none: the original links return
            ``cars_annos.mat`` MD5 b407c6086d669747186bd1d764ff9dbc                404 since 2023; bring the files
``inshop``  ``img.zip``, ``Eval/list_eval_partition.txt`` (no published MD5s)       none: Google Drive of the
                                                                                  DeepFashion project; bring them
==========  ===================================================================  ===============================

:func:`download` gets every file of a source into ``--to`` (skipping one already there with the right MD5,
resuming a ``.part`` file with an HTTP ``Range`` request, retrying a connection cut mid-file), checks its
MD5 *before* extracting, then assembles the dataset directory (``--to/CUB_200_2011`` etc., what ``dvml
extract --root`` takes) in a hidden temporary directory, verifies its structure and counts there, and
renames it into place. So a killed or failed run never leaves a ``.tgz``/``.zip`` or a dataset directory
that looks complete: the partial download is ``NAME.part`` (resumed by the next run; removed when its
checksum is wrong), and the extraction is ``.dvml-extract-*`` (removed). A file without a download URL
(Cars196, In-Shop) must be placed in ``--to`` by hand; :func:`manual_steps` says where to get it.

:func:`verify` checks a directory the user brings: the MD5 of every source file present, the dataset's
official structure (the reader of :mod:`dvml.extract.datasets` parses it), the official image and class
counts (for In-Shop also the query/gallery sizes), and that every listed image exists.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dvml import __version__
from dvml.cache import schema as S
from dvml.errors import DvmlError
from dvml.extract.archive import ArchiveError, ArchiveLimitError, Limits, temporary_dir, unpack
from dvml.extract.datasets import DatasetIndex, DatasetName, read_dataset
from dvml.extract.registry import SOURCES as SOURCES  # re-exported: name -> source
from dvml.extract.registry import Counts as Counts
from dvml.extract.registry import DatasetSource as DatasetSource
from dvml.extract.registry import RemoteFile as RemoteFile
from dvml.extract.registry import dataset_spec

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"

ProgressFn = Callable[[str, str, int, "int | None"], None]
"""``progress(stage, name, done, total)``: stage is ``"download"`` (bytes), ``"md5"`` (bytes) or
``"extract"`` (archive members); ``total`` is None when the server does not say."""


class DownloadError(DvmlError):
    """A file that cannot be fetched; the message names the URL, the reason and the manual steps."""


class ChecksumError(DvmlError):
    """A file whose MD5 is not the published one."""


def source_for(name: DatasetName | str) -> DatasetSource:
    """The source of a registered dataset; DvmlError for one without (``folder``: a user's own images)."""
    key = dataset_spec(name).name
    if key not in SOURCES:
        raise DvmlError(f"{key}: not a published dataset; nothing to download or verify "
                        f"(choose from {', '.join(SOURCES)})")
    return SOURCES[key]


def manual_steps(source: DatasetSource, to: Path) -> str:
    """One paragraph: where to get the files by hand and where to put them."""
    files = ", ".join(f.name + (f" (MD5 {f.md5})" if f.md5 else "") for f in source.files)
    return (f"get {files} from {source.obtain}; put {'them' if len(source.files) > 1 else 'it'} in {to} and run "
            f"`dvml data download {source.name} --out {to}` (it checks "
            f"{'the MD5' if any(f.md5 for f in source.files) else 'the structure'} and unpacks into "
            f"{to / source.folder})")


# ------------------------------------------------------------------------------------------------ MD5
def md5sum(path: Path, progress: ProgressFn | None = None, name: str | None = None) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks (``name``: what progress reports, default the file name)."""
    h = hashlib.md5(usedforsecurity=False)
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("md5", name or path.name, done, total)
    return h.hexdigest()


def check_md5(path: Path, expected: str | None, progress: ProgressFn | None = None,
              name: str | None = None) -> str:
    """MD5 of ``path``; ChecksumError naming the file and both sums when ``expected`` differs."""
    got = md5sum(path, progress, name)
    if expected is not None and got != expected.lower():
        raise ChecksumError(f"{path}: MD5 {got} but the published MD5 is {expected}: not the original file "
                            "(damaged, truncated, or a different release)")
    return got


# ------------------------------------------------------------------------------------------------ HTTP
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": f"dvml/{__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _reason(e: BaseException) -> str:
    """One line for a network error (urllib's redirect-loop message spans three)."""
    text = getattr(e, "reason", None) or repr(e)
    return " ".join(str(text).split())


def _kept(part: Path) -> str:
    size = part.stat().st_size if part.exists() else 0
    return f"; {part} keeps the {size:,} bytes received, rerun to resume" if size else ""


def fetch(url: str, dest: Path, *, md5: str | None = None, progress: ProgressFn | None = None,
          retries: int = 20, timeout: float = 60.0, max_bytes: int | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resumably, and check its MD5 before renaming.

    An existing ``dest.part`` is continued with ``Range: bytes=<size>-`` (a server that answers 200 instead
    of 206 restarts it). A connection cut mid-file (after some bytes arrived) is resumed the same way, up
    to ``retries`` times per call; an attempt that receives nothing fails at once (offline, refused, HTTP
    error). ``dest`` appears only once the whole file has the expected size and MD5; a wrong MD5 removes the
    ``.part`` file (resuming it could never succeed), and so does a download that grows past ``max_bytes``
    (checked as the bytes arrive, so a server that never says the length cannot fill the disk). Bytes are
    written as they arrive: a server that stalls leaves what it sent in ``.part`` for the next run.

    Raises:
        DownloadError: unreachable, HTTP error, cut too often (``.part`` kept: rerun resumes), or larger than
            ``max_bytes`` (``.part`` removed).
        ChecksumError: the finished file is not the published one.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + PART_SUFFIX)
    dest.parent.mkdir(parents=True, exist_ok=True)
    resumes = 0
    total: int | None = None
    while True:
        have = part.stat().st_size if part.exists() else 0
        received = 0
        try:
            with _open(url, have, timeout) as resp:
                if have and resp.status == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise DownloadError(f"{url}: the server answered the resume request with Content-Range "
                                            f"{resp.headers.get('Content-Range')!r}, not from byte {have}; "
                                            f"delete {part} and rerun")
                    total = None if m.group(3) == "*" else int(m.group(3))
                    mode = "ab"
                    if have:
                        log.info("%s: resuming at byte %d", dest.name, have)
                else:  # 200: the whole file (a server without Range support restarts a .part)
                    if have:
                        log.info("%s: the server does not resume (HTTP %d); starting over", dest.name, resp.status)
                    have = 0
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    mode = "wb"
                if max_bytes is not None and total is not None and total > max_bytes:
                    raise DownloadError(f"{url}: the server announces {total:,} bytes, more than the published "
                                        f"file's {max_bytes:,}: not the published file; not downloaded")
                read = getattr(resp, "read1", resp.read)  # what has arrived, not a full 1 MiB buffer
                if progress is not None:
                    progress("download", dest.name, have, total)
                out = None  # opened at the first byte: a restart that receives nothing keeps the old .part
                try:
                    while chunk := read(CHUNK_BYTES):
                        if out is None:
                            out = open(part, mode)
                        out.write(chunk)
                        out.flush()  # a stalled or killed connection keeps every byte received
                        received += len(chunk)
                        if max_bytes is not None and have + received > max_bytes:
                            break
                        if progress is not None:
                            progress("download", dest.name, have + received, total)
                    if out is None and (mode == "wb" and total == 0 or not part.exists()):
                        out = open(part, mode)  # an empty file
                finally:
                    if out is not None:
                        out.close()
                if max_bytes is not None and have + received > max_bytes:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{url}: sent more than {max_bytes:,} bytes, more than the published file "
                                        f"(the server gave no length); not the published file, the partial "
                                        f"download was removed")
            size = part.stat().st_size
            if total is not None and size < total:  # the server closed early without an error
                raise http.client.IncompleteRead(b"", total - size)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the .part is (over)complete; the MD5 decides
                break
            raise DownloadError(f"{url}: HTTP {e.code} {_reason(e)}{_kept(part)}") from None
        except (OSError, http.client.HTTPException) as e:
            reason = _reason(e)
            if not received or resumes >= retries:
                raise DownloadError(f"{url}: cannot download ({reason}){_kept(part)}") from None
            resumes += 1
            log.warning("%s: connection lost after %d bytes (%s); resuming", dest.name, have + received, reason)
    try:
        check_md5(part, md5, progress, name=dest.name)
    except ChecksumError as e:
        part.unlink()
        raise ChecksumError(f"{e} (downloaded from {url}; the partial file was removed, rerun to download "
                            "it again)") from None
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------------------------ verify
@dataclass(frozen=True)
class Check:
    """One verification result: ``what`` was checked, ``ok``, and a one-line ``detail``; ``checked`` False for a
    check that had nothing to look at (it does not fail the report, and says so rather than "ok")."""

    what: str
    ok: bool
    detail: str
    checked: bool = True


@dataclass(frozen=True)
class Report:
    """What :func:`verify` found. ``root`` is the dataset directory (``None`` when none was found)."""

    dataset: str
    root: Path | None
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _count_checks(index: DatasetIndex, counts: Counts | None) -> list[Check]:
    n_tr, n_te = len(index.train), len(index.test)
    c_tr, c_te = len({s.label for s in index.train}), len({s.label for s in index.test})
    found = {"train images": n_tr, "train classes": c_tr, "test images": n_te, "test classes": c_te}
    if index.test_roles is not None:
        found["query images"] = sum(1 for r in index.test_roles if r & S.ROLE_QUERY)
        found["gallery images"] = sum(1 for r in index.test_roles if r & S.ROLE_GALLERY)
    if counts is None:
        return [Check("counts", True, ", ".join(f"{v:,} {k}" for k, v in found.items()) + " (no official counts)")]
    expected = {"train images": counts.train_images, "train classes": counts.train_classes,
                "test images": counts.test_images, "test classes": counts.test_classes,
                "query images": counts.query, "gallery images": counts.gallery}
    checks = []
    for key, value in found.items():
        want = expected.get(key)
        if want is None:
            continue
        checks.append(Check(key, value == want, f"{value:,}" + ("" if value == want else f", expected {want:,}")))
    return checks


def _image_check(index: DatasetIndex, limit: int = 3) -> Check:
    missing = [s.path for s in index.train + index.test if not (index.root / s.path).is_file()]
    n = len(index.train) + len(index.test)
    if missing:
        return Check("image files", False, f"{len(missing):,} of {n:,} listed images missing under {index.root}, "
                                           f"e.g. {', '.join(missing[:limit])}")
    return Check("image files", True, f"all {n:,} listed images present")


def structure_checks(name: str, root: Path, counts: Counts | None) -> tuple[DatasetIndex | None, list[Check]]:
    """Parse ``root`` with the dataset's reader, compare the official counts, look for every image."""
    try:
        index = read_dataset(name, root)
    except DvmlError as e:
        return None, [Check("structure", False, str(e))]
    checks = [Check("structure", True, f"{index.root}: {index.split_rule}")]
    checks += _count_checks(index, counts)
    checks.append(_image_check(index))
    return index, checks


def _find_root(source: DatasetSource, path: Path) -> Path:
    """``path`` itself when it holds the dataset, else ``path/<folder>`` when that exists, else ``path``."""
    nested = path / source.folder
    if nested.is_dir():
        try:
            read_dataset(source.name, path)
        except DvmlError:
            return nested
    return path


def verify(name: DatasetName | str, path: str | Path, *, source: DatasetSource | None = None,
           progress: ProgressFn | None = None) -> Report:
    """Check a dataset directory (or the ``--to`` directory of :func:`download`, which holds it).

    Checks the MD5 of every source file found (archives beside or in the dataset directory; a checksummed
    non-archive file such as ``cars_annos.mat`` inside it), the structure (the reader parses it), the
    official counts, and that every listed image exists. Never modifies anything.
    """
    source = source or source_for(name)
    path = Path(path).expanduser()
    if not path.is_dir():
        return Report(source.name, None, (Check("directory", False, f"{path}: not found or not a directory; "
                                                 + manual_steps(source, path)),))
    root = _find_root(source, path)
    checks: list[Check] = []
    for f in source.files:
        candidates = [root / f.dest] if f.top is None else []
        candidates += [path / f.name, root / f.name, root.parent / f.name, *(path / a for a in f.also)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            if f.top is None and f.md5:  # a checksummed file the dataset itself needs
                checks.append(Check(f"{f.name} MD5", False, f"{root / f.dest}: not found"))
            elif f.md5:  # an archive that is not kept here: the unpacked tree is checked instead
                checks.append(Check(f"{f.name} MD5", True, f"no {f.name} in {path}; the unpacked files are "
                                    "checked instead", checked=False))
            continue
        if f.md5 is None:
            continue
        try:
            check_md5(found, f.md5, progress)
            checks.append(Check(f"{f.name} MD5", True, f"{found}: {f.md5}"))
        except ChecksumError as e:
            checks.append(Check(f"{f.name} MD5", False, str(e)))
    _, more = structure_checks(source.name, root, source.counts)
    return Report(source.name, root, tuple(checks + more))


# ------------------------------------------------------------------------------------------------ download
def _assemble(source: DatasetSource, to: Path, files: dict[str, Path], progress: ProgressFn | None,
              limits: Limits = Limits()) -> Path:
    """Unpack/copy the verified files into ``to/.dvml-extract-<folder>-<pid>/<folder>``, check the structure
    and counts there, then rename it to ``to/<folder>``. ``files``: where each source file is."""
    final = to / source.folder
    tmp = temporary_dir(to, source.folder)
    try:
        staged = tmp / source.folder
        staged.mkdir()
        for f in source.files:
            if f.top is None:
                target = staged / f.dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(files[f.name], target)
                continue
            work = tmp / f".unpack-{f.name}"
            work.mkdir()

            def member_progress(done: int, total: int, _name=f.name) -> None:
                if progress is not None:
                    progress("extract", _name, done, total)

            try:
                extracted = unpack(files[f.name], work, f.top, progress=member_progress, limits=limits)
            except ArchiveLimitError as e:  # perhaps genuine: kept, the limits can be raised
                raise ArchiveLimitError(f"{e}; {to / source.folder} was not created") from None
            except ArchiveError as e:  # unsafe or damaged: a downloaded copy would only fail again
                if not f.urls:  # brought by hand: the user's file stays
                    raise ArchiveError(f"{e} ({to / source.folder} was not created)") from None
                files[f.name].unlink(missing_ok=True)
                raise ArchiveError(f"{e} ({files[f.name]} was removed; {to / source.folder} was not created)") \
                    from None
            if f.dest:
                os.rename(extracted, staged / f.dest)
            else:  # the archive's folder is the dataset directory
                staged.rmdir()
                os.rename(extracted, staged)
            shutil.rmtree(work)
        _, checks = structure_checks(source.name, staged, source.counts)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise DvmlError(f"{to}: the unpacked {source.name} does not look like the official release: "
                            + "; ".join(f"{c.what}: {c.detail}" for c in failed) + f" ({to / source.folder} "
                            "was not created)")
        os.rename(staged, final)  # the one step that makes the dataset directory appear, complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked %s into %s", source.name, final)
    return final


def download(name: DatasetName | str, to: str | Path, *, source: DatasetSource | None = None,
             url: str | None = None, progress: ProgressFn | None = None, retries: int = 5,
             timeout: float = 60.0, keep_archives: bool = True, limits: Limits = Limits()) -> Path:
    """Get a dataset into ``to/<folder>`` (see the module docstring); return that directory.

    Args:
        name: ``cub``, ``sop``, ``cars196`` or ``inshop``.
        to: directory for the downloaded files and the dataset directory.
        source: override :data:`SOURCES` (tests, private mirrors with the same files).
        url: a mirror of the (single) archive, tried before the official URL; the MD5 must still match.
        keep_archives: keep the archive files after unpacking (their MD5 lets ``verify`` recheck them).
        limits: how much an archive may unpack to (:class:`~dvml.extract.archive.Limits`).
    Raises:
        DownloadError (unreachable, with the manual steps), ChecksumError, ArchiveError (unsafe archive),
        DvmlError (a file with no download URL is missing; the unpacked tree is not the official one; the
        dataset directory exists but does not verify).
    """
    source = source or source_for(name)
    to = Path(to).expanduser()
    if to.exists() and not to.is_dir():
        raise DvmlError(f"{to}: exists and is not a folder; name the folder to download into")
    final = to / source.folder
    if final.exists():
        _, checks = structure_checks(source.name, final, source.counts)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise DvmlError(f"{final}: exists but does not verify ({failed[0].what}: {failed[0].detail}); "
                            "move it away and rerun to download and unpack it again")
        log.info("%s: already present and verified", final)
        return final
    to.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for f in source.files:
        dest = to / f.name
        present = f.local(to)
        if present is not None:
            if f.md5:
                log.info("%s: present; checking its MD5", present)
                check_md5(present, f.md5, progress)
            files[f.name] = present
            continue
        urls = ((url,) if url and len(source.files) == 1 else ()) + f.urls
        if not urls:
            raise DvmlError(f"{dest}: not found, and {source.name} has no official download: "
                            + manual_steps(source, to))
        errors = []
        for i, u in enumerate(urls):
            try:
                files[f.name] = fetch(u, dest, md5=f.md5, progress=progress, retries=retries, timeout=timeout,
                                      max_bytes=f.max_bytes)
                break
            except DownloadError as e:
                errors.append(str(e))
                if i + 1 < len(urls):
                    log.warning("%s; trying the next URL", e)
        else:
            raise DownloadError("; ".join(errors) + ". Manual steps: " + manual_steps(source, to))
    path = _assemble(source, to, files, progress, limits)
    if not keep_archives:
        for p in files.values():
            p.unlink(missing_ok=True)
    return path
