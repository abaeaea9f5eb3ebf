"""A step cache on an object store: a local working folder mirrored to the store.

A step runs in a local working folder exactly as on a local cache (atomic writes,
checkpoint appends, images written by the operator); the store receives what is finished:

- each finished chunk as one numbered object `{prefix}_step{N}.partial/chunk-000000.jsonl`
  (its log record on the first line, then its rows), after the images its rows point to;
- on completion the images not sent yet, then the cache file as one object write (fsspec's
  `put`: multipart for large files, visible only when complete), then the manifest; the
  chunk objects are removed after.

The old manifest is removed from the store before a new cache file is sent, so a manifest
on the store always describes the files beside it. A resumed run (on any machine) rebuilds
its local checkpoint from the chunk objects; a finished step is read back from the store
when its manifest differs from the local copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import orjson

from dataflowmm.io.atomic import atomic_file, atomic_write_text
from dataflowmm.io.remote import RemoteStorageError, describe, filesystem, redact, url_join

CHUNK_NAME = "chunk-{:06d}.jsonl"


def default_work_dir(url: str) -> Path:
    """Where a store's cache is worked on locally: `$XDG_CACHE_HOME/dataflowmm/stores/{digest}`."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dataflowmm" / "stores" / hashlib.sha256(url.encode()).hexdigest()[:16]


class StoreMirror:
    """The store side of a `FileStorage` whose `cache_path` is a URL.

    Args:
        url: the cache's URL (`s3://bucket/run1`).
        storage_options: passed to the fsspec file system (credentials, endpoint).
        work_dir: the local working folder (same layout as the store).
    """

    def __init__(self, url: str, storage_options: dict | None, work_dir: Path):
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)
        self.local = work_dir
        self.lease = None  # the cache's lock while a step runs (execution.store_lock)
        self._manifests: dict[str, str | None] = {}  # manifest name -> text last seen on the store
        self._sent: set[str] = set()  # images sent by this run
        self._check_reachable()

    def _check_reachable(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, detail=False)
        except Exception as error:  # noqa: BLE001 - each backend raises its own errors
            if isinstance(error, FileNotFoundError):
                raise RemoteStorageError(redact(f"cache_path {self.url}: bucket {bucket} does not exist "
                                                "(create it, or check the endpoint)")) from None
            raise RemoteStorageError("cache_path " + describe(error, self.url)) from None
        self.fs.invalidate_cache()  # listings are read fresh: another run may write meanwhile

    # -- addresses ------------------------------------------------------------------------

    def relative(self, local_path: str | os.PathLike) -> str:
        return Path(os.path.relpath(os.path.abspath(local_path), os.path.abspath(self.local))).as_posix()

    def url_of(self, local_path: str | os.PathLike) -> str:
        return url_join(self.url, self.relative(local_path))

    def _key(self, local_path: str | os.PathLike) -> str:
        return f"{self.root.rstrip('/')}/{self.relative(local_path)}"

    def _call(self, what: str, local_path, action, *args):
        """`action(*args)`, any store error as one line naming the object, without secrets."""
        try:
            return action(*args)
        except Exception as error:  # noqa: BLE001
            if isinstance(error, FileNotFoundError) and what == "read":
                return None
            raise RemoteStorageError(f"cannot {what} " + describe(error, self.url_of(local_path))) from None

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    # -- single objects -------------------------------------------------------------------

    def put(self, local_path: Path) -> None:
        """Send a local file to its place on the store (one object write)."""
        self._check_lease()
        self._call("write", local_path, self.fs.put_file, str(local_path), self._key(local_path))

    def put_many(self, local_paths: list[Path]) -> None:
        """Send local files to their places in one call (backends like s3fs send them
        concurrently)."""
        if not local_paths:
            return
        self._check_lease()
        self._call("write", local_paths[0], self.fs.put, [str(path) for path in local_paths],
                   [self._key(path) for path in local_paths])

    def put_bytes(self, local_path: Path, data: bytes) -> None:
        self._check_lease()
        self._call("write", local_path, self.fs.pipe_file, self._key(local_path), data)

    def read(self, local_path: Path) -> bytes | None:
        """The object at `local_path`'s place, None when there is none."""
        return self._call("read", local_path, self.fs.cat_file, self._key(local_path))

    def get(self, local_path: Path) -> None:
        """Copy the object at `local_path`'s place to it (atomically)."""
        with atomic_file(local_path, fsync=False) as file:
            self._call("read", local_path, self._get_into, self._key(local_path), file)

    def _get_into(self, key: str, file) -> None:
        with self.fs.open(key, "rb") as source:
            shutil.copyfileobj(source, file, 1 << 20)

    def remove(self, local_path: Path, recursive: bool = False) -> None:
        key = self._key(local_path)
        try:
            self.fs.rm(key, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001
            raise RemoteStorageError("cannot remove " + describe(error, self.url_of(local_path))) from None

    def listing(self, local_folder: Path) -> dict[str, int]:
        """`{path relative to the cache: size}` of every object under `local_folder`'s place."""
        key = self._key(local_folder)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(key, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as error:  # noqa: BLE001
            raise RemoteStorageError("cannot list " + describe(error, self.url_of(local_folder))) from None
        root = self.root.rstrip("/") + "/"
        return {name[len(root):]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(root)}

    # -- finished steps -------------------------------------------------------------------

    def pull_step(self, manifest_path: Path, output_path: Path, side_paths: Iterable[Path]) -> None:
        """Make the local copy of a finished step the store's (when the store's manifest
        differs from the local one): cache file and side files first, the manifest last."""
        name = manifest_path.name
        if name in self._manifests:
            return
        data = self.read(manifest_path)
        text = data.decode("utf-8") if data is not None else None
        self._manifests[name] = text
        local = manifest_path.read_text(encoding="utf-8") if manifest_path.is_file() else None
        if text == local:
            return
        manifest_path.unlink(missing_ok=True)  # the store has no such finished step (or another)
        if text is None:
            return
        self.get(output_path)
        for side in side_paths:
            if self.read_exists(side):
                self.get(side)
        atomic_write_text(manifest_path, text, fsync=False)

    def read_exists(self, local_path: Path) -> bool:
        self.fs.invalidate_cache()
        return bool(self._call("read", local_path, self.fs.exists, self._key(local_path)))

    def remove_manifest(self, manifest_path: Path) -> None:
        """Before a new cache file is sent: the store's manifest never describes other data."""
        self._check_lease()
        self.remove(manifest_path)
        self._manifests[manifest_path.name] = None

    def push_step(self, manifest_path: Path, output_path: Path, side_paths: Iterable[Path],
                  images: Iterable[str] | None, images_dir: Path) -> None:
        """Publish a finished step: images, cache file, side files, then the manifest.

        `images`: the local paths of every image the output points to (None: send the
        images folder's files the store lacks); images the output does not point to are
        removed from the store's images folder."""
        if images is not None or images_dir.is_dir():
            self._push_images(images, images_dir)
        self.put(output_path)
        for side in side_paths:
            if side.is_file():
                self.put(side)
        self.put(manifest_path)
        self._manifests[manifest_path.name] = manifest_path.read_text(encoding="utf-8")

    def _push_images(self, images: Iterable[str] | None, images_dir: Path) -> None:
        on_store = self.listing(images_dir)
        wanted = ({self.relative(path) for path in images} if images is not None else
                  {self.relative(path) for path in images_dir.rglob("*") if path.is_file()})
        self.put_many([self.local / relative for relative in sorted(wanted)
                       if relative not in self._sent and local_differs(self.local / relative, on_store.get(relative))])
        if images is not None:
            for relative in sorted(set(on_store) - wanted):
                self.remove(self.local / relative)
        self._sent.clear()

    # -- chunks of an unfinished step -----------------------------------------------------

    def push_chunk(self, checkpoint_dir: Path, record: dict, payload: bytes, images: Iterable[str]) -> None:
        """One finished chunk: its images first, then its object (record line + rows), so a
        chunk on the store always has its images there."""
        if record["chunk"] == 0:
            self.put(checkpoint_dir / "meta.json")
        unsent = [Path(path) for path in images if self.relative(path) not in self._sent and os.path.isfile(path)]
        self.put_many(unsent)
        self._sent.update(self.relative(path) for path in unsent)
        self.put_bytes(checkpoint_dir / CHUNK_NAME.format(record["chunk"]), orjson.dumps(record) + b"\n" + payload)

    def pull_checkpoint(self, checkpoint_dir: Path) -> None:
        """Make the local checkpoint the store's: the chunk objects, numbered from 0 without
        a gap, rebuilt into `rows.jsonl` and `chunks.jsonl` (unless the local one already
        records the same chunks). With no chunk on the store, the local one is dropped."""
        listed = self.listing(checkpoint_dir)
        prefix = self.relative(checkpoint_dir) + "/"
        count = 0
        while prefix + CHUNK_NAME.format(count) in listed:
            count += 1
        meta = self.read(checkpoint_dir / "meta.json") if count else None
        if meta is None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            return
        records, parts = [], []
        for number in range(count):
            data = self.read(checkpoint_dir / CHUNK_NAME.format(number)) or b""
            head, _, payload = data.partition(b"\n")
            records.append(orjson.loads(head))
            parts.append(payload)
        local_meta = checkpoint_dir / "meta.json"
        if _local_records(checkpoint_dir) == records and local_meta.is_file() and local_meta.read_bytes() == meta:
            return
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True)
        (checkpoint_dir / "meta.json").write_bytes(meta)
        (checkpoint_dir / "rows.jsonl").write_bytes(b"".join(parts))
        (checkpoint_dir / "chunks.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))

    def remove_checkpoint(self, checkpoint_dir: Path) -> None:
        self.remove(checkpoint_dir, recursive=True)


def local_differs(local: Path, size_on_store: int | None) -> bool:
    """A local file the store lacks, or holds with another size."""
    return local.is_file() and size_on_store != _size(local)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _local_records(checkpoint_dir: Path) -> list[dict] | None:
    try:
        return [json.loads(line) for line in (checkpoint_dir / "chunks.jsonl").read_bytes().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fetch_step_copy(url: str, storage_options: dict | None = None, work_dir: Path | None = None) -> Path:
    """A local copy of the finished step file at `url` and of every image its rows name by a
    relative path (kept at the same place relative to it: the bucket is mirrored), for
    exports and galleries of a step on a store. Returns the local step file."""
    from dataflowmm.io.images import looks_like_image_path
    from dataflowmm.io.records import iter_records

    bucket_url = "://".join((url.split("://", 1)[0], url.split("://", 1)[1].split("/", 1)[0]))
    store = StoreMirror(bucket_url, storage_options, Path(work_dir or default_work_dir(bucket_url)))
    local = store.local / url.split("://", 1)[1].split("/", 1)[1]
    store._manifests.clear()
    if store.read(local) is None:
        raise FileNotFoundError(redact(f"step file not found: {url}"))
    store.get(local)
    for side in (local.with_name(local.name.rsplit(".", 1)[0] + ".manifest.json"),
                 local.with_name(local.name.rsplit(".", 1)[0] + ".dropped.jsonl")):
        if store.read_exists(side):
            store.get(side)
    wanted: set[str] = set()
    for row in iter_records(local):
        for value in row.values():
            for item in value if isinstance(value, list) else [value]:
                if looks_like_image_path(item) and not os.path.isabs(item) and "://" not in item:
                    wanted.add(os.path.normpath(local.parent / item))
    missing = [path for path in sorted(wanted) if not os.path.isfile(path)]
    keys = [store._key(path) for path in missing]
    if keys:  # one call: backends fetch many objects concurrently
        try:
            store.fs.get(keys, missing, on_error="omit")
        except Exception as error:  # noqa: BLE001
            raise RemoteStorageError("cannot read images of " + describe(error, url)) from None
    return local


def send_files(files: dict[str, bytes], local_root: Path, url: str, storage_options: dict | None) -> dict[str, bytes]:
    """Write the files under `local_root` (absolute path -> bytes) to their places under `url`,
    the store mirrored by `local_root` (one object each, sent concurrently where the backend
    can); returns the files outside `local_root`, which have no place there."""
    fs, root = filesystem(url, storage_options)
    objects, rest = {}, {}
    for path, data in files.items():
        relative = os.path.relpath(path, local_root)
        if relative == ".." or relative.startswith(".." + os.sep):
            rest[path] = data
        else:
            objects[f"{root.rstrip('/')}/{Path(relative).as_posix()}"] = data
    if objects:
        try:
            fs.pipe(objects)
        except Exception as error:  # noqa: BLE001
            raise RemoteStorageError("cannot write images to " + describe(error, url)) from None
    return rest


def publish_folder(local: Path, url: str, storage_options: dict | None = None) -> None:
    """Send a finished local file or folder to `url` (each object one write; a folder's
    files in name order, so a stats or index file written last by the exporter lands last too)."""
    fs, path = filesystem(url, storage_options)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for file in files:
        target = path if not local.is_dir() else f"{path.rstrip('/')}/{file.relative_to(local).as_posix()}"
        try:
            fs.put_file(str(file), target)
        except Exception as error:  # noqa: BLE001
            raise RemoteStorageError("cannot write " + describe(error, url)) from None
