"""Tiny models of every family dataflowmm serves, built offline on first use, and the
registry of the trained toy models.

They are built with the real libraries' configs and tokenizers made in memory, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` code as real models.
Tests, benchmarks and the offline demo use them. Two kinds, two reference prefixes:

- `tiny:NAME` (`TINY_MODELS`): random weights, built in seconds; they exercise code paths.
- `trained:NAME` (`TRAINED_MODELS`): trained on the shapes world (by the kit,
  `dataflowmm.kit`), so they also mean something; their weights ship with the package and
  are copied into the models folder on first use (about a second), under a name carrying
  the hash of their training recipe and a digest of the weights.

This module imports neither the servings nor the kit: the trained models' table names the
kit's module as a string, resolved with importlib when one is needed.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from dataflowmm.io.atomic import current_umask

# Bump when a builder changes so cached folders are rebuilt.
BUILDER_VERSION = 1
MODELS_DIR_ENV = "DATAFLOWMM_MODELS_DIR"
_STAMP = "dataflowmm_tiny_model.json"

# name -> "module:function"; imported lazily so building one family needs only its code.
TINY_MODELS: dict[str, str] = {
    "tiny-sd": "dataflowmm.models.tiny_diffusion:build_tiny_sd",
    "tiny-instruct-pix2pix": "dataflowmm.models.tiny_diffusion:build_tiny_instruct_pix2pix",
    "tiny-flux": "dataflowmm.models.tiny_diffusion:build_tiny_flux",
    "tiny-clip": "dataflowmm.models.tiny_diffusion:build_tiny_clip",
    "tiny-blip": "dataflowmm.models.tiny_captioners:build_tiny_blip",
    "tiny-blip2": "dataflowmm.models.tiny_captioners:build_tiny_blip2",
    "tiny-vision-encoder-decoder": "dataflowmm.models.tiny_captioners:build_tiny_vision_encoder_decoder",
    "tiny-chat-vlm": "dataflowmm.models.tiny_captioners:build_tiny_chat_vlm",
    "tiny-llava-next": "dataflowmm.models.tiny_vlms:build_tiny_llava_next",
    "tiny-blip-itm": "dataflowmm.models.tiny_vlms:build_tiny_blip_itm",
}
# name -> the kit module that provides it. The module provides `folder_name(name)` (the
# name plus the recipe hash and a weights digest, e.g. "shapes-clip-1a2b3c4d-9f8e7d6c", so
# other weights never reuse a stale copy) and `build(name, out_dir, models_dir)` (copies the
# shipped weights). This table is the core's one reference to the kit.
TRAINED_MODELS: dict[str, str] = {
    "shapes-clip": "dataflowmm.kit.trained_models",
    "shapes-captioner": "dataflowmm.kit.trained_models",
    "shapes-sd": "dataflowmm.kit.trained_models",
}


def default_models_dir() -> Path:
    """`$DATAFLOWMM_MODELS_DIR`, else `~/.cache/dataflowmm/models`."""
    configured = os.environ.get(MODELS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "dataflowmm" / "models"


def _builder(name: str) -> Callable[[Path], None]:
    if name not in TINY_MODELS:
        hint = (f"{name!r} is a trained model: use trained:{name} (trained_model_path)"
                if name in TRAINED_MODELS else "choose from " + ", ".join(TINY_MODELS))
        raise ValueError(f"unknown tiny model {name!r}; {hint}")
    module_name, function_name = TINY_MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _trainer(name: str) -> ModuleType:
    if name not in TRAINED_MODELS:
        hint = (f"{name!r} has random weights: use tiny:{name} (tiny_model_path)"
                if name in TINY_MODELS else "choose from " + ", ".join(TRAINED_MODELS))
        raise ValueError(f"unknown trained model {name!r}; {hint}")
    return importlib.import_module(TRAINED_MODELS[name])


def is_built(folder: Path) -> bool:
    stamp = folder / _STAMP
    if not stamp.is_file():
        return False
    return json.loads(stamp.read_text()).get("builder_version") == BUILDER_VERSION


def model_folder_name(name: str) -> str:
    """Name of model `name`'s folder: the name itself, plus the recipe hash for trained models."""
    if name in TRAINED_MODELS:
        return _trainer(name).folder_name(name)
    _builder(name)  # unknown names fail here, naming the choices
    return name


def tiny_model_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Folder of random-weight model `name` (`tiny:NAME`), built on first use (seconds) and
    reused after."""
    build = _builder(name)
    return _built_folder(name, name, lambda staging, root: build(staging), models_dir)


def trained_model_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Folder of trained toy model `name` (`trained:NAME`), copied from the shipped weights
    on first use (about a second) and reused after, also by other processes sharing the
    models folder."""
    trainer = _trainer(name)
    return _built_folder(name, trainer.folder_name(name),
                         lambda staging, root: trainer.build(name, staging, models_dir=root),
                         models_dir)


def _built_folder(name: str, folder_name: str, build: Callable[[Path, Path], object],
                  models_dir: str | Path | None) -> Path:
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    target = root / folder_name
    if is_built(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, target.name):
        if is_built(target):  # built by another process while this one waited
            return target
        # Build beside the target and rename, so a killed build never looks finished.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared models folder
        try:
            build(staging, root)
            stamp = {"name": name, "builder_version": BUILDER_VERSION}
            (staging / _STAMP).write_text(json.dumps(stamp))
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


@contextmanager
def _build_lock(root: Path, folder_name: str) -> Iterator[None]:
    """One build of a folder at a time across processes, so two test sessions sharing a
    models folder do not both build (or copy) the same model (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds stay correct, only wasteful
        yield
        return
    with open(root / f".{folder_name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_tiny_models(models_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Build (or reuse) the named models; by default every random-weight one (the trained
    ones are copied from the shipped weights when named)."""
    names = names or list(TINY_MODELS)
    return {name: trained_model_path(name, models_dir) if name in TRAINED_MODELS
            else tiny_model_path(name, models_dir) for name in names}
