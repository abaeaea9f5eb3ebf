"""dataflowmm: image-text data synthesis with storage-stepped operator pipelines."""

__version__ = "0.1.0"
