"""Full-size random-weight models for benchmarks/gpu.py, built from the public configs in
gpu_configs/ (one JSON file per model: each component's class and config.json numbers, the
published parameter counts, the benchmark's run settings and the `--smoke` shrink).

Nothing is downloaded. Tokenizers are made offline at the real vocabulary sizes
(`dataflowmm.models.offline_tokenizers`), and networks are built with their weights created
where the benchmark runs them: under a `torch.device(...)` context and in the dtype the
servings will load them in, so a 12-billion-parameter transformer is initialised by GPU
kernels in seconds instead of minutes of CPU work. On the `meta` device nothing is
allocated, which is how the full-size configs are checked on any machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "gpu_configs"
CONFIG_FILES = {
    "sd15": "sd15.json",
    "sdxl": "sdxl.json",
    "flux": "flux_schnell.json",
    "llava": "llava15_7b.json",
}
SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: its components (library, class, config) and how it is run."""

    name: str
    source: str
    kind: str  # "diffusers" (a text-to-image pipeline) or "transformers" (a captioning VLM)
    components: dict[str, dict]
    known_parameters: dict[str, int]
    run: dict[str, Any]
    pipeline: str | None = None
    pipeline_kwargs: dict | None = None
    denoiser: str | None = None
    smoke: bool = False


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_spec(name: str, smoke: bool = False) -> ModelSpec:
    """The model's spec from gpu_configs/; `smoke` applies the file's shrink (few, narrow layers)."""
    raw = json.loads((CONFIG_DIR / CONFIG_FILES[name]).read_text())
    components, run = raw["components"], raw["run"]
    if smoke:
        shrink = {key: {"config": values} for key, values in raw["smoke"]["components"].items()}
        components = deep_merge(components, shrink)
        run = {**run, **raw["smoke"]["run"]}
    return ModelSpec(name=raw["name"], source=raw["source"], kind=raw["kind"], components=components,
                     known_parameters=raw["known_parameters"], run=run, pipeline=raw.get("pipeline"),
                     pipeline_kwargs=raw.get("pipeline_kwargs"), denoiser=raw.get("denoiser"), smoke=smoke)


@contextmanager
def building_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors on `device` in `dtype` (floating point), seeded, while building."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(SEED)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_tokenizer(kind: str, config: dict) -> Any:
    """An offline tokenizer of the model family `kind` at the configured vocabulary size."""
    from dataflowmm.models.offline_tokenizers import (
        make_clip_tokenizer,
        make_llama_tokenizer,
        make_t5_tokenizer,
    )

    if kind == "clip":
        return make_clip_tokenizer(model_max_length=config["model_max_length"],
                                   vocab_size=config["vocab_size"], pad_token=config["pad_token"])
    if kind == "t5":
        return make_t5_tokenizer(model_max_length=config["model_max_length"],
                                 vocab_size=config["vocab_size"], extra_ids=config["extra_ids"])
    if kind == "llama":
        return make_llama_tokenizer(vocab_size=config["vocab_size"],
                                    added_tokens=tuple(config["added_tokens"]), pad_token=config["pad_token"])
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def is_network(entry: dict) -> bool:
    """Whether a component entry is a network with weights (built on the device)."""
    return entry["library"] in ("diffusers", "transformers") and not entry["class"].endswith(
        ("Scheduler", "ImageProcessor"))


def build_network(entry: dict) -> torch.nn.Module:
    """One network from its class and config, on the current device and default dtype."""
    config = entry["config"]
    if entry["library"] == "diffusers":
        import diffusers

        return getattr(diffusers, entry["class"]).from_config(config).eval()
    import transformers

    model_config = transformers.AutoConfig.for_model(**config)
    return getattr(transformers, entry["class"])(model_config).eval()


def build_part(entry: dict) -> Any:
    """A component without weights: scheduler, tokenizer or image processor (on the CPU)."""
    if entry["library"] == "tokenizer":
        return build_tokenizer(entry["class"], entry["config"])
    module = __import__(entry["library"])
    klass = getattr(module, entry["class"])
    return klass.from_config(entry["config"]) if entry["library"] == "diffusers" else klass(**entry["config"])


def build_components(spec: ModelSpec, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Every component of `spec` (networks on `device` in `dtype`); processors are assembled
    at save time from these parts."""
    parts: dict[str, Any] = {}
    for name, entry in spec.components.items():
        if entry["library"] == "processor":
            continue
        if is_network(entry):
            with building_on(device, dtype):
                parts[name] = build_network(entry)
        else:
            parts[name] = build_part(entry)
    return parts


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def weight_bytes(parts: dict[str, Any]) -> int:
    """Bytes of every network's parameters and buffers (what a saved folder roughly holds)."""
    total = 0
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            tensors = [*part.parameters(), *part.buffers()]
            total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total


def meta_parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters of each network of `spec`, built on the `meta` device (no memory, no init)."""
    counts = {}
    for name, entry in spec.components.items():
        if is_network(entry):
            with building_on("meta", torch.float32):
                counts[name] = parameter_count(build_network(entry))
    return counts


def save_model(spec: ModelSpec, parts: dict[str, Any], folder: Path) -> None:
    """Write a folder the servings and the plain loops load with `from_pretrained`."""
    from dataflowmm.models.tiny_diffusion import quiet_saving

    with quiet_saving():
        if spec.kind == "diffusers":
            _save_pipeline(spec, parts, folder)
        else:
            _save_llava(spec, parts, folder)


def _save_pipeline(spec: ModelSpec, parts: dict[str, Any], folder: Path) -> None:
    import diffusers

    pipeline = getattr(diffusers, spec.pipeline)(**parts, **(spec.pipeline_kwargs or {}))
    pipeline.save_pretrained(folder, safe_serialization=True)


def _save_llava(spec: ModelSpec, parts: dict[str, Any], folder: Path) -> None:
    """The LLaVA model with its generation settings and a LlavaProcessor with a chat template."""
    import transformers

    from dataflowmm.models.tiny_captioners import LLAVA_CHAT_TEMPLATE

    model, tokenizer = parts["model"], parts["tokenizer"]
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    entry = spec.components["processor"]
    processor = getattr(transformers, entry["class"])(
        image_processor=parts["image_processor"], tokenizer=tokenizer,
        chat_template=LLAVA_CHAT_TEMPLATE, **entry["config"])
    processor.save_pretrained(folder)
