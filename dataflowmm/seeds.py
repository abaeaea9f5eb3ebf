"""Per-row identities and seeds.

Every random choice draws from a seed derived from the global seed and the row's own
identity, never from a shared generator, so results do not depend on batch size,
chunk boundaries, resume points or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """A stable JSON text of `value`: sorted keys, no whitespace, non-JSON types as str."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def row_identity(row: dict, index: int) -> str:
    """16 hex digits naming a row by its content and position in the step's input.

    Duplicate rows at different positions get different identities, so their
    generated files never collide.
    """
    digest = hashlib.sha256(f"{index}\n{canonical_json(row)}".encode())
    return digest.hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (global seed, row identity, candidate index, ...)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1
