"""What the shapes-world trainings share: a fixed training session, the optimiser and loop,
sample batches, the training report, and reading captions back for evaluation.

The trainings themselves: `train_shapes_clip.py`, `train_shapes_captioner.py`,
`train_shapes_sd.py` (recipes in `shapes_recipes.py`).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dataflowmm.kit import shapes_recipes
from dataflowmm.kit.shapes import COLOUR_NAMES, SHAPES, all_captions, caption_for
from dataflowmm.kit.shapes_recipes import REPORT_FILE, recipe_hash

# Words of every shapes-world caption; the tokenizers hold each as one token.
WORLD_WORDS: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLOUR_NAMES)
# How many progress lines a training prints (besides the last).
_PROGRESS_LINES = 6
# Counts trainings in this process (tests check that a cached model is not retrained).
TRAINING_RUNS: dict[str, int] = {}


def log(message: str) -> None:
    print(f"[dataflowmm] {message}", file=sys.stderr, flush=True)


@contextmanager
def training_session(name: str, threads: int, seed: int) -> Iterator[None]:
    """Fixed thread count and seed for a training, restored afterwards.

    The thread count orders float reductions, so it is part of the recipe; the caller's
    global RNG state is left as it was.
    """
    previous_threads = torch.get_num_threads()
    TRAINING_RUNS[name] = TRAINING_RUNS.get(name, 0) + 1
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)


def make_optimizer(parameters, learning_rate: float, weight_decay: float, warmup_steps: int,
               steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up and a cosine decay to a tenth of the rate."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LambdaLR) -> float:
    """One optimisation step on `loss` (then the learning-rate schedule); returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss.item()


def train_loop(label: str, steps: int, step_fn: Callable[[int], float]) -> float:
    """Run `step_fn(step)` `steps` times, printing progress; returns the last loss average."""
    every = max(1, steps // _PROGRESS_LINES)
    started, recent = time.perf_counter(), []
    for step in range(1, steps + 1):
        recent.append(step_fn(step))
        if step % every == 0 or step == steps:
            loss = sum(recent) / len(recent)
            log(f"training {label}: step {step}/{steps} loss {loss:.4f} "
                 f"({time.perf_counter() - started:.0f} s)")
            recent = []
    return loss


def sample_batches(count: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) sample indices drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, count, (steps, batch_size), generator=generator)


def images_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def caption_indices(attributes: list[dict]) -> torch.Tensor:
    """Index of each sample's caption in `all_captions()`."""
    index = {caption: i for i, caption in enumerate(all_captions())}
    return torch.tensor([index[caption_for(a["shape"], a["colour"], a["background"])]
                         for a in attributes])


class Clock:
    """Wall-clock and CPU seconds since creation (CPU time shows the work done even when
    other processes share the cores)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def write_report(out_dir: Path, name: str, recipe: object, clock: Clock, final_loss: float,
                  held_out: dict) -> dict:
    import transformers

    seconds, cpu_seconds = clock.seconds()
    report = {
        "name": name,
        "recipe_hash": recipe_hash(name, recipe),
        "recipe": asdict(recipe),
        "training_seconds": round(seconds, 1),
        "training_cpu_seconds": round(cpu_seconds, 1),
        "final_loss": round(final_loss, 5),
        "held_out": held_out,
        "threads": recipe.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{key} {value:.1%}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in held_out.items())
    log(f"trained {name} in {seconds:.0f} s ({cpu_seconds:.0f} s CPU): held-out {summary}")
    return report


def recipe_for(name: str, recipe: object | None, kind: type) -> object:
    # Looked up at call time, so a recipe registered (or patched) later is the one trained.
    recipe = shapes_recipes.RECIPES[name] if recipe is None else recipe
    if not isinstance(recipe, kind):
        raise TypeError(f"{name} needs a {kind.__name__}, got {type(recipe).__name__}")
    return recipe



def normalise(images: torch.Tensor, image_processor) -> torch.Tensor:
    """What the image processor does to a [0, 1] image of the model's size."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def attribute_accuracies(predicted: list[str], truth: list[str]) -> dict:
    """Exact-caption accuracy plus shape, colour and background accuracy (read from words)."""
    def words(caption: str) -> dict:
        parsed = parse_caption(caption)
        return parsed or {"shape": None, "colour": None, "background": None}

    pairs = [(words(p), words(t)) for p, t in zip(predicted, truth, strict=True)]
    result = {"images": len(truth),
              "exact": sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)}
    for key in ("colour", "shape", "background"):
        result[key] = sum(p[key] == t[key] for p, t in pairs) / len(pairs)
    return result


def parse_caption(caption: str) -> dict | None:
    """{"shape", "colour", "background"} of a caption in the world's form, else None."""
    words = caption.lower().replace(".", " ").split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOUR_NAMES or background not in COLOUR_NAMES:
        return None
    return {"shape": shape, "colour": colour, "background": background}

