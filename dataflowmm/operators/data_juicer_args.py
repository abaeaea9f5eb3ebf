"""Data-Juicer's argument dicts for models (`mllm_mapper_args`, `image_text_matching_filter_args`,
...): defaults filled in, unknown keys refused, score ranges checked, servings built from
them or checked against one passed in."""

from __future__ import annotations

from typing import Any

from dataflowmm.serving.common import build_serving

# Data-Juicer's fixed defaults, except the similarity maximum: its own test uses 0.8, and with
# 1.0 a box whose two captions are identical (nothing differs) would be kept.
MLLM_DEFAULTS = {"hf_model": "llava-hf/llava-v1.6-vicuna-7b-hf", "max_new_tokens": 256, "temperature": 0.2,
                 "top_p": None, "num_beams": 1}
ITM_DEFAULTS = {"hf_blip": "Salesforce/blip-itm-base-coco", "min_score": 0.1, "max_score": 1.0}
SIMILARITY_DEFAULTS = {"hf_clip": "openai/clip-vit-base-patch32", "min_score": 0.1, "max_score": 0.8}
# Serving settings the dicts may also carry.
SERVING_KEYS = ("batch_size", "torch_dtype", "trust_remote_code")
# Data-Juicer keys about its own execution; accepted so its recipes load, and ignored.
DATA_JUICER_RUNTIME_KEYS = ("num_proc", "accelerator", "text_key_second", "any_or_all", "reduce_mode",
                            "mem_required", "cpu_required")


def thresholds(args: dict, name: str) -> tuple[float, float]:
    """A dict's `[min_score, max_score]`, checked."""
    low, high = args["min_score"], args["max_score"]
    for key, value in (("min_score", low), ("max_score", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}[{key!r}] must be a number, got {value!r}")
    if low > high:
        raise ValueError(f"{name}: min_score {low} is above max_score {high}")
    return float(low), float(high)


def merged_args(given: dict | None, defaults: dict, name: str, model_key: str, extra: tuple[str, ...] = ()) -> dict:
    """Data-Juicer's dict with its defaults filled in, as a new dict (neither input is mutated)."""
    given = dict(given or {})
    known = set(defaults) | set(SERVING_KEYS) | set(DATA_JUICER_RUNTIME_KEYS) | set(extra)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{name} has unknown keys {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return {**defaults, **given, "_given": given, "_model_key": model_key}


def serving_settings(args: dict, keys: tuple[str, ...]) -> dict:
    """The serving settings a dict gave explicitly (None = not given, so a passed serving is checked
    only against what the user actually asked for)."""
    return {key: args["_given"].get(key) for key in keys}


def build_from_args(serving: Any, args: dict, name: str, argument: str, serving_class: type,
                    methods: tuple[str, ...], setting_keys: tuple[str, ...], defaults: dict) -> Any:
    """The serving passed as `argument`, or one built from the dict's model key (not both)."""
    model_key = args["_model_key"]
    if serving is not None and model_key in args["_given"]:
        raise ValueError(f"give either {argument} or {name}[{model_key!r}], not both")
    source = serving if serving is not None else args[model_key]
    return build_serving(source, serving_class, argument=argument, methods=methods,
                         settings=serving_settings(args, setting_keys), defaults=defaults)
