"""The two contenders of benchmarks/gpu.py for each model kind, and per-contender GPU memory.

"ours" goes through dataflowmm's servings; "plain" is the loop a user writes with diffusers or
transformers: from_pretrained, the same speed settings applied by hand as the libraries'
guides do, one call per batch. Both load the same saved folder and run the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gpu_models import ModelSpec
from PIL import Image

from dataflowmm.serving.common import dtype_keyword

PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed, cinematic lighting",
    "a bowl of ripe fruit on a wooden kitchen table next to a window, morning light, 35mm photo",
    "an old stone bridge over a quiet river in autumn, watercolor painting with soft colors",
    "a red vintage car parked in front of a white building on a sunny street, film grain",
    "a close-up of a small bird on a snowy branch, shallow depth of field, wildlife photography",
    "a futuristic city skyline at night with neon signs reflected in the wet streets",
    "a cozy reading corner with a green armchair, a lamp and shelves full of books",
    "two people walking a dog along the beach at sunset, warm colors, wide angle",
)


# ------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """Loads its model once, then `call` runs one round's work (one batch)."""

    load: Callable[[], None]
    call: Callable[[], list]


@dataclass
class Settings:
    """The speed settings both contenders use."""

    compile: str | None
    channels_last: bool
    vae_tiling: bool


def diffusion_contenders(spec: ModelSpec, folder: Path, device: str, dtype: torch.dtype,
                         settings: Settings) -> dict[str, Contender]:
    from dataflowmm.serving import LocalImageGenServing

    run = spec.run
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(run["batch_size"])]
    call = {key: run[key] for key in ("height", "width", "num_inference_steps", "guidance_scale")}
    extra = run.get("call_kwargs", {})
    serving = LocalImageGenServing(str(folder), batch_size=len(prompts), device=device, torch_dtype=dtype,
                                   call_kwargs=extra, compile=settings.compile,
                                   channels_last=settings.channels_last, vae_tiling=settings.vae_tiling, **call)
    ours = Contender(serving.load, lambda: serving.generate(prompts, list(range(len(prompts)))))
    return {"ours": ours, "plain": plain_diffusers(folder, device, dtype, prompts, {**call, **extra}, settings)}


def plain_diffusers(folder: Path, device: str, dtype: torch.dtype, prompts: list[str], call: dict,
                    settings: Settings) -> Contender:
    """A user's loop: from_pretrained, the settings applied by hand, one pipeline call per batch."""
    loaded: dict = {}

    def load() -> None:
        from diffusers import AutoPipelineForText2Image

        pipeline = AutoPipelineForText2Image.from_pretrained(folder, **{dtype_keyword("diffusers"): dtype})
        pipeline.to(device)
        network = pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer
        if settings.channels_last:
            network.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
        if settings.vae_tiling:
            pipeline.vae.enable_tiling()
        if settings.compile == "full":
            network.compile()
        elif settings.compile == "regional":
            network.compile_repeated_blocks()
        pipeline.set_progress_bar_config(disable=True)
        loaded["pipeline"] = pipeline

    def generate() -> list:
        with torch.inference_mode():
            generator = torch.Generator("cpu").manual_seed(0)
            return loaded["pipeline"](prompt=prompts, generator=generator, **call).images

    return Contender(load, generate)


def noise_images(count: int, size: list[int]) -> list[Image.Image]:
    """`count` RGB noise pictures of `size` (width, height); their content does not matter."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def captioning_contenders(spec: ModelSpec, folder: Path, device: str, dtype: torch.dtype,
                          settings: Settings) -> dict[str, Contender]:
    from dataflowmm.serving import LocalCaptionServing

    run = spec.run
    images = noise_images(run["batch_size"], run["image_size"])
    tokens = run["max_new_tokens"]
    # min_new_tokens = max_new_tokens: every caption is exactly `tokens` long, whatever a
    # random model would emit, so both contenders do the same work.
    serving = LocalCaptionServing(str(folder), max_new_tokens=tokens, batch_size=len(images), device=device,
                                  torch_dtype=dtype, generate_kwargs={"min_new_tokens": tokens})
    ours = Contender(serving.load, lambda: [texts[0] for texts in serving.caption(images)])
    return {"ours": ours, "plain": plain_transformers(folder, device, dtype, images, tokens)}


def plain_transformers(folder: Path, device: str, dtype: torch.dtype, images: list[Image.Image],
                       tokens: int) -> Contender:
    """A user's loop: processor + greedy `generate` + decoding the new tokens, one call per batch."""
    from dataflowmm.serving.caption import DEFAULT_CHAT_PROMPT

    loaded: dict = {}

    def load() -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(folder, **{dtype_keyword(): dtype})
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_CHAT_PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        loaded.update(processor=processor, model=model.to(device).eval(), text=text)

    def caption() -> list:
        processor, model = loaded["processor"], loaded["model"]
        inputs = processor(images=images, text=[loaded["text"]] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return [text.strip() for text in processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]

    return Contender(load, caption)


# ---------------------------------------------------------------------- memory
class GpuMemory:
    """Per-contender peak GPU memory: its resident bytes (measured around its load) plus the
    largest growth during one of its calls. Both contenders stay loaded, so the raw CUDA peak
    would count the other's weights too. On a CPU nothing is measured."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.resident: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def _allocated(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def load(self, name: str, load: Callable[[], None]) -> None:
        before = self._allocated()
        load()
        self.resident[name] = self._allocated() - before

    def call(self, name: str, call: Callable[[], list]) -> list:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        base = self._allocated()
        output = call()
        if self.cuda:
            torch.cuda.synchronize()
            growth = torch.cuda.max_memory_allocated() - base
            self.peak[name] = max(self.peak.get(name, 0), self.resident[name] + growth)
        return output
