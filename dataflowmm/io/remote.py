"""Paths that may be URLs: one fsspec layer for object stores and remote files.

A plain path stays a `pathlib.Path` and keeps its exact local behaviour; a URL
(`s3://`, `gs://`, `az://`, `hf://`, `http(s)://`, `memory://`, ...) is opened through
`fsspec.core.url_to_fs` with `storage_options` (credentials, endpoints: as pandas, datasets
and NeMo Curator take them). Without `storage_options` a backend finds its credentials the
standard way (for S3 the `AWS_*` environment, `AWS_ENDPOINT_URL` included).

Secrets never leave this module in text: every error it raises passes through `redact`,
which removes the credentials of a URL and every secret-looking value of `storage_options`.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# The extra that brings each protocol's backend (pip install 'dataflowmm[EXTRA]').
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
          "abfss": "azure", "adl": "azure", "hf": "hf"}
_SECRET_KEYS = ("key", "secret", "token", "password", "credential", "sas", "signature", "connection")
_known_secrets: set[str] = set()  # values seen in storage_options, removed from every message
# storage_options a FileStorage was given, by the bucket they are for ("s3://my-bucket"): image
# references in rows name URLs, not options, and are read with the options of their bucket.
_options_by_bucket: dict[str, dict] = {}


class RemoteStorageError(OSError):
    """A URL that cannot be read or written, in one line with no secret in it."""


def is_url(value: Any) -> bool:
    """A string (or path-like) with a scheme: `s3://...`, `memory://...`, `https://...`."""
    return isinstance(value, str) and bool(_URL.match(value))


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def as_location(value: str | os.PathLike) -> str | Path:
    """A URL as its string (normalised: no trailing slash), anything else as a `Path`."""
    if isinstance(value, str) and is_url(value):
        scheme, rest = value.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return Path(value)


def url_join(base: str, *parts: str) -> str:
    """`base` URL joined with relative `parts` ('..' resolved in the path, never above the bucket)."""
    scheme, rest = base.split("://", 1)
    joined = posixpath.normpath(posixpath.join(rest, *parts))
    return f"{scheme}://{joined.lstrip('/')}"


def url_parent(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def remember_secrets(storage_options: dict | None) -> None:
    """Note the secret-looking values of `storage_options` so `redact` removes them."""
    for key, value in _flatten(storage_options or {}):
        if isinstance(value, str) and len(value) >= 4 and any(word in key.lower() for word in _SECRET_KEYS):
            _known_secrets.add(value)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
                 "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN", "HF_TOKEN"):
        if len(os.environ.get(name, "")) >= 4:
            _known_secrets.add(os.environ[name])


def _flatten(options: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in options.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def redact(text: str) -> str:
    """`text` without credentials: `user:secret@` in URLs, known secret values, query
    signatures (presigned URLs, SAS tokens)."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))
    text = re.sub(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|se|sv)=)[^&\s]+",
                  r"\1***", text)
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def bucket_of(url: str) -> str:
    """`scheme://bucket` of a URL (its first path segment: a bucket, container or host)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}"


def use_storage_options(url: str, storage_options: dict | None) -> None:
    """Read and write every URL in `url`'s bucket with `storage_options` when no other
    options are given (`FileStorage` calls it for its entry file and cache)."""
    if storage_options:
        remember_secrets(storage_options)
        _options_by_bucket[bucket_of(url)] = storage_options


def filesystem(url: str, storage_options: dict | None = None):
    """`(fsspec file system, path within it)` for `url` (with `storage_options`, else those
    given for its bucket by `use_storage_options`, else the backend's own sources); a
    one-line error naming the extra to install when the protocol's backend is missing."""
    import fsspec.core

    if storage_options is None:
        storage_options = _options_by_bucket.get(bucket_of(url))
    remember_secrets(storage_options)
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError:
        extra = EXTRAS.get(protocol(url))
        hint = f"pip install 'dataflowmm[{extra}]'" if extra else f"install the fsspec backend for {protocol(url)}://"
        raise RemoteStorageError(f"{redact(url)}: no file system for {protocol(url)}:// ({hint})") from None
    except ValueError as error:  # an unknown protocol
        raise RemoteStorageError(f"{redact(url)}: {redact(str(error))}") from None


def describe(error: BaseException, url: str) -> str:
    """One line for a failed store operation: what the store said, with no secret."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, FileNotFoundError):
        reason = "not found" if not reason or reason == str(error.filename) else reason
    elif isinstance(error, PermissionError):
        reason = f"access denied ({reason})"
    return redact(f"{url}: {reason}")


def read_url_bytes(url: str, storage_options: dict | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object at `url` (`max_bytes` refused above); http(s) goes through the image
    download guards (public addresses only, size cap, deadline)."""
    if protocol(url) in ("http", "https"):
        from dataflowmm.io.downloads import DownloadRefused, download

        try:
            return download(url, allow_internal=False, max_bytes=max_bytes or (64 << 20), deadline=60.0)
        except DownloadRefused as error:
            raise RemoteStorageError(redact(f"{url}: {error}")) from None
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as file:
            data = file.read(max_bytes + 1) if max_bytes else file.read()
    except Exception as error:  # noqa: BLE001 - each backend raises its own errors
        if isinstance(error, FileNotFoundError):
            raise FileNotFoundError(redact(f"not found: {url}")) from None
        raise RemoteStorageError(describe(error, url)) from None
    if max_bytes and len(data) > max_bytes:
        raise RemoteStorageError(redact(f"{url}: over {max_bytes} bytes"))
    return data


def fetch_entry(url: str, storage_options: dict | None, folder: Path) -> Path:
    """A local copy of the entry file (or dataset folder) at `url`, in `folder`, fetched
    again only when the object's size or ETag/modification time changed."""
    import json

    if protocol(url) in ("http", "https"):
        return _download_entry(url, folder)
    fs, path = filesystem(url, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(redact(f"first_entry_file_name not found: {url}")) from None
    except Exception as error:  # noqa: BLE001
        raise RemoteStorageError("first_entry_file_name " + describe(error, url)) from None
    stamp = json.dumps({key: str(info.get(key)) for key in ("size", "ETag", "etag", "LastModified", "mtime",
                                                          "type")}, sort_keys=True)
    local = folder / posixpath.basename(path.rstrip("/"))
    stamp_file = folder / f".{local.name}.source.json"
    if local.exists() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return local
    import shutil

    shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fs.get(path, str(local), recursive=info.get("type") == "directory")
    except Exception as error:  # noqa: BLE001
        raise RemoteStorageError("cannot read first_entry_file_name " + describe(error, url)) from None
    stamp_file.write_text(stamp)
    return local


# An entry file over http(s) is fetched whole through the download guards, with room for a
# large jsonl (not an image's 64 MiB) and time to read it.
ENTRY_MAX_BYTES = 4 << 30
ENTRY_DEADLINE = 3600.0


def _download_entry(url: str, folder: Path) -> Path:
    """An http(s) entry file, fetched on every run (no listing tells whether it changed)
    through the download guards: public addresses only, a size cap, a deadline."""
    from dataflowmm.io.atomic import atomic_file
    from dataflowmm.io.downloads import DownloadRefused, download

    try:
        data = download(url, allow_internal=False, max_bytes=ENTRY_MAX_BYTES, deadline=ENTRY_DEADLINE)
    except DownloadRefused as error:
        raise RemoteStorageError(redact(f"first_entry_file_name {url}: {error}")) from None
    local = folder / (posixpath.basename(url.split("?", 1)[0].rstrip("/")) or "entry.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(local, fsync=False) as file:
        file.write(data)
    return local
