"""The one protocol of vision-language servings: prompts with images in, one text per prompt out.

`LocalVLMServing` (a chat VLM in this process, `transformers`) and `APIVLMServing` (any
OpenAI-compatible chat server: vLLM, SGLang, LMDeploy, TGI, OpenAI) both follow it, and
every operator that prompts a VLM takes either:

    answers = serving.generate([VLMPrompt((image,), "What colour is the shape?")], seeds=[7])

`generate` returns one item per prompt, in order: the answer's text, or an exception in
its place (`GenerationFailed`) when that prompt failed, so one failure never fails its
batch. An exception whose `transient` attribute is true (a rate limit, a time-out, out
of memory) marks a failure that may pass: the step's next run retries that row.

A prompt's images are PIL images or image files (paths, or base64 images carried in rows),
which the serving reads, through the one safe opener, where it uses them: an API serving in
its request threads, so reading one prompt's images overlaps the requests in flight. A file
that cannot be read fails that prompt only. Imports neither torch nor the `openai` client.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from dataflowmm.io.images import load_image
from dataflowmm.serving.common import GenerationFailed

VLMAnswer = str | Exception  # the text, or why this prompt failed (usually a GenerationFailed)
ImageSource = Image.Image | str | os.PathLike  # an image, or a file (or inline base64 image) read when used

__all__ = ["GenerationFailed", "ImageSource", "VLMAnswer", "VLMPrompt", "VLMServing", "check_vlm_prompts",
           "prompt_images"]


@dataclass(frozen=True)
class VLMPrompt:
    """One user turn: zero or more images (first, in order), then the text.

    Args:
        images: the images the question is about (PIL images, or files the serving reads when
            it sends the prompt); none makes it a text-only chat turn.
        text: the question or instruction.
        system: a system prompt for this turn; `None` leaves the serving's own (an
            `APIVLMServing`'s `system_prompt`, else none).
    """

    images: tuple[ImageSource, ...]
    text: str
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"a VLM prompt needs text, got {self.text!r}")
        if not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))
        if not all(isinstance(image, (Image.Image, str, os.PathLike)) for image in self.images):
            raise ValueError("a VLM prompt's images must be PIL images or image files")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"a VLM prompt's system prompt must be a string or None, got {self.system!r}")


@runtime_checkable
class VLMServing(Protocol):
    """What an operator needs of a vision-language serving (besides `Serving`'s lifecycle)."""

    batch_size: int  # prompts an operator hands over per call (one step batch)

    def generate(self, prompts: Sequence[VLMPrompt], seeds: Sequence[int] | None = None) -> list[VLMAnswer]:
        """One answer per prompt, in order: its text, or an exception saying why it failed."""
        ...

    def config(self) -> dict:
        """Everything that changes the answers, as JSON (fingerprints cached steps)."""
        ...


def check_vlm_prompts(prompts: Sequence[VLMPrompt], seeds: Sequence[int] | None) -> tuple[list[VLMPrompt], list[int]]:
    """The prompts and seeds as lists (default seed 0), checked: VLMPrompt objects, one seed each."""
    if isinstance(prompts, (str, VLMPrompt)):
        raise TypeError("prompts must be a list of VLMPrompt objects, not one prompt")
    prompts = list(prompts)
    if not all(isinstance(prompt, VLMPrompt) for prompt in prompts):
        raise TypeError("prompts must be VLMPrompt objects")
    seeds = [0] * len(prompts) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must have one entry per prompt: {len(seeds)} for {len(prompts)} prompts")
    return prompts, seeds


def prompt_images(prompt: VLMPrompt) -> list[Image.Image]:
    """The prompt's images as PIL images, files read through the safe opener (an
    `ImageReadError`, a ValueError naming the file, when one cannot be read)."""
    return [image if isinstance(image, Image.Image) else load_image(image) for image in prompt.images]
