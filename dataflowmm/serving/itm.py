"""Image-text matching scores from a local BLIP ITM model (Data-Juicer's image_text_matching_filter)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from dataflowmm.io.images import to_rgb
from dataflowmm.serving.common import LocalModelServing, Replica, jsonable
from dataflowmm.serving.fitting import run_on_replicas
from dataflowmm.serving.generation import to_device
from dataflowmm.serving.model_source import model_content


class ImageTextMatchingServing(LocalModelServing):
    r"""
    Score how well each text describes its image with BLIP's image-text matching head.

    The score of a pair is the ITM head's softmax probability of "match", in [0, 1], as in
    Data-Juicer's `image_text_matching_filter`. Pairs go `batch_size` per forward pass. Loaded
    lazily on the first `score` (or `load`), one replica per device.

    Several devices: a call's batches are spread over the replicas (replica r takes batches
    r, r + R, ..., in threads), so each batch and its scores are as on one device.
    Out of memory: a batch that does not fit is split and retried, down to one pair; the
    size that fit (`fitted_batch_size`) is used from then on (until `cleanup`). A pair that
    does not fit alone raises `dataflowmm.checks.ItemOutOfMemory`, which an operator's step
    records as its row's transient failure (retried by the step's next run).

    Args:
        model (`str` or `os.PathLike`, *optional*, defaults to `"Salesforce/blip-itm-base-coco"`):
            Hub id or local folder of a `BlipForImageTextRetrieval` model and its processor.
        batch_size (`int`, *optional*, defaults to 32):
            Pairs per forward pass.
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
    """

    def __init__(
        self,
        model: str | os.PathLike = "Salesforce/blip-itm-base-coco",
        *,
        batch_size: int = 32,
        torch_dtype: str = "auto",
        device: str | list[str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        self._set_model_settings(model, batch_size, torch_dtype, device, revision, trust_remote_code)
        self.forward_calls = 0  # for benchmarks and tests: batched forward passes made

    def load(self) -> None:
        """Load the model and its processor on every device (no-op when loaded)."""
        if self._replicas:
            return
        from transformers import BlipForImageTextRetrieval

        self._replicas = self._load_model_replicas(BlipForImageTextRetrieval)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """The matching probability of `images[i]` and `texts[i]`, one float per pair, in order."""
        if isinstance(images, Image.Image) or isinstance(texts, str):
            raise ValueError("score takes lists of images and texts")
        if len(images) != len(texts):
            raise ValueError(f"score needs pairs: got {len(images)} images and {len(texts)} texts")
        pairs = list(zip(images, texts, strict=True))
        if not pairs:
            return []
        self.load()
        batches = [pairs[start:start + self.batch_size] for start in range(0, len(pairs), self.batch_size)]
        return [score for batch in run_on_replicas(self, self._replicas, batches, self._match_probabilities)
                for score in batch]

    def _match_probabilities(self, replica: Replica, pairs: list[tuple[Image.Image, str]]) -> list[float]:
        """One forward pass of `replica` over `pairs`: the ITM head's probability of "match"."""
        inputs = replica.processor(images=[to_rgb(image) for image, _ in pairs], text=[text for _, text in pairs],
                                   return_tensors="pt", padding=True, truncation=True)
        inputs = to_device(dict(inputs), replica.device, self.dtype)
        with torch.inference_mode():  # per thread: each replica runs in its own
            logits = replica.model(**inputs, use_itm_head=True).itm_score
        self.forward_calls += 1
        return logits.float().softmax(dim=-1)[:, 1].cpu().tolist()

    def config(self) -> dict:
        """Everything that affects the scores, as plain JSON (for step fingerprints)."""
        return jsonable({"serving": type(self).__name__, "model": self.model, **model_content(self.model), "revision": self.revision,
                         "torch_dtype": str(self.torch_dtype)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, devices={self.devices})"
