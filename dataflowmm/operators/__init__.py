"""Operators: batch functions over rows, run step by step on a FileStorage."""

from dataflowmm.operators.base import ERROR_KEY, BatchResult, Operator, RowError, StepContext
from dataflowmm.operators.prompted_image_generator import PromptedImageGenerator

__all__ = ["ERROR_KEY", "BatchResult", "Operator", "PromptedImageGenerator", "RowError", "StepContext"]
