"""The shapes-world models as they ship: trained weights in the package, stored in float16.

`dataflowmm/kit/weights/NAME/` holds each trained model's `save_pretrained` folder
(configs, tokenizer, processor, `training_report.json`) with every float tensor of its
safetensors files in float16, which halves the repository's share (7.0 -> 3.5 MB) and
keeps the held-out figures (the report records them before and after the round trip).
`trained:NAME` never loads these files directly: `materialise` copies the folder into
the models cache with float32 tensors, so every loader (`from_pretrained` with any
`dtype`, on any device) sees an ordinary float32 model.

Training is a command, not a first-use step: `dataflowmm models train NAME` reruns the
recipe and rewrites the shipped folder (`trained_models.ship`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dataflowmm.kit import shapes_recipes
from dataflowmm.kit.shapes_recipes import REPORT_FILE

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_DTYPE = "float16"
# Files of a models-cache folder that are not the model's (the cache's own stamp).
_NOT_SHIPPED = ("dataflowmm_tiny_model.json",)


def shipped_folder(name: str) -> Path:
    """Folder of model `name`'s shipped weights (float16)."""
    return SHIPPED_DIR / name


def retrain_command(name: str) -> str:
    return f"dataflowmm models train {name}"


def shipped_report(name: str) -> dict:
    """The shipped model's training report; a missing folder is an error naming the command
    that writes it."""
    report = shipped_folder(name) / REPORT_FILE
    if not report.is_file():
        raise FileNotFoundError(f"no shipped weights for trained:{name} in {report.parent}; "
                                f"train and write them with `{retrain_command(name)}`")
    return json.loads(report.read_text())


def recipe_mismatch(name: str) -> str | None:
    """Why the shipped weights of `name` are not what the code's recipe would train, or None."""
    shipped = shipped_report(name)["recipe_hash"]
    current = shapes_recipes.recipe_hash(name)
    if shipped == current:
        return None
    return (f"the shipped weights of trained:{name} were trained with recipe {shipped}, the "
            f"code's recipe is {current}: run `{retrain_command(name)}` to retrain and rewrite "
            f"them in {shipped_folder(name)}")


def folder_name(name: str) -> str:
    """Models-cache folder of `name`: its name, the recipe hash of the shipped weights and
    a digest of them, so re-shipped weights never reuse a stale copy."""
    report = shipped_report(name)
    return f"{name}-{report['recipe_hash']}-{report['shipped']['weights_sha256'][:8]}"


def materialise(name: str, out_dir: Path) -> None:
    """Copy the shipped folder of `name` into `out_dir` with float32 tensors."""
    convert(shipped_folder(name), Path(out_dir), "float32")


def convert(source: Path, target: Path, dtype: str) -> None:
    """Copy model folder `source` to `target`, float tensors of its safetensors files cast
    to `dtype` ("float16" or "float32"); the models cache's own stamp is left out."""
    _copy_converting(Path(source), Path(target), dtype)


def weights_digest(folder: Path) -> str:
    """SHA-256 over the safetensors files of `folder` (their paths and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def publish(staging: Path, name: str, out_dir: Path | None = None) -> Path:
    """Put the finished folder `staging` in place of `out_dir` (default: the shipped folder
    of `name`); returns where it went."""
    out_dir = Path(out_dir) if out_dir is not None else shipped_folder(name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    Path(staging).rename(out_dir)
    return out_dir


def _copy_converting(source: Path, target: Path, dtype: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    wanted = getattr(torch, dtype)
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(exist_ok=True)
        elif path.name in _NOT_SHIPPED:
            continue
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {key: _converted(handle.get_tensor(key), wanted, path, key)
                           for key in handle.keys()}
            save_file(tensors, destination, metadata=metadata)
        else:
            shutil.copyfile(path, destination)


def _converted(tensor, dtype, path: Path, key: str):
    import torch

    if not tensor.is_floating_point():
        return tensor.contiguous()
    converted = tensor.to(dtype).contiguous()
    if not torch.isfinite(converted).all():
        raise ValueError(f"{path}: tensor {key} does not fit in {dtype} (non-finite values)")
    return converted
