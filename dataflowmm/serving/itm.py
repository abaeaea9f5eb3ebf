"""Image-text matching scores from a local BLIP ITM model (Data-Juicer's image_text_matching_filter)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from dataflowmm.io.images import to_rgb
from dataflowmm.serving.common import (
    LocalModelServing,
    jsonable,
)
from dataflowmm.serving.model_source import model_content


class ImageTextMatchingServing(LocalModelServing):
    r"""
    Score how well each text describes its image with BLIP's image-text matching head.

    The score of a pair is the ITM head's softmax probability of "match", in [0, 1], as in
    Data-Juicer's `image_text_matching_filter`. Pairs go `batch_size` per forward pass. Loaded
    lazily on the first `score` (or `load`).

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"Salesforce/blip-itm-base-coco"`):
            Hub id or local folder of a `BlipForImageTextRetrieval` model and its processor.
        batch_size (`int`, *optional*, defaults to 32):
            Pairs per forward pass.
        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            "fp32", "fp16", "bf16" or "auto" (bf16 on CUDA, fp32 on CPU).
        device (`str`, *optional*):
            Device to run on; by default the first GPU, else the CPU.
        revision (`str`, *optional*):
            Hub revision of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow model code shipped with the model.
    """

    one_replica = True  # one model, on the first GPU (else the CPU)

    def __init__(
        self,
        model: str | os.PathLike = "Salesforce/blip-itm-base-coco",
        *,
        batch_size: int = 32,
        torch_dtype: str = "auto",
        device: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)
        self.forward_calls = 0  # for benchmarks and tests: batched forward passes made

    def load(self) -> None:
        """Load the model and its processor (no-op when loaded)."""
        if self._model is not None:
            return
        from transformers import BlipForImageTextRetrieval

        processor, model = self._load_processor_and_model(BlipForImageTextRetrieval)
        self._processor = processor
        self._model = model.to(self.device).eval()

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """The matching probability of `images[i]` and `texts[i]`, one float per pair."""
        if isinstance(images, Image.Image) or isinstance(texts, str):
            raise ValueError("score takes lists of images and texts")
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"score needs pairs: got {len(images)} images and {len(texts)} texts")
        if not images:
            return []
        self.load()
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch_images = [to_rgb(image) for image in images[start:start + self.batch_size]]
            inputs = self._processor(images=batch_images, text=list(texts[start:start + self.batch_size]),
                                     return_tensors="pt", padding=True, truncation=True)
            inputs = {key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                      for key, value in inputs.items()}
            with torch.inference_mode():
                logits = self._model(**inputs, use_itm_head=True).itm_score
            self.forward_calls += 1
            scores.extend(logits.float().softmax(dim=-1)[:, 1].cpu().tolist())
        return scores

    def config(self) -> dict:
        """Everything that affects the scores, as plain JSON (for step fingerprints)."""
        return jsonable({"serving": type(self).__name__, "model": self.model, **model_content(self.model), "revision": self.revision,
                         "torch_dtype": str(self.torch_dtype)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, device={self.device!r})"
