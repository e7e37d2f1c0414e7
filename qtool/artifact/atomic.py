"""Atomic writes: build in a temporary sibling, then rename, so a crash leaves nothing half-written.

Temporary siblings are hidden and carry the writer's pid (`.NAME.tmp-PID-XXXX`,
`.NAME.PID.XXXX.tmp`): no reader looks at them, and the next write to the same path removes
those whose writer is dead (killed mid-write). Files are fsync'ed before the rename and the
parent directory after it, so a completed write survives a power loss too. A replaced
directory is swapped with one atomic exchange (renameat2 RENAME_EXCHANGE on Linux): at every
instant PATH is the old or the new version, never absent. A full disk (ENOSPC, EFBIG, EDQUOT)
becomes a one-line QtoolError after the temporary is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from qtool.errors import QtoolError

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
LOCK_TIMEOUT_ENV = "QTOOL_LOCK_TIMEOUT"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; renamed over it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        with disk_errors(path):
            yield Path(tmp)
            _fsync_file(Path(tmp))
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temp directory beside `path`; it replaces `path` only if the block succeeds.

    An existing `path` is kept until the new one is complete, then exchanged for it in one
    step and removed (overwrite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        with disk_errors(path):
            yield tmp
            fsync_tree(tmp)
            commit_dir(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put the complete directory `tmp` at `path` (exchanging it with an existing one); `tmp`
    is left holding the old directory, or gone."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(path)
        exchange(tmp, path)  # tmp now holds the old directory
        _fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def exchange(a: Path, b: Path) -> None:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere fall
    back to two renames, leaving a window of microseconds in which `b` is absent."""
    libc_name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if fn is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(b))
    tmp = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.replace(b, tmp)
    os.replace(a, b)
    os.replace(tmp, a)


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk or file-size limit while writing `path`: one line, exit 2 (the environment,
    not the input, but the user's to fix, and nothing was written)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else _os_error_in(str(e))
        if code not in DISK_FULL:
            raise
        raise QtoolError(f"cannot write {path}: {os.strerror(code)} ({errno.errorcode.get(code, code)}); "
                         "nothing was written") from None


def _os_error_in(message: str) -> int | None:
    """The errno inside a safetensors I/O error ("... (os error 28)"): its writer is Rust."""
    m = re.search(r"\(os error (\d+)\)", message)
    return int(m.group(1)) if m else None


def _stale_pattern(name: str) -> re.Pattern:
    n = re.escape(name)
    return re.compile(rf"\.{n}\.(?:(?:tmp|old|swap)-(\d+)-.*|(\d+)\..*\.tmp)")


def clean_stale(path: Path) -> list[Path]:
    """Remove temporary siblings of `path` left by writers that were killed (pid not alive)."""
    path = Path(path)
    pattern = _stale_pattern(path.name)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1) or m.group(2))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def dir_lock(path: Path, what: str = "changing", timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the directory `path` itself (no lock file is left behind).

    A writer that replaces `path` by an exchange leaves waiters holding the lock of the old
    inode; each waiter therefore checks, once it has the lock, that `path` is still the inode
    it locked, and otherwise starts again. Waits up to `timeout` seconds (default
    $QTOOL_LOCK_TIMEOUT or 60), then refuses with one line."""
    path = Path(path)
    if timeout is None:
        try:
            timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "60"))
        except ValueError:
            raise QtoolError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise QtoolError(f"{path} not found") from None
        except NotADirectoryError:
            raise QtoolError(f"{path} is not a directory") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise QtoolError(f"another qtool is {what} {path} (waited {timeout:g} s; "
                                         f"{LOCK_TIMEOUT_ENV} sets the wait)") from None
                    time.sleep(0.05)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)  # releases the lock
