"""The trained toy models (`trained:NAME`), as the model registry sees them.

`dataflowmm.models.tiny.TRAINED_MODELS` names this module for each trained model (a
string resolved with importlib: the core never imports the kit) and asks it two things:
`folder_name(name)`, instant (no torch), and `build(name, out_dir, models_dir)`, which
copies the shipped weights (`shipped_weights`) into `out_dir` as float32, in about a second.
Nothing trains on first use: `train` (the `dataflowmm models train` command) reruns a
recipe from scratch.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from dataflowmm.io.atomic import current_umask
from dataflowmm.kit import shapes_recipes, shipped_weights

_WARNED: set[str] = set()


def folder_name(name: str) -> str:
    """Cache folder of trained model `name`: its name, the recipe hash and a digest of its
    shipped weights ("shapes-clip-1a2b3c4d-9f8e7d6c")."""
    return shipped_weights.folder_name(name)


def build(name: str, out_dir: Path, models_dir: Path | None = None) -> dict:
    """Copy the shipped weights of `name` into `out_dir` (float32); returns their training report.

    Weights trained with another recipe than the code's are still used (they are what the
    folder name says), with a warning naming the command that retrains them.
    """
    _known(name)
    mismatch = shipped_weights.recipe_mismatch(name)
    if mismatch and name not in _WARNED:
        _WARNED.add(name)
        print(f"[dataflowmm] warning: {mismatch}", file=sys.stderr, flush=True)
    shipped_weights.materialise(name, out_dir)
    return shipped_weights.shipped_report(name)


def train(name: str, out_dir: Path, models_dir: Path | None = None) -> dict:
    """Train model `name` from scratch with the code's recipe into `out_dir` (float32;
    `models_dir` holds the models it reuses); returns its training report."""
    if _known(name) == "shapes-clip":
        from dataflowmm.kit.train_shapes_clip import build_shapes_clip

        return build_shapes_clip(out_dir, models_dir)
    if name == "shapes-captioner":
        from dataflowmm.kit.train_shapes_captioner import build_shapes_captioner

        return build_shapes_captioner(out_dir, models_dir)
    from dataflowmm.kit.train_shapes_sd import build_shapes_sd

    return build_shapes_sd(out_dir, models_dir)


def ship(name: str, trained_dir: Path, out_dir: Path | None = None,
         models_dir: Path | None = None) -> dict:
    """Write the model trained into `trained_dir` as shipped weights (float16) into `out_dir`
    (default: the package's shipped folder of `name`), with its training report plus the
    held-out figures of the float16 copy loaded back as float32; returns that report."""
    destination = Path(out_dir) if out_dir is not None else shipped_weights.shipped_folder(name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from other users
    try:
        shipped_weights.convert(trained_dir, staging, shipped_weights.SHIPPED_DTYPE)
        with tempfile.TemporaryDirectory() as loaded_back:
            shipped_weights.convert(staging, Path(loaded_back), "float32")
            held_out = evaluate(name, Path(loaded_back), models_dir)
        report = read_training_report(trained_dir)
        report["shipped"] = {"dtype": shipped_weights.SHIPPED_DTYPE,
                             "weights_sha256": shipped_weights.weights_digest(staging),
                             "held_out": held_out}
        (staging / shapes_recipes.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        shipped_weights.publish(staging, name, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def evaluate(name: str, folder: Path, models_dir: Path | None = None) -> dict:
    """Held-out figures of the model saved in `folder`, measured as its training measured
    them (inference only: seconds; shapes-sd is judged by shapes-clip from `models_dir`)."""
    if _known(name) == "shapes-clip":
        from dataflowmm.kit.train_shapes_clip import evaluate_shapes_clip

        return evaluate_shapes_clip(folder)
    if name == "shapes-captioner":
        from dataflowmm.kit.train_shapes_captioner import evaluate_shapes_captioner

        return evaluate_shapes_captioner(folder)
    from dataflowmm.kit.train_shapes_sd import evaluate_shapes_sd
    from dataflowmm.models.tiny import trained_model_path

    return evaluate_shapes_sd(folder, trained_model_path("shapes-clip", models_dir))


def _known(name: str) -> str:
    if name not in shapes_recipes.RECIPES:
        raise ValueError(f"no trained model {name!r}; choose from {', '.join(shapes_recipes.RECIPES)}")
    return name


def read_training_report(folder: str | Path) -> dict:
    """The training report (recipe, time, held-out figures) saved beside a trained model."""
    return shapes_recipes.read_training_report(folder)
