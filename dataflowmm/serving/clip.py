"""Image and text embeddings, and their cosine similarities, from a local CLIP-style model."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dataflowmm.io.images import to_rgb
from dataflowmm.serving.common import LocalModelServing, Replica, jsonable
from dataflowmm.serving.fitting import run_on_replicas
from dataflowmm.serving.model_source import model_content


class ClipServing(LocalModelServing):
    r"""
    Embed images and texts into CLIP's joint space and score pairs by cosine similarity.

    The model is loaded lazily on first use (or by `load`), one replica per device; the
    constructor only checks its arguments. Embeddings are float32 CPU tensors, L2-normalised,
    one row per input, in input order.

    Several devices: a call's batches are spread over the replicas (replica r takes batches
    r, r + R, ..., in threads), so each batch and its embeddings are as on one device.
    Out of memory: a batch that does not fit is split and retried, down to one item; the
    size that fit (`fitted_batch_size`) is used from then on (until `cleanup`). An item that
    does not fit alone raises `dataflowmm.checks.ItemOutOfMemory`, which an operator's step
    records as its row's transient failure (retried by the step's next run).

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"openai/clip-vit-base-patch32"`):
            Hub id or local folder of a model with `get_image_features` / `get_text_features`
            (CLIP, SigLIP, ...) and its processor.
        batch_size (`int`, *optional*, defaults to 32):
            Images or texts per forward pass.
        torch_dtype (`str`, *optional*, defaults to `"auto"`):
            `"fp32"`, `"fp16"`, `"bf16"` or `"auto"` (bfloat16 on CUDA, float32 on CPU).
        device (`str` or `list[str]`, *optional*):
            Pin one device (`"cpu"`, `"cuda:1"`), or list the devices that hold one replica
            each (`["cuda:0", "cuda:1"]`; `["cpu", "cpu"]` takes the several-replica path on a
            CPU); by default every visible GPU, else the CPU.
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom model code shipped with the model.
    """

    def __init__(
        self,
        model: str | os.PathLike = "openai/clip-vit-base-patch32",
        *,
        batch_size: int = 32,
        torch_dtype: str = "auto",
        device: str | list[str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)

    # ----------------------------------------------------------------- loading
    def load(self) -> None:
        """Load the model and its processor on every device (does nothing when already loaded)."""
        if self._replicas:
            return
        from transformers import AutoModel

        replicas = self._load_model_replicas(AutoModel)
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(replicas[0].model, method):
                raise ValueError(
                    f"model {self.model!r} ({type(replicas[0].model).__name__}) has no {method}; "
                    "ClipServing needs a CLIP-style dual encoder"
                )
        self._replicas = replicas

    # -------------------------------------------------------------- embeddings
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings of `images` (PIL images)."""
        images = _as_list(images, "images")
        self.load()

        def encode(replica: Replica, batch: list[Image.Image]) -> Any:
            image_processor = getattr(replica.processor, "image_processor", replica.processor)
            pixels = image_processor(images=[to_rgb(image) for image in batch],
                                     return_tensors="pt")["pixel_values"]
            return replica.model.get_image_features(pixel_values=pixels.to(replica.device, self.dtype))

        return self._embed(images, encode)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 CPU embeddings of `texts`, each truncated to the
        model's maximum text length."""
        texts = _as_list(texts, "texts")
        self.load()
        first = self._replicas[0]
        max_length = _max_text_length(_tokenizer(first.processor), first.model.config)
        padding = "max_length" if "siglip" in first.model.config.model_type else True

        def encode(replica: Replica, batch: list[str]) -> Any:
            tokens = _tokenizer(replica.processor)(
                list(batch),
                padding=padding,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            tokens = {name: value.to(replica.device) for name, value in tokens.items()}
            return replica.model.get_text_features(**tokens)

        return self._embed(texts, encode)

    def _embed(self, items: list, encode: Callable[[Replica, list], Any]) -> torch.Tensor:
        """Embeddings of `items`, `batch_size` per forward pass (fewer when a batch does not fit
        in memory), the batches spread over the replicas."""
        if not items:
            return torch.zeros((0, self._embedding_dim()), dtype=torch.float32)

        def embed(replica: Replica, piece: list) -> list[torch.Tensor]:
            with torch.inference_mode():  # per thread: each replica runs in its own
                return list(_features(encode(replica, piece)).float().cpu())

        batches = [items[start:start + self.batch_size] for start in range(0, len(items), self.batch_size)]
        rows = [row for batch in run_on_replicas(self, self._replicas, batches, embed) for row in batch]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def _embedding_dim(self) -> int:
        config = self._replicas[0].model.config
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
        return f"{type(self).__name__}(model={self.model!r}, devices={self.devices})"


def _as_list(items: Sequence, name: str) -> list:
    if isinstance(items, (str, Image.Image)):
        raise ValueError(f"{name} must be a list, not a single {type(items).__name__}")
    return list(items)


def _check_pairs(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"similarity needs pairs: got {len(a)} and {len(b)} items")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _max_text_length(tokenizer: Any, config: Any) -> int:
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits.append(getattr(getattr(config, "text_config", None), "max_position_embeddings", None))
    known = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(known) if known else 77


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
