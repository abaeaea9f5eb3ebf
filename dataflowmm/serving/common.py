"""Checks and helpers every serving class shares."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def check_model_reference(model: str | os.PathLike) -> str:
    """`model` as a string; a local path (one that exists, or starts with "/", "." or "~")
    must be an existing folder, else FileNotFoundError naming it. Hub ids pass unchecked."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a hub id or a local folder, got {model!r}")
    looks_local = os.path.exists(model) or model.startswith(("/", ".", "~"))
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(
            f"model folder {model!r} does not exist (or is not a folder); "
            "give an existing local folder, e.g. one built with `dataflowmm models tiny DIR`"
        )
    return str(Path(model).expanduser()) if looks_local else model


def model_load_error(model: str, exc: BaseException) -> RuntimeError:
    """The error raised when `model` cannot be loaded, with what to do about it."""
    detail = " ".join(str(exc).split()).rstrip(".")
    return RuntimeError(
        f"could not load model {model!r} ({type(exc).__name__}: {detail}). "
        "Without network access give a local model folder (for offline tests and demos, "
        "build tiny ones with `dataflowmm models tiny DIR`)."
    )


def jsonable(value: Any) -> Any:
    """`value` turned into plain JSON types (anything else becomes its str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
