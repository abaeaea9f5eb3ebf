"""Operators: batch functions over rows, run step by step on a FileStorage."""

from dataflowmm.contract import (
    DROPPED_KEY,
    ERROR_KEY,
    Operator,
    OperatorSettings,
    RowError,
    StepContext,
)
from dataflowmm.operators.difference_captioner import DifferenceCaptioner
from dataflowmm.operators.edit_instructions import EditInstructionGenerator
from dataflowmm.operators.edit_triples import EditTriples
from dataflowmm.operators.edit_verifier import EditVerifier
from dataflowmm.operators.image_captioner import ImageCaptioner
from dataflowmm.operators.image_deduplicator import ImageDeduplicator
from dataflowmm.operators.image_difference_regions import ImageDifferenceRegions
from dataflowmm.operators.image_diffusion_augmenter import ImageDiffusionAugmenter
from dataflowmm.operators.image_qa import ImageQAGenerator
from dataflowmm.operators.image_shape_filters import (
    ImageAspectRatioFilter,
    ImageShapeFilter,
    ImageSizeFilter,
)
from dataflowmm.operators.image_task import ImageGeneration, ImageTask
from dataflowmm.operators.image_text_filters import (
    ClipScoreEvaluator,
    ClipScoreFilter,
    ImageTextMatchingFilter,
)
from dataflowmm.operators.prompt_template import PromptTemplate
from dataflowmm.operators.prompted_image_edit_generator import PromptedImageEditGenerator
from dataflowmm.operators.prompted_image_generator import PromptedImageGenerator
from dataflowmm.operators.visual_qa import PromptedVQAGenerator, PromptTemplatedVQAGenerator

__all__ = [
    "DROPPED_KEY",
    "DifferenceCaptioner",
    "EditInstructionGenerator",
    "EditTriples",
    "EditVerifier",
    "ERROR_KEY",
    "ClipScoreEvaluator",
    "ClipScoreFilter",
    "ImageAspectRatioFilter",
    "ImageDeduplicator",
    "ImageTextMatchingFilter",
    "ImageCaptioner",
    "ImageDiffusionAugmenter",
    "ImageGeneration",
    "ImageTask",
    "ImageDifferenceRegions",
    "ImageQAGenerator",
    "ImageShapeFilter",
    "ImageSizeFilter",
    "Operator",
    "OperatorSettings",
    "PromptTemplate",
    "PromptedImageEditGenerator",
    "PromptedImageGenerator",
    "PromptedVQAGenerator",
    "PromptTemplatedVQAGenerator",
    "RowError",
    "StepContext",
]
