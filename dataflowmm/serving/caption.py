"""Image captioning with local Hugging Face models (BLIP, BLIP-2, ViT+GPT-2, chat VLMs).

Sampled captions are deterministic per image: each candidate draws its tokens from its
own generator, seeded from the image's seed and the candidate index, so a caption does
not depend on which other images share its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dataflowmm.io.images import to_rgb
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import LocalModelServing, Replica, model_load_error
from dataflowmm.serving.fitting import run_on_replicas
from dataflowmm.serving.generation import (
    SeededSamplingLogitsProcessor,
    check_generate_kwargs,
    to_device,
)
from dataflowmm.serving.model_source import model_content

DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."
# Model types whose generate() takes pixel values directly (no chat template).
CAPTIONER_TYPES = ("blip", "blip-2", "vision-encoder-decoder")


@dataclass
class _Components:
    """What a loaded model needs besides its weights."""

    processor: Any
    tokenizer: Any
    image_processor: Any
    family: str  # one of CAPTIONER_TYPES, "chat" or "generic"


@dataclass
class _Encoded:
    """Model inputs for one batch and how many leading output tokens are not new."""

    inputs: dict[str, torch.Tensor]
    prefix_length: int


class LocalCaptionServing(LocalModelServing):
    """Captions images with a local (or cached) Hugging Face vision-language model.

    Loads BLIP, BLIP-2, vision-encoder-decoder (e.g. ViT+GPT-2) and chat-template models
    (LLaVA-, Qwen2-VL-like) through `AutoProcessor` and `AutoModelForImageTextToText`,
    lazily on the first `caption` call, one replica per device.

    Several devices: a call's batches are spread over the replicas (replica r takes batches
    r, r + R, ..., in threads), so each batch and its captions are as on one device.
    Out of memory: a batch that does not fit is split and retried, down to one image; the
    size that fit (`fitted_batch_size`) is used from then on (until `cleanup`). An image that
    does not fit alone raises `dataflowmm.checks.ItemOutOfMemory`, which an operator's step
    records as its row's transient failure (retried by the step's next run).

    Args:
        model (`str` or `os.PathLike`, defaults to `"Salesforce/blip2-opt-2.7b"`):
            Hub id or local folder of the model and its processor. With no network, use a
            local folder, e.g. one built by `dataflowmm models tiny DIR`.
        caption_num (`int`, defaults to 1):
            Candidate captions per image, produced by one `generate` call per batch.
        max_new_tokens (`int`, defaults to 32):
            Most tokens generated per caption.
        batch_size (`int`, defaults to 8):
            Images per forward pass (each carries its `caption_num` candidates).
        do_sample (`bool`, *optional*):
            Sample captions (seeded per image and candidate) instead of decoding greedily.
            Defaults to sampling when `caption_num > 1`. Without sampling, several
            candidates are the best beams of a beam search.
        temperature (`float`, defaults to 1.0):
            Sampling temperature.
        top_p (`float`, defaults to 0.9):
            Nucleus sampling mass.
        torch_dtype (`str`, defaults to `"auto"`):
            "fp32", "fp16", "bf16" or "auto" (bf16 on CUDA, fp32 on CPU).
        device (`str` or `list[str]`, *optional*):
            Pin one device (`"cpu"`, `"cuda:1"`), or list the devices that hold one replica
            each (`["cuda:0", "cuda:1"]`; `["cpu", "cpu"]` takes the several-replica path on a
            CPU); by default every visible GPU, else the CPU.
        revision (`str`, *optional*):
            Hub revision of `model`.
        trust_remote_code (`bool`, defaults to `False`):
            Allow model code from the hub repository.
        generate_kwargs (`dict`, *optional*):
            Extra `generate` arguments (e.g. `repetition_penalty`, `num_beams` when greedy).
            The arguments this class sets itself are refused.
    """

    def __init__(
        self,
        model: str | os.PathLike = "Salesforce/blip2-opt-2.7b",
        *,
        caption_num: int = 1,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        do_sample: bool | None = None,
        temperature: float = 1.0,
        top_p: float = 0.9,
        torch_dtype: str = "auto",
        device: str | list[str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        generate_kwargs: dict | None = None,
    ):
        _check_positive(caption_num=caption_num, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, temperature=temperature)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.generate_kwargs = check_generate_kwargs(generate_kwargs)
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)
        self.caption_num = caption_num
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = float(temperature)
        self.top_p = float(top_p)


    # ------------------------------------------------------------------ public API

    def load(self) -> None:
        """Load one model replica per device, each with its own processor: the replicas run in
        threads, and a fast tokenizer must not be used by two at once (no-op when loaded)."""
        if self._replicas:
            return
        from transformers import AutoModelForImageTextToText

        def load_one(device: str) -> Replica:
            components = _load_processor(source, options)
            model = AutoModelForImageTextToText.from_pretrained(source, **dtype, **options).to(device).eval()
            components.family = _family(model, components.processor)
            if components.family not in ("blip", "vision-encoder-decoder"):
                components.tokenizer.padding_side = "left"  # decoder-only prompts end where text starts
            return Replica(device, components, model)

        try:
            source, options, dtype = self._pretrained()
            self._replicas = self._load_replicas(load_one)
        except Exception as exc:
            raise model_load_error(self.model, exc) from exc

    def caption(
        self,
        images: list[Image.Image],
        prompts: list[str | None] | str | None = None,
        seeds: list[int] | None = None,
        caption_num: int | None = None,
    ) -> list[list[str]]:
        """Caption each image, returning `caption_num` stripped strings per image, in order.

        Args:
            images (`list[PIL.Image.Image]`):
                Images to caption (converted to RGB).
            prompts (`list[str | None]` or `str`, *optional*):
                Text to condition each caption on; one string applies to every image and
                None (or "") means unconditional captioning (chat models then get
                `DEFAULT_CHAT_PROMPT`). The prompt is never part of the returned text.
            seeds (`list[int]`, *optional*):
                One seed per image for sampling; None uses seed 0 for every image.
            caption_num (`int`, *optional*):
                Overrides the constructor's `caption_num` for this call.
        """
        count = self.caption_num if caption_num is None else caption_num
        _check_positive(caption_num=count)
        images = [_checked_rgb(image) for image in images]
        prompts = _per_image(prompts, len(images), "prompts")
        seeds = _per_image(seeds, len(images), "seeds") if seeds is not None else [0] * len(images)
        if not images:
            return []
        self.load()
        # A batch's items are (its shared prompt, image index) pairs.
        jobs = [[(prompt, index) for index in indices] for prompt, indices in _plan_batches(prompts, self.batch_size)]

        def run(replica: Replica, batch: list[tuple[str | None, int]]) -> list[list[str]]:
            indices = [index for _, index in batch]
            texts = self._generate(replica, [images[i] for i in indices], batch[0][0], [seeds[i] for i in indices],
                                   count)
            return [texts[position * count:(position + 1) * count] for position in range(len(indices))]

        results: list[list[str]] = [[] for _ in images]
        for job, captions in zip(jobs, run_on_replicas(self, self._replicas, jobs, run), strict=True):
            for (_, index), candidates in zip(job, captions, strict=True):
                results[index] = candidates
        return results

    def config(self) -> dict:
        """Everything that affects the captions, as JSON-able values (for fingerprints)."""
        return {
            "serving": type(self).__name__,
            "model": self.model,
            **model_content(self.model),
            "revision": self.revision,
            "caption_num": self.caption_num,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "dtype": str(self.dtype).removeprefix("torch."),
            "generate_kwargs": {key: self.generate_kwargs[key] for key in sorted(self.generate_kwargs)},
            "chat_default_prompt": DEFAULT_CHAT_PROMPT,
        }

    # ------------------------------------------------------------------ internals

    def _generate(self, replica: Replica, images: list[Image.Image], prompt: str | None,
                  seeds: list[int], count: int) -> list[str]:
        """`count` captions per image (image-major) for images sharing one prompt, by `replica`."""
        components, model = replica.processor, replica.model
        encoded = _encode(components, model, images, prompt)
        inputs = to_device(encoded.inputs, replica.device, self.dtype)
        kwargs = self._generation_arguments(seeds, count)
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, encoded.prefix_length :]
        texts = components.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _generation_arguments(self, seeds: list[int], count: int) -> dict:
        """`generate` arguments: seeded sampling, or greedy / beam search."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_return_sequences": count,
                  **self.generate_kwargs}
        sampling = self.do_sample if self.do_sample is not None else count > 1
        if not sampling:
            kwargs["do_sample"] = False
            kwargs["num_beams"] = max(count, kwargs.get("num_beams", 1))
            return kwargs
        from transformers import LogitsProcessorList

        row_seeds = [derive_seed(seed, candidate) for seed in seeds for candidate in range(count)]
        processor = SeededSamplingLogitsProcessor(row_seeds, self.temperature, self.top_p)
        # The processor leaves one finite score per row; HF's own warpers are neutralised
        # and its multinomial draw over a one-hot distribution always picks that token.
        kwargs.update(do_sample=True, num_beams=1, temperature=1.0, top_p=1.0, top_k=0,
                      logits_processor=LogitsProcessorList([processor]))
        return kwargs


# ---------------------------------------------------------------------- helpers


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _load_processor(source: str, options: dict) -> _Components:
    """The processor plus its tokenizer and image processor, whichever `AutoProcessor` gives.

    Some captioners (e.g. ViT+GPT-2) ship no combined processor: `AutoProcessor` then
    returns only a tokenizer or an image processor and the other part is loaded alone.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(source, **options)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        tokenizer = processor if hasattr(processor, "batch_decode") else \
            AutoTokenizer.from_pretrained(source, **options)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        image_processor = processor if hasattr(processor, "preprocess") else \
            AutoImageProcessor.from_pretrained(source, **options)
    return _Components(processor, tokenizer, image_processor, family="")


def _family(model, processor) -> str:
    model_type = model.config.model_type
    if model_type in CAPTIONER_TYPES:
        return model_type
    if getattr(processor, "chat_template", None):
        return "chat"
    return "generic"


def _checked_rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images, got {type(image).__name__}")
    return to_rgb(image)


def _per_image(values, count: int, name: str) -> list:
    """A list of one value per image (a single value or None applies to every image)."""
    if values is None or isinstance(values, str):
        return [values] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} must have one entry per image: {len(values)} for {count} images")
    return values


def _plan_batches(prompts: list[str | None], batch_size: int) -> list[tuple[str | None, list[int]]]:
    """Group image indices by prompt, then cut each group into batches.

    Images in one batch share their prompt, so no row is padded and each image's
    caption does not depend on its batch neighbours.
    """
    groups: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        key = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
        groups.setdefault(key, []).append(index)
    return [
        (prompt, indices[start : start + batch_size])
        for prompt, indices in groups.items()
        for start in range(0, len(indices), batch_size)
    ]


def _encode(components: _Components, model, images: list[Image.Image], prompt: str | None) -> _Encoded:
    """Model inputs for one family, and the length of the prompt echoed in its output."""
    family, count = components.family, len(images)
    if family == "blip":
        if prompt is None:
            # generate() starts from [bos]; the output echoes that one token.
            return _Encoded(dict(components.processor(images=images, return_tensors="pt")), 1)
        inputs = components.processor(images=images, text=[prompt] * count, return_tensors="pt")
        # generate() swaps [CLS] for [DEC] and drops the final [SEP] before echoing the rest.
        return _Encoded(dict(inputs), inputs["input_ids"].shape[1] - 1)
    if family == "vision-encoder-decoder":
        return _encode_encoder_decoder(components, model, images, prompt)
    if family == "chat":
        prompt = prompt or DEFAULT_CHAT_PROMPT
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = components.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=False)
    else:  # blip-2 and other decoder-only models: the output starts with input_ids
        text = prompt or ""
    inputs = components.processor(images=images, text=[text] * count, return_tensors="pt",
                                  padding=True)
    return _Encoded(dict(inputs), inputs["input_ids"].shape[1])


def _encode_encoder_decoder(components: _Components, model, images: list[Image.Image],
                            prompt: str | None) -> _Encoded:
    """Pixel values, plus the prompt as decoder_input_ids after the decoder start token."""
    pixels = components.image_processor(images=images, return_tensors="pt")["pixel_values"]
    inputs = {"pixel_values": pixels}
    start = model.generation_config.decoder_start_token_id
    if start is None:
        start = model.config.decoder_start_token_id
    ids = [start]
    if prompt is not None:
        ids += components.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        inputs["decoder_input_ids"] = torch.tensor([ids] * len(images), dtype=torch.long)
    return _Encoded(inputs, len(ids))
