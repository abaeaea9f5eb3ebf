"""Image and text embeddings, and their cosine similarities, from a local CLIP-style model."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dataflowmm.io.images import to_rgb
from dataflowmm.serving.common import (
    LocalModelServing,
    jsonable,
)
from dataflowmm.serving.model_source import model_content


class ClipServing(LocalModelServing):
    r"""
    Embed images and texts into CLIP's joint space and score pairs by cosine similarity.

    The model is loaded lazily on first use (or by `load`); the constructor only checks its
    arguments. Embeddings are float32 CPU tensors, L2-normalised, one row per input.

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"openai/clip-vit-base-patch32"`):
            Hub id or local folder of a model with `get_image_features` / `get_text_features`
            (CLIP, SigLIP, ...) and its processor.
        batch_size (`int`, *optional*, defaults to 32):
            Images or texts per forward pass.
        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            `"fp32"`, `"fp16"`, `"bf16"` or `"auto"` (bfloat16 on CUDA, float32 on CPU).
        device (`str`, *optional*):
            Device to run on; by default the first GPU, else the CPU.
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom model code shipped with the model.
    """

    one_replica = True  # one model, on the first GPU (else the CPU)

    def __init__(
        self,
        model: str | os.PathLike = "openai/clip-vit-base-patch32",
        *,
        batch_size: int = 32,
        torch_dtype: str = "auto",
        device: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)

    # ----------------------------------------------------------------- loading
    def load(self) -> None:
        """Load the model and its processor (does nothing when already loaded)."""
        if self._model is not None:
            return
        from transformers import AutoModel

        processor, model = self._load_processor_and_model(AutoModel)
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise ValueError(
                    f"model {self.model!r} ({type(model).__name__}) has no {method}; "
                    "ClipServing needs a CLIP-style dual encoder"
                )
        self._model = model.to(self.device).eval()
        self._processor = processor

    # -------------------------------------------------------------- embeddings
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings of `images` (PIL images)."""
        images = _as_list(images, "images")
        self.load()
        image_processor = getattr(self._processor, "image_processor", self._processor)

        def encode(batch: list[Image.Image]) -> Any:
            pixels = image_processor(images=[to_rgb(image) for image in batch],
                                     return_tensors="pt")["pixel_values"]
            return self._model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))

        return self._embed(images, encode)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings of `texts`, each truncated to the
        model's maximum text length."""
        texts = _as_list(texts, "texts")
        self.load()
        tokenizer = getattr(self._processor, "tokenizer", self._processor)
        max_length = self._max_text_length(tokenizer)
        padding = "max_length" if "siglip" in self._model.config.model_type else True

        def encode(batch: list[str]) -> Any:
            tokens = tokenizer(
                list(batch),
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            tokens = {name: value.to(self.device) for name, value in tokens.items()}
            return self._model.get_text_features(**tokens)

        return self._embed(texts, encode)

    def _embed(self, items: list, encode: Callable[[list], Any]) -> torch.Tensor:
        if not items:
            return torch.zeros((0, self._embedding_dim()), dtype=torch.float32)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                features = _features(encode(items[start : start + self.batch_size]))
                chunks.append(features.float().cpu())
        embeddings = torch.cat(chunks)
        return torch.nn.functional.normalize(embeddings, dim=-1)

    def _max_text_length(self, tokenizer: Any) -> int:
        limits = [getattr(tokenizer, "model_max_length", None)]
        text_config = getattr(self._model.config, "text_config", None)
        limits.append(getattr(text_config, "max_position_embeddings", None))
        known = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
        return min(known) if known else 77

    def _embedding_dim(self) -> int:
        config = self._model.config
        dim = getattr(config, "projection_dim", None)
        if dim is None:
            dim = getattr(getattr(config, "text_config", None), "hidden_size", 0)
        return int(dim)

    # ------------------------------------------------------------ similarities
    def image_text_similarity(
        self, images: Sequence[Image.Image], texts: Sequence[str]
    ) -> torch.Tensor:
        """(N,) cosine similarity of images[i] and texts[i]."""
        _check_pairs(images, texts)
        return _pairwise(self.embed_images(images), self.embed_texts(texts))

    def text_text_similarity(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of a[i] and b[i]."""
        _check_pairs(a, b)
        return _pairwise(self.embed_texts(a), self.embed_texts(b))

    def image_image_similarity(
        self, a: Sequence[Image.Image], b: Sequence[Image.Image]
    ) -> torch.Tensor:
        """(N,) cosine similarity of a[i] and b[i]."""
        _check_pairs(a, b)
        return _pairwise(self.embed_images(a), self.embed_images(b))

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Everything that affects the embeddings, as plain JSON (for step fingerprints)."""
        return jsonable(
            {
                "serving": type(self).__name__,
                "model": self.model,
                **model_content(self.model),
                "revision": self.revision,
                "torch_dtype": str(self.torch_dtype),
            }
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, device={self.device!r})"


def _as_list(items: Sequence, name: str) -> list:
    if isinstance(items, (str, Image.Image)):
        raise ValueError(f"{name} must be a list, not a single {type(items).__name__}")
    return list(items)


def _check_pairs(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"similarity needs pairs: got {len(a)} and {len(b)} items")


def _features(output: Any) -> torch.Tensor:
    """The projected embeddings from get_*_features: a tensor (transformers 4) or an output
    object whose `pooler_output` holds them (transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find embeddings in {type(output).__name__}")


def _pairwise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1)
