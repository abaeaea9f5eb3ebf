"""Files a chunk writes or reads, carried as bytes instead of touching this node's disk.

A Ray actor on a node without the driver's disk must neither write a step's images to its
own disk (they would be lost to the driver) nor expect the driver's input images there.
Around a chunk it (1) captures every file the image-writing helpers (`save_png`,
`save_image`, `ImageOutput.store`) would write, keyed by the path the operator chose, so
the driver writes the same files at the same paths; and (2) provides the chunk's input
images, read and sent by the driver, to the image readers (`load_image`, `open_image`,
`read_image_file`, `read_image_header`, `check_image_file`) under their driver paths.
Operators do not change: they name and read paths as they always do.

Outside these two contexts every helper reads and writes the file system as before.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator, Mapping
from typing import IO

from dataflowmm.io.atomic import atomic_file

# Module state, not context variables: an operator may write or read from its own threads.
# A Ray actor runs one chunk at a time, so one capture and one set of provided files at once.
_lock = threading.Lock()
_captured: dict[str, bytes] | None = None
_provided: Mapping[str, bytes] = {}


def _key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


@contextlib.contextmanager
def capturing_writes() -> Iterator[dict[str, bytes]]:
    """Inside: the image-writing helpers put each file's bytes into the dict yielded (keyed
    by its absolute path) instead of the file system."""
    global _captured
    captured: dict[str, bytes] = {}
    _captured = captured
    try:
        yield captured
    finally:
        _captured = None


@contextlib.contextmanager
def written_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through: `atomic_file` (temp file, rename), or a buffer
    whose bytes are captured at the end when `capturing_writes` is active."""
    captured = _captured
    if captured is None:
        with atomic_file(path, fsync=fsync) as file:
            yield file
        return
    buffer = io.BytesIO()
    yield buffer
    with _lock:
        captured[_key(path)] = buffer.getvalue()


@contextlib.contextmanager
def providing_files(files: Mapping[str, bytes]) -> Iterator[None]:
    """Inside: the image readers find `files` (absolute path -> bytes) without the file system."""
    global _provided
    _provided = {_key(path): data for path, data in files.items()}
    try:
        yield
    finally:
        _provided = {}


def provided_bytes(path: str | os.PathLike) -> bytes | None:
    """The bytes `providing_files` gives for `path`, else None (read the file system)."""
    return _provided.get(_key(path)) if _provided else None


def write_files_atomically(files: Mapping[str, bytes]) -> int:
    """Write captured files at their paths, each atomically as the helpers do; bytes written."""
    total = 0
    for path, data in files.items():
        with atomic_file(path, fsync=False) as file:
            file.write(data)
        total += len(data)
    return total
