"""What LocalImageGenServing does around its diffusers pipelines: which class loads a model, how
a call's inputs are checked and batched, which call arguments a pipeline takes, batched
image-to-image init latents, and the GPU speed and memory settings (torch.compile,
channels-last, VAE tiling)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from PIL import Image

# `compile` values and what they mean: None (off), "full" (the whole denoiser) or "regional"
# (its repeated blocks only: diffusers' compile_repeated_blocks).
COMPILE_MODES = {False: None, None: None, True: "full", "full": "full", "regional": "regional"}

# Image-to-image pipelines that accept VAE latents as `image` and, given one generator per
# image, would otherwise run the VAE encoder once per image.
BATCH_ENCODABLE_PIPELINES = {"StableDiffusionImg2ImgPipeline"}


def check_compile_mode(compile: bool | str | None) -> str | None:
    """`compile` as None, "full" or "regional"; anything else is a ValueError."""
    if isinstance(compile, (bool, str)) or compile is None:
        if compile in COMPILE_MODES:
            return COMPILE_MODES[compile]
    raise ValueError(f"compile must be False, True, 'full' or 'regional', got {compile!r}")


def denoiser(pipeline: Any) -> torch.nn.Module | None:
    """The network run at every denoising step: the UNet (SD, SDXL) or the transformer (FLUX, SD3)."""
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def apply_gpu_settings(pipeline: Any, *, compile: str | None, channels_last: bool, vae_tiling: bool) -> None:
    """Apply the serving's speed and memory settings to a pipeline already on its device.

    Each is what diffusers' own guides do by hand: `denoiser.compile()` (or
    `compile_repeated_blocks()`, which compiles one block and reuses it, for a compile of
    seconds instead of minutes), `.to(memory_format=torch.channels_last)` on the UNet and the
    VAE (convolutions run faster in NHWC on GPUs), and `vae.enable_tiling()`.
    """
    network = denoiser(pipeline)
    if (compile or channels_last) and network is None:
        raise ValueError(f"{type(pipeline).__name__} has no unet or transformer for compile/channels_last")
    vae = getattr(pipeline, "vae", None)
    if channels_last:
        for module in (network, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if vae_tiling:
        if not callable(getattr(vae, "enable_tiling", None)):
            raise ValueError(f"{type(pipeline).__name__} has no VAE that can tile (vae_tiling=True)")
        vae.enable_tiling()
    if compile == "full":
        network.compile()  # in place: the pipeline keeps its own module type and config
    elif compile == "regional":
        if not getattr(network, "_repeated_blocks", None):
            raise ValueError(f"compile='regional' needs a denoiser that declares repeated blocks; "
                             f"{type(network).__name__} does not: use compile='full'")
        network.compile_repeated_blocks()


def batched_init_latents(pipeline: Any, images: list[Image.Image], generators: list[torch.Generator],
                         count: int) -> torch.Tensor:
    """The init latents the pipeline would make, from one VAE pass over the whole batch.

    Each image's latent sample is drawn from its own generator, as diffusers does per
    image, so the generators are left in the same state for the denoising noise.
    """
    vae = pipeline.vae
    pixels = pipeline.image_processor.preprocess(images).to(device=vae.device, dtype=vae.dtype)
    pixels = pixels.repeat_interleave(count, dim=0)
    sample = vae.encode(pixels).latent_dist.sample(generator=generators)
    return sample * vae.config.scaling_factor


def call_parameters(pipeline: Any) -> set[str]:
    """Names `pipeline.__call__` declares. A catch-all **kwargs does not count: diffusers
    pipelines use it for deprecated arguments and ignore anything else passed there."""
    parameters = inspect.signature(pipeline.__call__).parameters.values()
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in keyword_kinds}


def load_pipeline(task: str, source: str, dtype: dict, options: dict) -> Any:
    """The diffusers pipeline for `task` from a hub id or folder.

    "text2image" and "image2image" go through `AutoPipelineForText2Image` and
    `AutoPipelineForImage2Image` (a text-to-image folder becomes its image-to-image sibling),
    falling back to `DiffusionPipeline` for pipelines the auto classes do not know. "edit"
    loads the class the folder's model_index.json names (`DiffusionPipeline`):
    InstructPix2Pix, FLUX Kontext or Qwen-Image-Edit. (In diffusers 0.42 the auto classes
    refuse an InstructPix2Pix folder rather than map it to SD's img2img pipeline, which would
    not fit its 8-channel UNet; "edit" does not rely on that.)
    """
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

    if task == "edit":
        return DiffusionPipeline.from_pretrained(source, **dtype, **options)
    auto = AutoPipelineForText2Image if task == "text2image" else AutoPipelineForImage2Image
    try:
        return auto.from_pretrained(source, **dtype, **options)
    except ValueError:  # the auto class does not know this pipeline
        return DiffusionPipeline.from_pretrained(source, **dtype, **options)


def check_generate_inputs(task: str, prompts: list[str], seeds: list[int], images: list[Image.Image] | None) -> None:
    """ValueError unless there is one seed per prompt and, for the image tasks, one PIL image
    per prompt (and no images for text-to-image)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if task == "text2image":
        if images is not None:
            raise ValueError("images are only used by tasks 'image2image' and 'edit'")
        return
    count = 0 if images is None else len(images)
    if count != len(prompts):
        raise ValueError(f"{task} needs one input image per prompt: got {len(prompts)} prompts and {count} images")
    for i, image in enumerate(images or []):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] is a {type(image).__name__}, not a PIL image")


def planned_batches(count: int, batch_size: int, images: list[Image.Image] | None) -> list[list[int]]:
    """Prompt indices in batches of `batch_size`, each split by input-image size: a pipeline
    call resizes a batch's images to the first one's size."""
    return [group for start in range(0, count, batch_size)
            for group in _group_by_size(list(range(start, min(start + batch_size, count))), images)]


def _group_by_size(indices: list[int], images: list[Image.Image] | None) -> list[list[int]]:
    """`indices` split into runs sharing an input-image size (one run for text-to-image)."""
    if images is None:
        return [indices]
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(images[i].size), []).append(i)
    return list(groups.values())
