"""Serving classes: one model family each, batched calls, no rows.

Imported lazily so that `import dataflowmm.serving` does not pay for torch,
diffusers and transformers until a serving class is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_CLASSES = {
    "LocalImageGenServing": "dataflowmm.serving.image_gen",
    "LocalCaptionServing": "dataflowmm.serving.caption",
    "ClipServing": "dataflowmm.serving.clip",
    "APIImageGenServing": "dataflowmm.serving.api_image_gen",
    "APIVLMServing": "dataflowmm.serving.api_vlm",
    "LocalVLMServing": "dataflowmm.serving.vlm",
    "VLMPrompt": "dataflowmm.serving.vlm_protocol",
    "VLMServing": "dataflowmm.serving.vlm_protocol",
    "GenerationFailed": "dataflowmm.serving.common",
    "ImageTextMatchingServing": "dataflowmm.serving.itm",
}

__all__ = ["APIImageGenServing", "APIVLMServing", "ClipServing", "GenerationFailed", "ImageTextMatchingServing",
           "LocalCaptionServing", "LocalImageGenServing", "LocalVLMServing", "VLMPrompt", "VLMServing"]

if TYPE_CHECKING:
    from dataflowmm.serving.api_image_gen import APIImageGenServing
    from dataflowmm.serving.api_vlm import APIVLMServing
    from dataflowmm.serving.caption import LocalCaptionServing
    from dataflowmm.serving.clip import ClipServing
    from dataflowmm.serving.common import GenerationFailed
    from dataflowmm.serving.image_gen import LocalImageGenServing
    from dataflowmm.serving.itm import ImageTextMatchingServing
    from dataflowmm.serving.vlm import LocalVLMServing
    from dataflowmm.serving.vlm_protocol import VLMPrompt, VLMServing


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'dataflowmm.serving' has no attribute {name!r}")
