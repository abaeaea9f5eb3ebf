"""The trained toy models (`trained:NAME`), as the model registry sees them.

`dataflowmm.models.tiny.TRAINED_MODELS` names this module for each trained model (a
string resolved with importlib: the core never imports the kit) and asks it two things:
`folder_name(name)`, instant (no torch), and `build(name, out_dir, models_dir)`, which
trains the model (minutes) and saves it into `out_dir`.
"""

from __future__ import annotations

from pathlib import Path

from dataflowmm.kit import shapes_recipes


def folder_name(name: str) -> str:
    """Cache folder of trained model `name`: its name plus its recipe hash ("shapes-clip-1a2b3c4d")."""
    return shapes_recipes.folder_name(name)


def build(name: str, out_dir: Path, models_dir: Path | None = None) -> dict:
    """Train model `name` into `out_dir` (`models_dir` holds the models it reuses); returns
    its training report."""
    if name == "shapes-clip":
        from dataflowmm.kit.train_shapes_clip import build_shapes_clip

        return build_shapes_clip(out_dir, models_dir)
    if name == "shapes-captioner":
        from dataflowmm.kit.train_shapes_captioner import build_shapes_captioner

        return build_shapes_captioner(out_dir, models_dir)
    if name == "shapes-sd":
        from dataflowmm.kit.train_shapes_sd import build_shapes_sd

        return build_shapes_sd(out_dir, models_dir)
    raise ValueError(f"no trained model {name!r}; choose from {', '.join(shapes_recipes.RECIPES)}")


def read_training_report(folder: str | Path) -> dict:
    """The training report (recipe, time, held-out figures) saved beside a trained model."""
    return shapes_recipes.read_training_report(folder)
