"""The user-facing scaffolds: pipeline scripts (`gpu_pipelines/`) and example data."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

SCAFFOLD_FOLDERS = ("gpu_pipelines", "example_data")


def scaffold_root() -> Path:
    """Where the scaffolds are: inside an installed wheel, or at the top of a checkout."""
    packaged = Path(__file__).resolve().parent / "_scaffolds"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent
    if all((checkout / folder).is_dir() for folder in SCAFFOLD_FOLDERS):
        return checkout
    raise FileNotFoundError("dataflowmm's scaffolds are missing from this installation")


def init_project(target: str | Path = ".", force: bool = False) -> list[Path]:
    """Copy `gpu_pipelines/` and `example_data/` into `target`; returns the folders written.

    Refuses to overwrite existing folders unless `force`.
    """
    target = Path(target)
    source = scaffold_root()
    existing = [target / folder for folder in SCAFFOLD_FOLDERS if (target / folder).exists()]
    if existing and not force:
        names = ", ".join(str(path) for path in existing)
        raise FileExistsError(f"{names} already exists; pass --force to overwrite")
    written = []
    for folder in SCAFFOLD_FOLDERS:
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "cache_local"))
        written.append(target / folder)
    return written


def load_pipeline_module(path: str | Path) -> ModuleType:
    """Import a scaffolded pipeline script by path (they are scripts, not package modules)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
