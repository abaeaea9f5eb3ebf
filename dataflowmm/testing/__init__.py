"""Stand-ins for outside services, for tests, demos and benchmarks that must run offline."""

from dataflowmm.testing.images_api import LoopbackImagesAPI

__all__ = ["LoopbackImagesAPI"]
