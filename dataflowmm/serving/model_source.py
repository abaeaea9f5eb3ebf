"""Where a serving's model comes from, and what identifies it in a step's fingerprint.

A model reference is one of:
- `tiny:NAME`: a tiny random-weight model (`dataflowmm models list`), built on first use
  (seconds) into `$DATAFLOWMM_MODELS_DIR`;
- `trained:NAME`: a toy model trained on the shapes world, its shipped weights copied on
  first use into the same folder and identified by its recipe hash and weights digest;
- a local folder, identified by its content (config files and weights), so a folder
  rebuilt with other weights at the same path does not reuse cached steps;
- a Hugging Face Hub id. When the Hub cannot be reached (and `HF_HUB_OFFLINE` is not set),
  only the local Hugging Face cache is tried, at once, instead of retrying for half a minute,
  and a model missing from it fails saying so.
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

TINY_PREFIX = "tiny:"
TRAINED_PREFIX = "trained:"
HUB_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
# Weight files up to this size are hashed whole; larger ones by size and sampled blocks,
# so a 20 GB checkpoint is identified in milliseconds rather than a minute.
FULL_HASH_LIMIT = 64 << 20
SAMPLE_BYTES = 1 << 20


def tiny_name(model: str) -> str | None:
    """NAME of a `tiny:NAME` reference (checked against the random-weight models), else None."""
    return _offline_name(model, trained=False)


def trained_name(model: str) -> str | None:
    """NAME of a `trained:NAME` reference (checked against the trained models), else None."""
    return _offline_name(model, trained=True)


def _offline_name(model: str, *, trained: bool) -> str | None:
    """NAME of a reference with the prefix of its kind, checked; a model of the other kind
    named with this prefix is an error naming the right prefix."""
    from dataflowmm.models.tiny import TINY_MODELS, TRAINED_MODELS

    prefix, kind, known = (TRAINED_PREFIX, "trained", TRAINED_MODELS) if trained else (TINY_PREFIX, "tiny", TINY_MODELS)
    other_prefix, other, why = ((TINY_PREFIX, TINY_MODELS, "has random weights") if trained
                                else (TRAINED_PREFIX, TRAINED_MODELS, "is trained"))
    if not model.startswith(prefix):
        return None
    name = model[len(prefix):]
    if name in other:
        raise ValueError(f"unknown {kind} model {model!r}: {name} {why}, use {other_prefix}{name}")
    if name not in known:
        raise ValueError(f"unknown {kind} model {model!r}; choose from "
                         + ", ".join(prefix + entry for entry in known))
    return name


def is_offline_model(model: str) -> bool:
    """Whether `model` is a `tiny:NAME` or `trained:NAME` reference (unknown names raise)."""
    return tiny_name(model) is not None or trained_name(model) is not None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get(HUB_ENDPOINT_ENV) or DEFAULT_HUB_ENDPOINT


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether `endpoint` answers at all (any HTTP status counts), within `timeout` seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def model_source(model: str) -> tuple[str, dict]:
    """What to give `from_pretrained` for `model`: the name or folder, and extra options."""
    name = tiny_name(model)
    if name is not None:
        from dataflowmm.models.tiny import tiny_model_path

        return str(tiny_model_path(name)), {}
    name = trained_name(model)
    if name is not None:
        from dataflowmm.models.tiny import trained_model_path

        return str(trained_model_path(name)), {}
    if Path(model).is_dir() or hub_offline() or hub_reachable(hub_endpoint()):
        return model, {}
    return model, {"local_files_only": True}


def hub_unreachable_hint(model: str) -> str | None:
    """Why a Hub id could not be loaded when it was never going to be downloaded, else None.

    That is: the Hub cannot be reached (or `HF_HUB_OFFLINE` is set) and the model is not in
    the local Hugging Face cache.
    """
    if is_offline_model(model) or Path(model).is_dir() or in_hub_cache(model):
        return None
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable(hub_endpoint()):
        reason = f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached from here"
    else:
        return None
    return (f"{reason} and {model!r} is not in the local Hugging Face cache; give a local model "
            "folder or a tiny model (e.g. tiny:tiny-sd; `dataflowmm models list`), or download "
            "the model where there is network")


def in_hub_cache(model: str) -> bool:
    """Whether the local Hugging Face cache holds anything of Hub repository `model`."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    return (Path(HF_HUB_CACHE) / ("models--" + model.replace("/", "--"))).is_dir()


def model_content(model: str) -> dict:
    """What identifies `model` beyond its name: a local folder's content digest."""
    if tiny_name(model) is not None:
        from dataflowmm.models.tiny import BUILDER_VERSION

        return {"model_builder": BUILDER_VERSION}
    name = trained_name(model)
    if name is not None:
        from dataflowmm.models.tiny import BUILDER_VERSION, model_folder_name

        # The folder name carries the training recipe's hash: another recipe, other weights.
        return {"model_builder": BUILDER_VERSION, "model_folder": model_folder_name(name)}
    folder = Path(model)
    if folder.is_dir():
        return {"model_content": folder_digest(folder)}
    return {}


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path, size and content (sampled for huge files)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0".encode())
        digest.update(bytes.fromhex(_file_digest(str(path), stat.st_size, stat.st_mtime_ns)))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Digest of one file (cached per size and modification time: config() runs every step)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        else:
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                file.seek(offset)
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()
