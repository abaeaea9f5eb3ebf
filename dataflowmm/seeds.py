"""Per-row identities and seeds.

Every random choice draws from a seed derived from the global seed and the row's own
identity, never from a shared generator, so results do not depend on batch size,
chunk boundaries, resume points or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, overload

import orjson


def canonical_json(value: Any) -> str:
    """A stable JSON text of `value`: sorted keys, no whitespace, non-JSON types as str."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


_ORJSON_CANONICAL = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                     | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS)
# Where orjson's text can differ from `canonical_json`'s: float exponents ("1e-05" against
# "0.00001"). A string that merely looks like one takes the exact path, nothing worse.
_EXPONENT = re.compile(rb"[0-9]e[+-]")


def _may_differ(text: bytes) -> bool:
    # Substring tests run at memchr speed; the regex only confirms a rare candidate.
    if b"0.0000" in text:
        return True
    return (b"e+" in text or b"e-" in text) and _EXPONENT.search(text) is not None


def canonical_json_bytes(value: Any) -> bytes:
    """`canonical_json(value)` as UTF-8 bytes, computed by orjson when that gives the same text.

    For values as storage reads them (JSON-native, no NaN: orjson writes NaN as null).
    """
    try:
        text = orjson.dumps(value, default=str, option=_ORJSON_CANONICAL)
    except (TypeError, orjson.JSONEncodeError):  # non-string keys, integers beyond 64 bits
        return canonical_json(value).encode("utf-8")
    if _may_differ(text):
        return canonical_json(value).encode("utf-8")
    return text


# Execution marks each row it hands an operator with the row's input position under this
# key (a NUL-prefixed key cannot come from user data); it is not part of the row's identity.
ROW_POSITION_KEY = "\x00row"


def row_identity(row: dict, index: int) -> str:
    """16 hex digits naming a row by its content and position in the step's input.

    Duplicate rows at different positions get different identities, so their
    generated files never collide.
    """
    if ROW_POSITION_KEY in row:
        row = {key: value for key, value in row.items() if key != ROW_POSITION_KEY}
    digest = hashlib.sha256(b"%d\n" % index + canonical_json_bytes(row))
    return digest.hexdigest()[:16]


class RowIdentities(Sequence[str]):
    """The identities of consecutive rows of a step's input, computed on first access.

    `RowIdentities(rows, first_index)[i] == row_identity(rows[i], first_index + i)`. Operators
    that never name files or draw seeds (filters, text rewrites) never pay for hashing.
    """

    def __init__(self, rows: list[dict], first_index: int):
        self._rows = rows
        self._first = first_index
        self._ids: list[str | None] = [None] * len(rows)

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        cached = self._ids[index]
        if cached is None:
            cached = self._ids[index] = row_identity(self._rows[index], self._first + index)
        return cached

    def __repr__(self) -> str:
        return f"RowIdentities({list(self)!r})"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (global seed, row identity, candidate index, ...)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1
