"""Tiny models of every family dataflowmm serves, built offline on first use.

They are built with the real libraries' configs and tokenizers made in memory, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` code as real models.
Tests, benchmarks and the offline demo use them. Most have random weights and are built
in seconds; the `shapes-*` models are trained on the shapes world (`dataflowmm.shapes`) in
a minute or two each and cached under a name carrying a hash of their training recipe.
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
    "shapes-clip": "dataflowmm.models.shapes_models:build_shapes_clip",
    "shapes-captioner": "dataflowmm.models.shapes_models:build_shapes_captioner",
    "shapes-sd": "dataflowmm.models.shapes_models:build_shapes_sd",
}
# Trained on the shapes world on first use (minutes, not seconds). Their builders also take
# the models folder (shapes-sd reuses shapes-clip from it), and their folder is named by a
# hash of the training recipe ("shapes-clip-1a2b3c4d"), so a changed recipe trains anew
# instead of reusing weights trained by another.
TRAINED_MODELS: tuple[str, ...] = ("shapes-clip", "shapes-captioner", "shapes-sd")


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


def model_folder_name(name: str) -> str:
    """Name of model `name`'s folder: the name itself, plus the recipe hash for trained models."""
    if name in TRAINED_MODELS:
        from dataflowmm.models.shapes_recipes import folder_name

        return folder_name(name)
    _builder(name)  # unknown names fail here, naming the choices
    return name


def tiny_model_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Folder of tiny model `name`, built on first use (seconds; minutes for trained ones)
    and reused after."""
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    target = root / model_folder_name(name)
    if is_built(target):
        return target
    build = _builder(name)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, target.name):
        if is_built(target):  # built by another process while this one waited
            return target
        # Build beside the target and rename, so a killed build never looks finished.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared models folder
        try:
            if name in TRAINED_MODELS:
                build(staging, models_dir=root)
            else:
                build(staging)
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
    models folder do not both spend minutes training the same model (POSIX only)."""
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
    """Build (or reuse) the named tiny models; by default every random-weight one (trained
    models take minutes, so they are built only when named)."""
    names = names or [name for name in TINY_MODELS if name not in TRAINED_MODELS]
    return {name: tiny_model_path(name, models_dir) for name in names}
