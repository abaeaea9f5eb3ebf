"""Stand-ins for outside services, for tests, demos and benchmarks that must run offline."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LoopbackImagesAPI"]

if TYPE_CHECKING:
    from dataflowmm.testing.images_api import LoopbackImagesAPI


def __getattr__(name: str):
    # Lazy, so `python -m dataflowmm.testing.images_api` runs the module only once.
    if name == "LoopbackImagesAPI":
        from dataflowmm.testing.images_api import LoopbackImagesAPI

        return LoopbackImagesAPI
    raise AttributeError(f"module 'dataflowmm.testing' has no attribute {name!r}")
