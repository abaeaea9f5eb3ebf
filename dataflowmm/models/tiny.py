"""Tiny random-weight models of every family dataflowmm serves.

They are built offline with the real libraries' configs and tokenizers made in memory,
saved with `save_pretrained`, and loaded back through the same `from_pretrained` code
as real models. Tests, benchmarks and the offline demo use them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dataflowmm.io.atomic import current_umask

# Bump when a builder changes so cached folders are rebuilt.
BUILDER_VERSION = 1
MODELS_DIR_ENV = "DATAFLOWMM_MODELS_DIR"
_STAMP = "dataflowmm_tiny_model.json"

# name -> "module:function"; imported lazily so building one family needs only its code.
TINY_MODELS: dict[str, str] = {
    "tiny-sd": "dataflowmm.models.tiny_diffusion:build_tiny_sd",
    "tiny-flux": "dataflowmm.models.tiny_diffusion:build_tiny_flux",
    "tiny-clip": "dataflowmm.models.tiny_diffusion:build_tiny_clip",
    "tiny-blip": "dataflowmm.models.tiny_captioners:build_tiny_blip",
    "tiny-blip2": "dataflowmm.models.tiny_captioners:build_tiny_blip2",
    "tiny-vision-encoder-decoder": "dataflowmm.models.tiny_captioners:build_tiny_vision_encoder_decoder",
    "tiny-chat-vlm": "dataflowmm.models.tiny_captioners:build_tiny_chat_vlm",
    "tiny-llava-next": "dataflowmm.models.tiny_vlms:build_tiny_llava_next",
    "tiny-blip-itm": "dataflowmm.models.tiny_vlms:build_tiny_blip_itm",
}


def default_models_dir() -> Path:
    """`$DATAFLOWMM_MODELS_DIR`, else `~/.cache/dataflowmm/models`."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "dataflowmm" / "models"


def _builder(name: str) -> Callable[[Path], None]:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    module_name, function_name = TINY_MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def is_built(folder: Path) -> bool:
    stamp = folder / _STAMP
    if not stamp.is_file():
        return False
    return json.loads(stamp.read_text()).get("builder_version") == BUILDER_VERSION


def tiny_model_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Folder of tiny model `name`, built on first use (seconds) and reused after."""
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    target = root / name
    if is_built(target):
        return target
    build = _builder(name)
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed build never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared models folder
    try:
        build(staging)
        (staging / _STAMP).write_text(json.dumps({"name": name, "builder_version": BUILDER_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not is_built(target):  # another process won the race only if it finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_models(models_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) the named tiny models, all of them by default."""
    return {name: tiny_model_path(name, models_dir) for name in (names or list(TINY_MODELS))}
