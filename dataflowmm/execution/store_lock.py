"""One run per cache on an object store: a lease object created with a conditional write.

The lock of `s3://bucket/run1` (prefix `p`) is the newest of the objects
`s3://bucket/run1/p.lock/{generation:012d}`, each holding `{"owner", "expires"}` (epoch
seconds). A run takes the lock by creating generation 0 (no object yet) or, when the newest
has expired, the next generation, with a write that succeeds only when the object does not
exist (fsspec `pipe_file(mode="create")`: S3 `If-None-Match: *`, which moto's server honours
too). Of two runs racing for the same generation exactly one succeeds; nothing is deleted
before a take-over, so a take-over is as safe as the first take. The holder renews its
expiry every `ttl / 3` seconds in a thread, and on release removes its object; a crashed
driver's lock expires after `ttl` seconds.

What is guaranteed: at most one run holds an unexpired lease. A holder that stops renewing
for longer than `ttl` (paused, cut off) may find on its next renewal that another run took
over; it then stops before its next write to the store (`LeaseLost`), but writes in that
window can overlap. Protocols whose conditional create is not known to be atomic are
refused at once rather than locked badly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from dataflowmm.execution.cache_lock import CacheInUse
from dataflowmm.io.remote import describe, protocol

# Protocols whose fsspec backend creates an object only if absent with pipe_file(mode="create"):
# s3fs sends If-None-Match: * (tested against moto's server); gcsfs >= 2024.12 sends
# ifGenerationMatch=0 and adlfs >= 2024.12 uploads with overwrite=False (read in their source,
# not tested here: no GCS or Azure emulator); memory is in-process.
CONDITIONAL_CREATE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
DEFAULT_TTL = 60.0


class LeaseLost(CacheInUse):
    """This run's lock expired and another run took the cache over."""


class StoreLease:
    """A held lock object, renewed in a thread until released."""

    def __init__(self, store, prefix: str, ttl: float):
        self.store, self.ttl = store, ttl
        self.folder = f"{store.root.rstrip('/')}/{prefix}.lock"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation = -1
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, generation: int) -> str:
        return f"{self.folder}/{generation:012d}"

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def _newest(self) -> tuple[int, dict | None]:
        self.store.fs.invalidate_cache()  # never a cached listing: other runs write here
        try:
            names = self.store.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return -1, None
        numbers = sorted(int(name.rsplit("/", 1)[-1]) for name in names if name.rsplit("/", 1)[-1].isdigit())
        if not numbers:
            return -1, None
        try:
            return numbers[-1], json.loads(self.store.fs.cat_file(self._key(numbers[-1])))
        except FileNotFoundError:  # released as we looked
            return numbers[-1], None

    def acquire(self) -> None:
        if protocol(self.store.url) not in CONDITIONAL_CREATE:
            raise CacheInUse(f"cache {self.store.url}: no atomic create-if-absent is known for "
                             f"{protocol(self.store.url)}:// here, so two runs could not be kept apart; "
                             "use an s3:// cache (or a local cache_path)")
        newest, holder = self._newest()
        if holder is not None and holder.get("expires", 0) > time.time():
            raise CacheInUse(f"cache {self.store.url} is in use by another run ({holder.get('owner')}, lock "
                             f"expires in {holder['expires'] - time.time():.0f} s unless renewed); wait "
                             "for it to end, or give this run another cache_path or file_name_prefix")
        generation = newest + 1 if holder is not None else max(newest, 0)
        try:
            self.store.fs.pipe_file(self._key(generation), self._body(), mode="create")
        except FileExistsError:
            raise CacheInUse(f"cache {self.store.url} was taken by another run a moment ago; wait for it "
                             "to end, or give this run another cache_path or file_name_prefix") from None
        except Exception as error:  # noqa: BLE001
            raise CacheInUse("cannot lock the cache " + describe(error, self.store.url)) from None
        self.generation = generation
        self._thread = threading.Thread(target=self._renew, name="dataflowmm-store-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                newest, _ = self._newest()
                if newest > self.generation:
                    self.lost = True
                    return
                self.store.fs.pipe_file(self._key(self.generation), self._body())
            except Exception:  # noqa: BLE001 - a renewal that fails is tried again; check() decides
                continue

    def check(self) -> None:
        """Before each write to the store: `LeaseLost` once another run took over."""
        if self.lost:
            raise LeaseLost(f"cache {self.store.url}: this run's lock expired and another run took "
                            "the cache over; stopped before writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and self.generation >= 0:
            with contextlib.suppress(Exception):
                self.store.fs.rm(self._key(self.generation))


_held: dict[str, list] = {}  # lock folder -> [lease, holders in this process]
_guard = threading.Lock()


@contextlib.contextmanager
def store_lock(store, prefix: str, ttl: float | None = None) -> Iterator[None]:
    """Hold the store cache's lock for the block (re-entrant in a process); `CacheInUse` at
    once when another run holds it. `ttl`: seconds (default `DATAFLOWMM_STORE_LOCK_TTL` or 60)."""
    ttl = float(ttl or os.environ.get("DATAFLOWMM_STORE_LOCK_TTL") or DEFAULT_TTL)
    key = f"{store.url}/{prefix}.lock"
    with _guard:
        entry = _held.get(key)
        if entry is None:
            lease = StoreLease(store, prefix, ttl)
            lease.acquire()
            entry = _held[key] = [lease, 0]
        entry[1] += 1
        store.lease = entry[0]
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                store.lease = None
                entry[0].release()
