"""Whether a finished step whose fingerprint matches can be reused as it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dataflowmm.execution.protocol import StepOperator
from dataflowmm.io.records import iter_records

if TYPE_CHECKING:
    from dataflowmm.storage import FileStorage


def why_not_reusable(storage: FileStorage, operator: StepOperator) -> str | None:
    """Why a finished output with the same fingerprint must be recomputed, else None.

    The fingerprint covers inputs and parameters, not what happened since: images the
    output points to, or the side file of dropped rows, may have been deleted, and `strict`
    (which does not change what a successful step writes) cannot accept an output that
    recorded failed rows.
    """
    manifest = storage.manifest() or {}
    if operator.settings.strict and manifest.get("errors"):
        return f"strict=True and it recorded {manifest['errors']} failed rows"
    if operator.keep_dropped_rows() and not storage.dropped_path.is_file():
        return f"the dropped rows file {storage.dropped_path.name} is missing"
    keys = operator.image_output_keys()
    if not keys:
        return None
    output_dir = storage.output_path.resolve().parent
    on_store = storage.store.listing(storage.images_dir) if storage.store is not None else None
    for number, row in enumerate(iter_records(storage.output_path)):
        for key in keys:
            for path in _paths_in(row.get(key)):
                if not (output_dir / path).is_file() if on_store is None else \
                        storage.store.relative(output_dir / path) not in on_store:
                    return f"row {number} key {key!r}: image {path} is missing"
    return None


def _paths_in(value: Any) -> Iterator[str]:
    if isinstance(value, list):
        for item in value:
            yield from _paths_in(item)
    elif isinstance(value, str) and value:
        yield value
