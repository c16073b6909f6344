"""Writing files safely: the one mechanism behind every file dvml writes, and the writer lock.

* :func:`write_file` (and :func:`write_text`, :func:`write_json`): a regular target is written to a temporary
  file beside it, flushed, fsynced and renamed over it (``os.replace``), so a crash or a full disk leaves either
  the old or the new file, never half of one, and no temporary file. A symlink is written *through*: the file it
  points to is replaced and the link stays a link. A target that exists and is not a regular file (a terminal, a
  pipe or FIFO, ``/dev/stdout``, a character device) is opened and written directly; ``-`` means standard
  output. A directory as target is refused before anything is created. :func:`write_via_path` does the same
  for a library that writes only to a file name (ONNX export), or a writer that reads its file back before it
  counts: it is handed the temporary file's path.
* :class:`WriteError`: every failed write is reported as ``cannot write PATH: CAUSE`` (``CAUSE`` from
  :func:`describe`, which also reads HDF5's error text), a :class:`~dvml.errors.DvmlError` the CLI prints as one
  line.
* :func:`writer_lock` / :func:`writer_pid`: one writer per cache file or run directory. The lock is an
  ``fcntl.flock`` on ``.NAME.lock`` beside the target (symlinks resolved), holding the writer's pid; the kernel
  drops it when the process ends however it ends (``kill -9`` included), so a dead writer never blocks a
  resume. A second writer gets :class:`BusyError` ("... is being written by another process (pid N)");
  readers ask :func:`writer_pid` first. The lock file is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from dvml.errors import DvmlError

STDOUT = "-"  # the target name that means standard output


class WriteError(DvmlError):
    """A file could not be written: ``cannot write PATH: CAUSE``."""

    def __init__(self, path: str | Path, cause: str | BaseException):
        self.path = Path(path)
        self.cause = describe(cause) if isinstance(cause, BaseException) else str(cause)
        super().__init__(f"cannot write {self.path}: {self.cause}")


class BusyError(DvmlError):
    """Another live process is writing the target: ``PATH: is being written by another process (pid N)``."""

    def __init__(self, path: str | Path, pid: int | None, hint: str = "wait for it to finish, or stop it"):
        self.path, self.pid = Path(path), pid
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"{self.path}: is being written by another process ({who}); {hint}")


_HDF5_MESSAGE = re.compile(r"error message = '([^']*)'")
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def describe(e: BaseException) -> str:
    """The cause of an I/O error in a few words: ``strerror`` (``No space left on device``), else the text HDF5
    puts in its messages, else ``str(e)``."""
    text = str(e)
    m = _HDF5_MESSAGE.search(text)
    if m:
        return m.group(1)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = _HDF5_ERRNO.search(text)
    if m:
        return os.strerror(int(m.group(1)))
    return text.splitlines()[0] if text else type(e).__name__


def os_error_message(e: OSError) -> str:
    """One line for an OSError no writer translated: ``FILE: CAUSE`` (``FILE -> FILE2: CAUSE`` for a rename)."""
    if e.filename is None:
        return describe(e)
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{where}: {describe(e)}"


def _dir_problem(d: Path) -> str | None:
    """Why directory ``d`` cannot be created, if an ancestor is not a directory (else None)."""
    for p in (d, *d.parents):
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):  # look further up for the culprit
            continue
        except OSError as e:
            return f"{p}: {describe(e)}"
        return None if stat.S_ISDIR(st.st_mode) else f"{p} is not a directory"
    return None


def make_dir(d: str | Path, *, target: str | Path | None = None) -> Path:
    """``mkdir -p d``; a failure is a :class:`WriteError` naming ``target`` (default ``d``)."""
    d = Path(d)
    problem = _dir_problem(d)
    if problem:
        raise WriteError(target or d, problem)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(target or d, e) from None
    return d


def check_free_space(path: str | Path, nbytes: int, *, margin: int = 1 << 20) -> None:
    """Raise ``WriteError(path, "No space left on device ...")`` unless the file system holding ``path`` has
    room for ``nbytes`` twice over plus ``margin``: for writers whose library cannot recover from a failed write
    (HDF5), so that a full disk is reported *before* the write and the file stays usable."""
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return  # cannot tell: let the write itself report
    free = st.f_bavail * st.f_frsize
    need = 2 * int(nbytes) + margin
    if free < need:
        raise WriteError(path, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free, about "
                               f"{need / 2**20:.1f} MiB needed)")


def _real_target(path: Path) -> Path:
    """Where a write to ``path`` lands (symlinks resolved), after creating ``path``'s parent directories *as
    named* (``mkdir -p``, which fails on a dangling symlinked folder instead of creating its target). A symlink
    (in the last component) whose target's folder does not exist is a :class:`WriteError`: no folder outside
    the path given is ever created."""
    path = Path(path)
    make_dir(path.parent, target=path)
    real = Path(os.path.realpath(path))
    if os.path.islink(path) and not real.parent.is_dir():
        raise WriteError(path, f"is a symbolic link to {os.readlink(path)}, whose folder {real.parent} does not "
                               "exist")
    return real


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Refuse (:class:`~dvml.errors.DvmlError`) to replace an existing output unless ``overwrite``: a file, a
    symlink to one, and a *dangling* symlink too (``Path.exists`` says False for it; writing would go wherever
    it points). ``-`` (standard output) is always allowed."""
    if is_stdout(path):
        return
    p = Path(path)
    if os.path.islink(p) and not p.exists():
        if not overwrite:
            raise DvmlError(f"{p}: is a symbolic link to {os.readlink(p)}, which does not exist; remove the link, "
                            "or pass `overwrite` to write through it")
        _real_target_problem(p)
    elif p.exists() and not overwrite:
        raise DvmlError(f"{p}: already exists; pass `overwrite` to replace it")


def _real_target_problem(p: Path) -> None:
    real = Path(os.path.realpath(p))
    if not real.parent.is_dir():
        raise WriteError(p, f"is a symbolic link to {os.readlink(p)}, whose folder {real.parent} does not exist")


@contextlib.contextmanager
def output_guard(*paths: str | Path, overwrite: bool) -> Iterator[None]:
    """Hold the writer lock of every output in ``paths`` for the block and, under the locks, refuse each that
    exists (:func:`refuse_existing`) unless ``overwrite``: of two processes writing one output, the second
    gets :class:`BusyError` while the first runs and "already exists" after, never a mix of both files.
    Checks ``paths`` first without the lock, so nothing (no lock file) is created for a refused output."""
    for p in paths:
        refuse_existing(p, overwrite)
    with contextlib.ExitStack() as stack:
        for p in paths:
            if not is_stdout(p):
                stack.enter_context(writer_lock(p))
        for p in paths:
            refuse_existing(p, overwrite)
        yield


def is_stdout(path: str | Path | None) -> bool:
    return path is not None and str(path) == STDOUT


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _target_stat(path: Path) -> os.stat_result | None:
    """``os.stat`` of what a write to ``path`` lands on (None: nothing yet); a directory or an unreachable path
    is a :class:`WriteError`."""
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        st = None
    except OSError as e:  # e.g. a path under a regular file (ENOTDIR), a symlink loop
        raise WriteError(path, _dir_problem(path.parent) or describe(e)) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise WriteError(path, "is a directory")
    if st is None:
        problem = _dir_problem(Path(os.path.realpath(path)).parent)
        if problem:
            raise WriteError(path, problem)
    return st


def check_target(path: str | Path) -> None:
    """Fail early (:class:`WriteError`) if :func:`write_file` certainly cannot write ``path``: a directory, a
    path under a regular file, or one whose directory (or the nearest one that exists) this process may not write
    into (:func:`write_file` writes a temporary file beside the target). Creates nothing."""
    if is_stdout(path):
        return
    st = _target_stat(Path(path))
    if st is not None and not stat.S_ISREG(st.st_mode):
        return  # a terminal, pipe or device is written directly
    d = Path(os.path.realpath(path)).parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not os.access(d, os.W_OK | os.X_OK):
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            raise WriteError(path, os.strerror(errno.EROFS))
        raise WriteError(path, f"{os.strerror(errno.EACCES)} (cannot create files in {d})")


def write_file(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` with ``write(f)`` (``f`` a binary file): atomically for a regular file (through a symlink),
    directly for a terminal, pipe or device, to standard output for ``-``.

    Raises:
        WriteError: the target is a directory, or writing it failed (no temporary file is left behind and the old
            file, if any, is unchanged).
    """
    if is_stdout(path):
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)
        try:
            if out is None:  # a text-only stream: write what would have been written, decoded
                import io

                buf = io.BytesIO()
                write(buf)
                sys.stdout.write(buf.getvalue().decode())
            else:
                write(out)
                out.flush()
        except OSError as e:
            raise WriteError("standard output", e) from None
        return
    path = Path(path)
    st = _target_stat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:  # a terminal, pipe, socket or device: no temporary file can be renamed over it
            with open(path, "wb") as f:
                write(f)
        except OSError as e:
            raise WriteError(path, e) from None
        return
    with _replacing(path, st) as (fd, _):
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)


def write_via_path(path: str | Path, write: Callable[[Path], object]) -> None:
    """:func:`write_file` for a library that writes only to a file *name* (``torch.onnx.export``, ``onnx.save``),
    or a writer that checks its file before it counts (``dvml export`` loads it back): ``write(tmp)`` writes a
    temporary file, which then replaces ``path`` exactly as :func:`write_file`'s does (through a symlink, the old
    file's mode kept, fsynced).

    ``tmp`` is ``.NAME.XXXXXXXX.tmp`` beside the file ``path`` lands on; ``write`` must write it in place (open
    and truncate it, as those libraries do) and may read it back (a self-check); if it raises, nothing replaces
    ``path``. A terminal, pipe, device or ``-`` gets the finished temporary file (made in the system's
    temporary directory) copied to it.

    Raises:
        WriteError: the target is a directory, or writing it failed (an ``OSError`` from ``write`` included); no
            temporary file is left behind and the old file, if any, is unchanged. Any other exception of
            ``write`` passes through, also leaving no temporary file.
    """
    if not is_stdout(path):
        path = Path(path)
        st = _target_stat(path)
        if st is None or stat.S_ISREG(st.st_mode):
            with _replacing(path, st) as (_, tmp):
                write(tmp)
            return
    with tempfile.TemporaryDirectory(prefix="dvml-") as d:  # for a stream: write it whole, then copy it
        tmp = Path(d) / "data"
        try:
            write(tmp)
        except OSError as e:
            raise WriteError("standard output" if is_stdout(path) else path, e) from None
        with open(tmp, "rb") as src:
            write_file(path, lambda f: shutil.copyfileobj(src, f))


@contextlib.contextmanager
def _replacing(path: Path, st: os.stat_result | None) -> Iterator[tuple[int, Path]]:
    """A new temporary file beside where ``path`` lands (a symlink's target), as ``(fd, tmp)`` (``fd`` open for
    writing). When the block ends it is flushed to disk, given the old file's mode (``st``; else the umask's,
    not mkstemp's 0600) and renamed over the target; when the block raises it is removed, and an ``OSError``
    becomes a :class:`WriteError` naming ``path``."""
    real = _real_target(path)  # a symlink's target (or the path itself)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        try:
            yield fd, Path(tmp)
            os.fsync(fd)  # a full disk may only say so here
            os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else _new_file_mode())
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def write_text(text: str, path: str | Path) -> None:
    """:func:`write_file` of ``text`` (UTF-8)."""
    data = text.encode()
    write_file(path, lambda f: f.write(data))


def write_json(obj, path: str | Path, *, default=None) -> None:
    """:func:`write_file` of ``obj`` as indented JSON plus a newline."""
    write_text(json.dumps(obj, indent=2, default=default) + "\n", path)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to ``path``, flushed and fsynced; on failure the file is cut back to its old length (no
    half line) and :class:`WriteError` raised."""
    path = Path(path)
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write((line.rstrip("\n") + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise WriteError(path, e) from None


# --------------------------------------------------------------------------------------------------
# the writer lock


def lock_path(target: str | Path) -> Path:
    """``.NAME.lock`` beside ``target`` (symlinks resolved, so every name of one file shares one lock)."""
    real = Path(os.path.realpath(target))
    return real.with_name(f".{real.name}.lock")


_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: this process's locks (re-entrant)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def writer_pid(target: str | Path) -> int | None:
    """The pid of another live process writing ``target``, or None (no writer, or a dead one's leftover file)."""
    lp = lock_path(target)
    if str(lp) in _HELD:
        return None
    try:
        fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_pid(fd) or -1
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_busy(target: str | Path, hint: str = "wait for it to finish") -> None:
    """Raise :class:`BusyError` if another live process is writing ``target`` (readers call this)."""
    pid = writer_pid(target)
    if pid is not None:
        raise BusyError(target, None if pid < 0 else pid, hint)


def _acquire(target: Path) -> str:
    lp = lock_path(target)
    key = str(lp)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    if os.path.islink(target):
        _real_target_problem(target)  # a dangling link into a missing folder: create nothing there
    make_dir(Path(target).parent, target=target)  # as named: fails on a dangling symlinked folder
    make_dir(lp.parent, target=target)
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError(target, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BusyError(target, pid) from None
            raise WriteError(target, e) from None
        # the holder may have released (and unlinked) the file between our open and flock: lock the live one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lp))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return key


def _release(key: str) -> None:
    entry = _HELD[key]
    entry[1] -= 1
    if entry[1]:
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        os.unlink(key)  # while still holding it: a waiter that opened it re-checks and takes a fresh file
    os.close(entry[0])


@contextlib.contextmanager
def writer_lock(target: str | Path) -> Iterator[Path]:
    """Hold the writer lock of ``target`` (a cache file or a run directory) for the block.

    Raises:
        BusyError: another live process holds it.
        WriteError: the lock file cannot be created (e.g. a read-only directory).
    """
    key = _acquire(Path(target))
    try:
        yield Path(target)
    finally:
        _release(key)


class WriterLock:
    """:func:`writer_lock` for an object that opens and closes (the cache writer): ``acquire()`` / ``release()``;
    releasing twice is harmless."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self._key: str | None = None

    def acquire(self) -> WriterLock:
        if self._key is None:
            self._key = _acquire(self.target)
        return self

    def release(self) -> None:
        if self._key is not None:
            key, self._key = self._key, None
            _release(key)
