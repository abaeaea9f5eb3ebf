"""Operators: batch functions over rows, run step by step on a FileStorage."""

from dataflowmm.operators.base import ERROR_KEY, BatchResult, Operator, RowError, StepContext
from dataflowmm.operators.image_captioner import ImageCaptioner
from dataflowmm.operators.image_diffusion_augmenter import ImageDiffusionAugmenter
from dataflowmm.operators.prompted_image_generator import PromptedImageGenerator

__all__ = [
    "ERROR_KEY",
    "BatchResult",
    "ImageCaptioner",
    "ImageDiffusionAugmenter",
    "Operator",
    "PromptedImageGenerator",
    "RowError",
    "StepContext",
]
