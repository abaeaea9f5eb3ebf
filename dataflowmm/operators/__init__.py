"""Operators: batch functions over rows, run step by step on a FileStorage."""

from dataflowmm.contract import ERROR_KEY, Operator, OperatorSettings, RowError, StepContext
from dataflowmm.operators.difference_captioner import DifferenceCaptioner
from dataflowmm.operators.image_captioner import ImageCaptioner
from dataflowmm.operators.image_difference_regions import ImageDifferenceRegions
from dataflowmm.operators.image_diffusion_augmenter import ImageDiffusionAugmenter
from dataflowmm.operators.image_task import ImageGeneration, ImageTask
from dataflowmm.operators.prompt_template import PromptTemplate
from dataflowmm.operators.prompted_image_generator import PromptedImageGenerator

__all__ = [
    "DifferenceCaptioner",
    "ERROR_KEY",
    "ImageCaptioner",
    "ImageDiffusionAugmenter",
    "ImageGeneration",
    "ImageTask",
    "ImageDifferenceRegions",
    "Operator",
    "OperatorSettings",
    "PromptTemplate",
    "PromptedImageGenerator",
    "RowError",
    "StepContext",
]
