"""dataflowmm: image-text data synthesis with storage-stepped operator pipelines."""

from dataflowmm.storage import FileStorage

__version__ = "0.1.0"
__all__ = ["FileStorage", "__version__"]
