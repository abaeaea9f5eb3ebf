"""ImageDiffusionAugmenter's argument checks and the servings it builds from model ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dataflowmm.checks import check_positive_int
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from dataflowmm.serving.caption import LocalCaptionServing
    from dataflowmm.serving.clip import ClipServing
    from dataflowmm.serving.image_gen import LocalImageGenServing

KEEP_CANDIDATE_MODES = ("random_any", "similar_one", "all")


def check_arguments(strength: float | None, aug_num: int, keep_candidate_mode: str,
                     candidate_num: int | None, image_size: int | None, batch_size: int | None,
                     caption_key: str | None) -> None:
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                 or not 0 <= strength <= 1):
        raise ValueError(f"strength must be a number between 0 and 1, got {strength!r}")
    check_positive_int("aug_num", aug_num)
    if keep_candidate_mode not in KEEP_CANDIDATE_MODES:
        raise ValueError(f"keep_candidate_mode must be one of {', '.join(KEEP_CANDIDATE_MODES)}, "
                         f"got {keep_candidate_mode!r}")
    if candidate_num is not None:
        check_positive_int("candidate_num", candidate_num)
        if candidate_num < aug_num:
            raise ValueError(f"candidate_num ({candidate_num}) must be >= aug_num ({aug_num})")
    if image_size is not None:
        check_positive_int("image_size", image_size)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    if caption_key is not None and (not isinstance(caption_key, str) or not caption_key):
        raise ValueError(f"caption_key must be a non-empty string or None, got {caption_key!r}")


def candidate_count(mode: str, aug_num: int, candidate_num: int | None) -> int:
    """Candidates generated per image: aug_num for "all", else candidate_num (default 2 * aug_num)."""
    if mode == "all":
        return aug_num
    return candidate_num if candidate_num is not None else 2 * aug_num


def diffusion_serving(model: Any, settings: dict, defaults: dict) -> LocalImageGenServing:
    """An image2image serving with one image per prompt: built from an id/folder, or checked."""
    from dataflowmm.serving.image_gen import LocalImageGenServing

    serving = build_serving(model, LocalImageGenServing, argument="hf_diffusion",
                            settings=settings, defaults={**defaults, "task": "image2image"},
                            methods=("generate", "config"), required={"task": "image2image"})
    if getattr(serving, "num_images_per_prompt", 1) != 1:
        raise ValueError("hf_diffusion serving must have num_images_per_prompt=1 (candidates are "
                         f"generated as separate prompts), got {serving.num_images_per_prompt}")
    return serving


def caption_serving(model: Any, settings: dict, defaults: dict) -> LocalCaptionServing:
    from dataflowmm.serving.caption import LocalCaptionServing

    return build_serving(model, LocalCaptionServing, argument="hf_img2seq", settings=settings,
                         defaults=defaults, methods=("caption", "config"))


def clip_serving(model: Any, settings: dict, defaults: dict) -> ClipServing:
    from dataflowmm.serving.clip import ClipServing

    return build_serving(model, ClipServing, argument="hf_clip", settings=settings, defaults=defaults,
                         methods=("image_image_similarity", "config"))
