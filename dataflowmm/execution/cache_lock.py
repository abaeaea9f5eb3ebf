"""One run per cache at a time: an OS lock on `{cache_path}/{prefix}.lock` while a step runs.

Two runs writing the same cache would delete each other's checkpoints, images and temp
files, and publish each other's rows. The driver of a step (either runner) holds an
exclusive `flock` on an open file descriptor from the moment the step is planned until it
is published or abandoned. The OS releases it when the process dies, so a killed run never
leaves a stale lock (its lock file may stay, holding its pid: it is never a step file and
the next run takes it over); a run that ends removes the file. Within one process the lock is re-entrant: a script may build a
second `FileStorage` on the same cache and run it while the first still holds it.
On a system without `fcntl` `msvcrt` is used; without either, runs are not locked (a
warning says so once).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None


class CacheInUse(RuntimeError):
    """Another process is running a step on the same cache (`cache_path` + prefix)."""


_held: dict[str, list[int]] = {}  # resolved lock path -> [file descriptor, holders in this process]
_guard = threading.Lock()


def lock_path(cache_path: str | os.PathLike, prefix: str) -> Path:
    """The lock file of a cache: `{prefix}.lock` in `cache_path`."""
    return Path(cache_path) / f"{prefix}.lock"


@contextlib.contextmanager
def cache_lock(cache_path: str | os.PathLike, prefix: str) -> Iterator[None]:
    """Hold the cache's lock for the block; `CacheInUse` at once if another process holds it."""
    path = str(lock_path(cache_path, prefix).resolve())
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
        else:
            _held[path] = [_acquire(path, cache_path, prefix), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                _release(path, entry[0])


def _acquire(path: str, cache_path: str | os.PathLike, prefix: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                raise CacheInUse(f"cache {cache_path} (prefix {prefix!r}) is in use by another run "
                                 f"(pid {_holder(fd)}); wait for it to end, or give this run another "
                                 "cache_path or file_name_prefix")
            if not _still_at(path, fd):  # its holder removed it as we locked it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return fd


def _still_at(path: str, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:  # pragma: no cover (Windows): locks the first byte
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    warnings.warn("no file locking on this system: two runs on one cache are not prevented",  # pragma: no cover
                  RuntimeWarning, stacklevel=4)
    return True  # pragma: no cover


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip() if hasattr(os, "pread") else ""
    except OSError:
        text = ""
    return text or "unknown"


def _release(path: str, fd: int) -> None:
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: whoever opened it retries on the new file
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:  # pragma: no cover
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)
