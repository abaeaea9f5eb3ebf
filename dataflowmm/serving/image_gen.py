"""Text-to-image, image-to-image and instruction editing with local diffusers pipelines."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.io.images import to_rgb
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import LocalModelServing, jsonable, model_load_error
from dataflowmm.serving.diffusers_pipeline import (
    BATCH_ENCODABLE_PIPELINES,
    apply_gpu_settings,
    batched_init_latents,
    call_parameters,
    check_compile_mode,
    check_generate_inputs,
    load_pipeline,
    planned_batches,
)
from dataflowmm.serving.fitting import run_on_replicas
from dataflowmm.serving.model_source import model_content

TASKS = ("text2image", "image2image", "edit")
IMAGE_TASKS = ("image2image", "edit")  # the tasks that take an input image per prompt
DEFAULT_STRENGTH = 0.8


class LocalImageGenServing(LocalModelServing):
    _unloaded = {"_pipelines": []}

    r"""
    Generate images from prompts (and, for image-to-image and editing, input images) with a local
    diffusers pipeline.

    The model is loaded lazily on the first `generate` (or by `load`), one replica per device; the
    constructor only checks its arguments, so a mistake fails before any model loads. Every
    image draws its noise from its own seed, so outputs do not depend on batching.

    Several devices: a call's batches are spread over the replicas (replica r takes batches
    r, r + R, ..., in threads), so each batch and its images are as on one device.
    Out of memory: a batch that does not fit is split and retried, down to one prompt; the
    size that fit (`fitted_batch_size`) is used from then on (until `cleanup`). A prompt that
    does not fit alone raises `dataflowmm.checks.ItemOutOfMemory`, which an operator's step
    records as its row's transient failure (retried by the step's next run).

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"black-forest-labs/FLUX.1-dev"`):
            Hub id or local folder of a diffusers pipeline (Stable Diffusion, SDXL, FLUX, ...).
        task (`str`, *optional*, defaults to `"text2image"`):
            `"text2image"` (loaded with `AutoPipelineForText2Image`), `"image2image"` (loaded with
            `AutoPipelineForImage2Image`; the prompt describes the wanted image), with
            `DiffusionPipeline` as the fallback for other pipelines; or `"edit"`: an instruction
            editing pipeline, loaded as the class the model folder names (`DiffusionPipeline`):
            InstructPix2Pix, FLUX Kontext, Qwen-Image-Edit; the prompt is the instruction.
        batch_size (`int`, *optional*, defaults to 4):
            Prompts per pipeline call.
        num_images_per_prompt (`int`, *optional*, defaults to 1):
            Images generated for each prompt.
        height (`int`, *optional*):
            Output height in pixels; the pipeline's default (or, for image-to-image, the input
            image's size) when `None`.
        width (`int`, *optional*):
            Output width in pixels, as `height`.
        num_inference_steps (`int`, *optional*):
            Denoising steps; the pipeline's default when `None`.
        guidance_scale (`float`, *optional*):
            Classifier-free (or, for FLUX.1-dev, distilled) guidance scale; the pipeline's default when `None`.
        strength (`float`, *optional*):
            How much of the input image is noised, in [0, 1]: 0.8 for image-to-image when not
            given; for `"edit"` passed only when given and the pipeline takes it (the editing
            pipelines do not).
        image_guidance_scale (`float`, *optional*):
            InstructPix2Pix: how closely the edit keeps to the input image (its default, 1.5, when
            `None`); passed only to pipelines that take it. Not for text-to-image.
        true_cfg_scale (`float`, *optional*):
            Real classifier-free guidance of FLUX and Qwen-Image pipelines (Qwen-Image-Edit: 4.0,
            with a `negative_prompt`); passed only to pipelines that take it.
        negative_prompt (`str`, *optional*):
            What the images should not show, for every prompt (Qwen-Image-Edit's true CFG needs
            one, e.g. `" "`); passed only to pipelines that take it.
        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            `"fp32"`, `"fp16"`, `"bf16"` or `"auto"` (bfloat16 on CUDA, float32 on CPU).
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom pipeline code shipped with the model.
        device (`str` or `list[str]`, *optional*):
            Pin one device (`"cpu"`, `"cuda:1"`), or list the devices that hold one replica
            each (`["cuda:0", "cuda:1"]`; `["cpu", "cpu"]` takes the several-replica path on a
            CPU); by default every visible GPU, else the CPU.
        max_safety_retries (`int`, *optional*, defaults to 3):
            When the pipeline's safety checker flags an image, regenerate it with a new derived seed
            up to this many times; an image still flagged is returned as `None`.
        call_kwargs (`dict`, *optional*):
            Extra keyword arguments for every pipeline call (e.g. `{"max_sequence_length": 256}`),
            merged last.
        compile (`bool` or `str`, *optional*, defaults to `False`):
            `torch.compile` the denoiser (UNet or transformer) at load: `True`/`"full"` compiles it
            whole (largest speed-up; the first call compiles, minutes for a full-size model),
            `"regional"` only its repeated blocks (diffusers' `compile_repeated_blocks`: seconds to
            compile, most of the speed-up on transformers such as FLUX). A GPU setting: on a CPU
            it needs a C++ compiler. Pixels change by floating-point rounding only.
        channels_last (`bool`, *optional*, defaults to `False`):
            Keep the UNet's and VAE's weights channels-last (NHWC), which GPU convolutions run
            faster in; no effect on a transformer's linear layers. Rounding-level changes only.
        vae_tiling (`bool`, *optional*, defaults to `False`):
            Decode (and encode) through the VAE in overlapping tiles: far less memory for large
            images, slightly different pixels at tile seams for images above the VAE's tile size
            (512 px for SD 1.5, 1024 px for SDXL and FLUX); recorded in `config()`.
    """

    def __init__(
        self,
        model: str | os.PathLike = "black-forest-labs/FLUX.1-dev",
        task: str = "text2image",
        *,
        batch_size: int = 4,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        strength: float | None = None,
        image_guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | None = None,
        torch_dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        device: str | list[str] | None = None,
        max_safety_retries: int = 3,
        call_kwargs: dict | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        vae_tiling: bool = False,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if not isinstance(max_safety_retries, int) or max_safety_retries < 0:
            raise ValueError(f"max_safety_retries must be an int >= 0, got {max_safety_retries!r}")
        if strength is not None and not (_is_number(strength) and 0.0 <= strength <= 1.0):
            raise ValueError(f"strength must be between 0 and 1, got {strength!r}")
        for name, value in (("image_guidance_scale", image_guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if value is not None and not (_is_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if image_guidance_scale is not None and task == "text2image":
            raise ValueError("image_guidance_scale guides by an input image: use task 'edit' (InstructPix2Pix)")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if call_kwargs is not None and not isinstance(call_kwargs, dict):
            raise ValueError(f"call_kwargs must be a dict, got {type(call_kwargs).__name__}")
        self.compile = check_compile_mode(compile)
        self.channels_last = bool(channels_last)
        self.vae_tiling = bool(vae_tiling)
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)
        self.task = task
        self.num_images_per_prompt = num_images_per_prompt
        self.height = height
        self.width = width
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        # edit: only a strength that was given (editing pipelines take none)
        self.strength = float(strength) if strength is not None else (None if task == "edit" else DEFAULT_STRENGTH)
        self.image_guidance_scale = image_guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
        self.max_safety_retries = max_safety_retries
        self.call_kwargs = dict(call_kwargs or {})

    # ----------------------------------------------------------------- loading
    def load(self) -> None:
        """Load one pipeline replica per device (does nothing when already loaded)."""
        if self._pipelines:
            return
        self._pipelines = self._load_replicas(self._load_replica)

    def _load_replica(self, device: str) -> Any:
        """One pipeline on `device` with the GPU settings applied, progress bars off."""
        pipeline = self._from_pretrained()
        if self.task in IMAGE_TASKS and "image" not in call_parameters(pipeline):
            hint = ("; task 'edit' needs an instruction editing pipeline (InstructPix2Pix, FLUX Kontext, "
                    "Qwen-Image-Edit): for a text-to-image model use task 'image2image' with a target caption"
                    if self.task == "edit" else "")
            raise ValueError(
                f"model {self.model!r} loaded as {type(pipeline).__name__}, which takes no input "
                f"image; it cannot serve task {self.task!r}{hint}"
            )
        pipeline.to(device)
        apply_gpu_settings(pipeline, compile=self.compile, channels_last=self.channels_last,
                           vae_tiling=self.vae_tiling)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _from_pretrained(self) -> Any:
        try:
            source, options, dtype = self._pretrained("diffusers")
            return load_pipeline(self.task, source, dtype, options)
        except Exception as exc:
            raise model_load_error(self.model, exc) from exc

    @property
    def loaded(self) -> bool:
        return bool(self._pipelines)

    # -------------------------------------------------------------- generating
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        images: list[Image.Image] | None = None,
    ) -> list[list[Image.Image | None]]:
        """Per prompt, `num_images_per_prompt` RGB images (`None` where the safety checker
        flagged every attempt), in input order.

        `seeds[i]` seeds prompt i: its image j uses `derive_seed(seeds[i], j)`. `images[i]` is the
        input image of prompt i (image-to-image and edit only).
        """
        check_generate_inputs(self.task, prompts, seeds, images)
        if not prompts:
            return []
        if images is not None:
            images = [to_rgb(image) for image in images]
        self.load()
        jobs = planned_batches(len(prompts), self.batch_size, images)

        def run(pipeline: Any, indices: list[int]) -> list[list[Image.Image | None]]:
            with torch.inference_mode():  # per thread: each replica runs in its own
                return self._generate_group(pipeline, indices, prompts, seeds, images)

        outputs: list[list[Image.Image | None]] = [[] for _ in prompts]
        for job, generated in zip(jobs, run_on_replicas(self, self._pipelines, jobs, run), strict=True):
            for index, per_prompt in zip(job, generated, strict=True):
                outputs[index] = per_prompt
        return outputs

    def _generate_group(
        self,
        pipeline: Any,
        indices: list[int],
        prompts: Sequence[str],
        seeds: Sequence[int],
        images: Sequence[Image.Image] | None,
    ) -> list[list[Image.Image | None]]:
        """The images of prompts `indices` (one pipeline call, plus safety retries), per prompt."""
        count = self.num_images_per_prompt
        seed_lists = [[derive_seed(seeds[i], j) for j in range(count)] for i in indices]
        flat_images, flagged = self._call(
            pipeline,
            [prompts[i] for i in indices],
            [seed for per_prompt in seed_lists for seed in per_prompt],
            None if images is None else [images[i] for i in indices],
            count,
        )
        results: list[list[Image.Image | None]] = []
        for k, i in enumerate(indices):
            slots: list[Image.Image | None] = []
            for j in range(count):
                position = k * count + j
                image = flat_images[position]
                if flagged[position]:
                    source = None if images is None else images[i]
                    image = self._safety_retry(pipeline, prompts[i], seeds[i], j, source)
                slots.append(image)
            results.append(slots)
        return results

    def _safety_retry(
        self, pipeline: Any, prompt: str, seed: int, j: int, image: Image.Image | None
    ) -> Image.Image | None:
        """Regenerate one flagged image with fresh derived seeds; `None` if every retry is flagged."""
        for attempt in range(1, self.max_safety_retries + 1):
            retry_seed = derive_seed(seed, j, "safety-retry", attempt)
            new_images, flagged = self._call(
                pipeline, [prompt], [retry_seed], None if image is None else [image], 1
            )
            if not flagged[0]:
                return new_images[0]
        return None

    def _call(
        self,
        pipeline: Any,
        prompts: list[str],
        seeds: list[int],
        images: list[Image.Image] | None,
        count: int,
    ) -> tuple[list[Image.Image], list[bool]]:
        """One pipeline call; its images (prompt-major) as RGB and their safety flags."""
        arguments = self._call_arguments(pipeline, prompts, seeds, images, count)
        output = pipeline(**arguments)
        produced = output.images if hasattr(output, "images") else output[0]
        if len(produced) != len(seeds):
            raise RuntimeError(
                f"{type(pipeline).__name__} returned {len(produced)} images for {len(seeds)} requested"
            )
        flags = getattr(output, "nsfw_content_detected", None) or [False] * len(produced)
        return [to_rgb(image) for image in produced], [bool(flag) for flag in flags]

    def _call_arguments(
        self,
        pipeline: Any,
        prompts: list[str],
        seeds: list[int],
        images: list[Image.Image] | None,
        count: int,
    ) -> dict[str, Any]:
        """Keyword arguments for one call, limited to those the pipeline's __call__ accepts."""
        if self.task in IMAGE_TASKS and count > 1 and type(pipeline).__name__ not in BATCH_ENCODABLE_PIPELINES:
            # One prompt and one image per generated image: with several prompts of several images
            # each, diffusers' editing and (but SD's) img2img pipelines tile the images' latents
            # (i0 i1 i0 i1) while repeating the prompts (p0 p0 p1 p1): wrong pairs.
            prompts = [prompt for prompt in prompts for _ in range(count)]
            images = [image for image in images for _ in range(count)]
            count = 1
        wanted: dict[str, Any] = {
            "prompt": prompts,
            "num_images_per_prompt": count,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "image_guidance_scale": self.image_guidance_scale,
            "true_cfg_scale": self.true_cfg_scale,
            "negative_prompt": None if self.negative_prompt is None else [self.negative_prompt] * len(prompts),
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "output_type": "pil",
        }
        if self.task in IMAGE_TASKS:
            wanted["image"] = images
            if self.task == "image2image" and type(pipeline).__name__ in BATCH_ENCODABLE_PIPELINES:
                wanted["image"] = batched_init_latents(pipeline, images, wanted["generator"], count)
            wanted["strength"] = self.strength
        accepted = call_parameters(pipeline)
        arguments = {
            name: value for name, value in wanted.items() if value is not None and name in accepted
        }
        arguments.update(self.call_kwargs)
        return arguments

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Everything that affects the generated images, as plain JSON (for step fingerprints).

        `batch_size`, the devices, `compile` and `channels_last` are left out: they change pixels
        only by floating-point noise. `vae_tiling` is recorded when on (it changes tile seams), the
        settings newer than the cached steps (`image_guidance_scale`, `true_cfg_scale`,
        `negative_prompt`, an edit's `strength`) when set, so those steps stay valid.
        """
        values = {
            "serving": type(self).__name__,
            "model": self.model,
            **model_content(self.model),
            "revision": self.revision,
            "task": self.task,
            "num_images_per_prompt": self.num_images_per_prompt,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "torch_dtype": str(self.torch_dtype),
            "max_safety_retries": self.max_safety_retries,
            "call_kwargs": self.call_kwargs,
        }
        if self.strength is not None and self.task in IMAGE_TASKS:
            values["strength"] = self.strength
        for name in ("image_guidance_scale", "true_cfg_scale", "negative_prompt"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if self.vae_tiling:  # only when on, so steps cached before this setting existed stay valid
            values["vae_tiling"] = True
        return jsonable(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, task={self.task!r}, devices={self.devices})"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
