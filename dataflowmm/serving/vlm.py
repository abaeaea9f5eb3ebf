"""Chat vision-language models answering prompts that carry zero or more images each.

Any model `AutoModelForImageTextToText` loads with a chat template (LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, ...). Prompts of one batch go through one `generate` call, left-padded; only the
new tokens are decoded, whatever the template (no splitting on "ASSISTANT:"). Sampled
answers are seeded per prompt, so an answer does not depend on its batch neighbours' draws.
Follows the VLM serving protocol (`dataflowmm.serving.vlm_protocol`): a prompt that fails
(an image the processor rejects, out of memory) gets a `GenerationFailed` in its place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from dataflowmm.checks import check_positive_int
from dataflowmm.io.images import ImageReadError
from dataflowmm.serving.common import GenerationFailed, LocalModelServing, Replica
from dataflowmm.serving.fitting import run_on_replicas
from dataflowmm.serving.generation import (
    SeededSamplingLogitsProcessor,
    check_generate_kwargs,
    to_device,
)
from dataflowmm.serving.model_source import model_content
from dataflowmm.serving.vlm_protocol import VLMAnswer, VLMPrompt, check_vlm_prompts, prompt_images

__all__ = ["GenerationFailed", "LocalVLMServing", "VLMPrompt"]


class LocalVLMServing(LocalModelServing):
    r"""
    Answer image prompts with a local chat vision-language model, batched.

    Loaded lazily on the first `generate` (or `load`), one replica per device; the constructor
    only checks arguments.

    Several devices: a call's batches are spread over the replicas (replica r takes batches
    r, r + R, ..., in threads), so each batch and its answers are as on one device.
    Out of memory: a batch that does not fit is split and retried, down to one prompt; the
    size that fit (`fitted_batch_size`) is used from then on (until `cleanup`). A prompt that
    does not fit alone gets a transient `GenerationFailed` in its place.

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"llava-hf/llava-v1.6-vicuna-7b-hf"`):
            Hub id or local folder of a chat VLM and its processor (Data-Juicer's default model).
        max_new_tokens (`int`, *optional*, defaults to 256):
            Most tokens generated per answer.
        temperature (`float`, *optional*, defaults to 0.2):
            Sampling temperature.
        top_p (`float`, *optional*):
            Nucleus sampling mass; `None` samples from the whole distribution.
        num_beams (`int`, *optional*, defaults to 1):
            Beams; more than one searches beams instead of sampling.
        do_sample (`bool`, *optional*, defaults to `True`):
            Sample (seeded per prompt) instead of decoding greedily.
        batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call.
        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            "fp32", "fp16", "bf16" or "auto" (bf16 on CUDA, fp32 on CPU).
        device (`str` or `list[str]`, *optional*):
            Pin one device (`"cpu"`, `"cuda:1"`), or list the devices that hold one replica
            each (`["cuda:0", "cuda:1"]`; `["cpu", "cpu"]` takes the several-replica path on a
            CPU); by default every visible GPU, else the CPU.
        revision (`str`, *optional*):
            Hub revision of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow model code shipped with the model.
        generate_kwargs (`dict`, *optional*):
            Extra `generate` arguments (e.g. `repetition_penalty`); those set here are refused.
    """

    def __init__(
        self,
        model: str | os.PathLike = "llava-hf/llava-v1.6-vicuna-7b-hf",
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.2,
        top_p: float | None = None,
        num_beams: int = 1,
        do_sample: bool = True,
        batch_size: int = 8,
        torch_dtype: str = "auto",
        device: str | list[str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        generate_kwargs: dict | None = None,
    ):
        check_positive_int("max_new_tokens", max_new_tokens)
        check_positive_int("num_beams", num_beams)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        self.generate_kwargs = check_generate_kwargs(generate_kwargs)
        if "num_beams" in self.generate_kwargs:
            raise ValueError("generate_kwargs may not set num_beams: use the constructor's argument")
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = None if top_p is None else float(top_p)
        self.num_beams = num_beams
        self.do_sample = bool(do_sample)
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)
        self.generate_calls = 0  # for benchmarks and tests: how many batched calls were made

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Load the processor and the model on every device (no-op when loaded)."""
        if self._replicas:
            return
        from transformers import AutoModelForImageTextToText

        replicas = self._load_model_replicas(AutoModelForImageTextToText)
        if not getattr(replicas[0].processor, "chat_template", None):
            raise ValueError(f"model {self.model!r} has no chat template: LocalVLMServing needs a chat VLM "
                             "(LLaVA, LLaVA-NeXT, Qwen2-VL, ...)")
        for replica in replicas:
            replica.processor.tokenizer.padding_side = "left"  # prompts end where the answer starts
        self._replicas = replicas

    # --------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[VLMPrompt], seeds: Sequence[int] | None = None) -> list[VLMAnswer]:
        """One answer per prompt, in order, stripped; prompts go `batch_size` per `generate` call,
        the batches spread over the replicas.

        A prompt whose image file cannot be read, or that fails on its own, gets a
        `GenerationFailed` in its place, the others their answers: a batch whose call fails
        (an image the processor rejects, out of memory) is split and retried until the
        failing prompts are alone. A prompt that does not fit in memory alone gets a
        transient failure (retried by the step's next run).

        Args:
            prompts (`list[VLMPrompt]`):
                Each prompt's images (none: a text-only turn) and question.
            seeds (`list[int]`, *optional*):
                One sampling seed per prompt (default 0 for all).
        """
        prompts, seeds = check_vlm_prompts(prompts, seeds)
        if not prompts:
            return []
        self.load()
        answers: list[VLMAnswer | None] = [None] * len(prompts)
        ready: list[tuple[int, VLMPrompt]] = []  # prompts whose images could be read, images loaded
        for index, prompt in enumerate(prompts):
            try:
                ready.append((index, replace(prompt, images=tuple(prompt_images(prompt)))))
            except ImageReadError as error:
                answers[index] = GenerationFailed(str(error))

        def answer(replica: Replica, batch: list[tuple[int, VLMPrompt]]) -> list[str]:
            return self._generate_batch(replica, [prompt for _, prompt in batch], [seeds[index] for index, _ in batch])

        batches = [ready[start:start + self.batch_size] for start in range(0, len(ready), self.batch_size)]
        # torch errors (out of memory included) and processor errors are one prompt's failure
        results = run_on_replicas(self, self._replicas, batches, answer, failures_in_place=True,
                                  item_errors=(RuntimeError, ValueError))
        for batch, texts in zip(batches, results, strict=True):
            for (index, _), text in zip(batch, texts, strict=True):
                answers[index] = text
        return answers

    def _generate_batch(self, replica: Replica, prompts: list[VLMPrompt], seeds: list[int]) -> list[str]:
        """One `generate` call of `replica` over `prompts`: their answers, stripped."""
        processor = replica.processor
        texts = [self._chat_text(processor, prompt) for prompt in prompts]
        images = [image.convert("RGB") for prompt in prompts for image in prompt.images]
        encoded = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        inputs = to_device(dict(encoded), replica.device, self.dtype)
        with torch.inference_mode():  # per thread: each replica runs in its own
            output = replica.model.generate(**inputs, **self._generation_arguments(seeds))
        self.generate_calls += 1
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]

    @staticmethod
    def _chat_text(processor: Any, prompt: VLMPrompt) -> str:
        content = [{"type": "image"} for _ in prompt.images] + [{"type": "text", "text": prompt.text}]
        messages = [{"role": "user", "content": content}]
        if prompt.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _generation_arguments(self, seeds: list[int]) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs}
        if not self.do_sample or self.num_beams > 1:
            return {**kwargs, "do_sample": False, "num_beams": self.num_beams}
        from transformers import LogitsProcessorList

        processor = SeededSamplingLogitsProcessor(list(seeds), self.temperature, self.top_p or 1.0)
        # The processor leaves one finite score per row, so HF's own (neutralised) sampling
        # picks exactly the token drawn from that row's generator.
        return {**kwargs, "do_sample": True, "num_beams": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "logits_processor": LogitsProcessorList([processor])}

    def config(self) -> dict:
        """Everything that affects the answers, as JSON-able values (for fingerprints)."""
        return {
            "serving": type(self).__name__,
            "model": self.model, **model_content(self.model),
            "revision": self.revision,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "dtype": str(self.dtype).removeprefix("torch."),
            "generate_kwargs": {key: self.generate_kwargs[key] for key in sorted(self.generate_kwargs)},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, devices={self.devices})"
