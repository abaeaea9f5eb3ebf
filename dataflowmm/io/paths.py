"""Image paths inside rows: absolute while an operator works, relative in the dataset file."""

from __future__ import annotations

import functools
import os
import posixpath
from pathlib import Path
from typing import Any

from dataflowmm.io.images import looks_like_base64_image
from dataflowmm.io.remote import is_url, url_join


def is_local_path(value: Any) -> bool:
    """A string that names a local file (not a URL, an inline base64 image or empty)."""
    return (isinstance(value, str) and bool(value) and "\n" not in value and not value.startswith("data:")
            and not is_url(value) and not looks_like_base64_image(value))


def _map_paths(value: Any, convert) -> Any:
    if isinstance(value, list):
        return [_map_paths(item, convert) for item in value]
    return convert(value) if is_local_path(value) else value


def resolve_paths(value: Any, base_dir: Path | str) -> Any:
    """Make a path (or list of paths) absolute, resolving relative ones against `base_dir`
    (a folder, or a URL: a relative path in a file on a store names an object beside it)."""
    if is_url(base_dir):
        return _map_paths(value, lambda path: path if os.path.isabs(path) else url_join(base_dir, path))
    # normpath, not Path.resolve: pure string work, no file-system calls per row.
    return _map_paths(value, lambda path: os.path.normpath(os.path.join(base_dir, os.path.expanduser(path))))


def relative_paths(value: Any, base_dir: Path, base_url: str | None = None) -> Any:
    """Express absolute paths relative to `base_dir` (the folder of the file they are written to);
    with `base_url` (where that folder is published on a store), URLs under it too."""
    base = os.fspath(base_dir)
    if base_url is not None and isinstance(value, list):
        return [relative_paths(item, base_dir, base_url) for item in value]
    if base_url is not None and isinstance(value, str) and is_url(value):
        return _relative_url(value, base_url)
    return _map_paths(value, lambda path: _relative(path, base) if os.path.isabs(path) else path)


def _relative_url(url: str, base_url: str) -> str:
    """A URL in the same bucket (scheme and first path part) as `base_url`, relative to it (as
    local paths are relative to the cache file's folder); any other URL as it is."""
    scheme, rest = url.split("://", 1)
    base_scheme, base_rest = base_url.rstrip("/").split("://", 1)
    if scheme != base_scheme or rest.split("/", 1)[0] != base_rest.split("/", 1)[0]:
        return url
    return posixpath.relpath(rest, base_rest)


def _relative(path: str, base: str) -> str:
    """`os.path.relpath(path, base)` for an absolute `path`, its folder's part computed once
    per folder (a step writes thousands of paths from a few folders; relpath is the slow part)."""
    folder, name = os.path.split(path)
    if not name or not os.path.isabs(base) or os.path.normpath(path) != path \
            or (base.rstrip(os.sep) + os.sep).startswith(path + os.sep):  # base itself, or above it
        return os.path.relpath(path, base)
    relative_folder = _relative_folder(folder, base)
    return name if relative_folder == "." else relative_folder + os.sep + name


@functools.lru_cache(maxsize=1024)
def _relative_folder(folder: str, base: str) -> str:
    return os.path.relpath(folder, base)  # both absolute: independent of the working directory
