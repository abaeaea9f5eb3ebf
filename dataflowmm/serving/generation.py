"""Text generation helpers the captioning and VLM servings share: seeded per-row sampling,
checks of extra `generate` arguments, and moving inputs to a replica's device."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

# generate() arguments the servings set themselves.
RESERVED_GENERATE_KWARGS = (
    "do_sample", "num_return_sequences", "max_new_tokens", "temperature", "top_p", "top_k",
    "logits_processor", "generation_config",
)


class SeededSamplingLogitsProcessor(LogitsProcessor):
    """Samples each row's next token from that row's own `torch.Generator`.

    Applies temperature and nucleus (top-p) filtering, draws one token per row, and
    returns scores where only that token is finite, so greedy or multinomial selection
    after it picks exactly that token. Rows are independent of each other.

    Args:
        seeds (`list[int]`):
            One seed per row of the generation batch (images x candidates, image-major).
        temperature (`float`):
            Divides the logits before the softmax.
        top_p (`float`):
            Keeps the smallest set of tokens whose probability reaches `top_p`.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(
                f"seeded sampling expected {len(self.generators)} rows, got {scores.shape[0]}"
            )
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        probs = nucleus_filter(probs, self.top_p)
        # u in (0, 1]: the first index whose cumulative mass reaches u has mass > 0.
        draws = torch.stack([1.0 - torch.rand((), generator=g) for g in self.generators])
        cumulative = probs.cumsum(dim=-1)
        targets = draws.to(probs.device).unsqueeze(-1) * cumulative[:, -1:]
        tokens = torch.searchsorted(cumulative, targets).clamp(max=probs.shape[-1] - 1)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(1, tokens, 0.0)


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p nucleus of each row (the top token always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(1, order, sorted_probs)


def check_generate_kwargs(generate_kwargs: dict | None) -> dict:
    generate_kwargs = dict(generate_kwargs or {})
    reserved = sorted(set(generate_kwargs) & set(RESERVED_GENERATE_KWARGS))
    if reserved:
        raise ValueError(
            f"generate_kwargs may not set {', '.join(reserved)}: use the constructor's arguments"
        )
    return generate_kwargs


def to_device(inputs: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict:
    """Move tensors to the device; floating ones (pixels) to the model's dtype."""
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }
