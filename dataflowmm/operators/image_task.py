"""Image tasks you define (distilabel's `ImageTask`) and the built-in `ImageGeneration`."""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Operator, StepContext, is_transient
from dataflowmm.io.images import ImageOutput
from dataflowmm.operators.prompted_image_generator import column_prompt
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from dataflowmm.execution.step import StepSummary
    from dataflowmm.storage import FileStorage

MODEL_NAME = "model_name"


class ImageGenerationServing(Protocol):
    """What an image task needs from its serving (`LocalImageGenServing`, `APIImageGenServing`).

    `generate` returns, per prompt, its images, `None` for an image a safety checker kept
    back, or an exception instance for a prompt whose request failed for good.
    """

    batch_size: int

    def generate(self, prompts: list[str], seeds: list[int]) -> list: ...

    def config(self) -> dict: ...


@dataclass(frozen=True)
class _Mappings:
    inputs: dict[str, str] = field(default_factory=dict)   # task column -> dataset column
    outputs: dict[str, str] = field(default_factory=dict)  # task column -> dataset column


def _columns(value: Any, what: str) -> dict[str, bool]:
    """`inputs`/`outputs` as {column: required}: a list means every column is required."""
    if isinstance(value, dict):
        columns = dict(value)
    elif isinstance(value, (list, tuple)):
        columns = dict.fromkeys(value, True)
    else:
        raise TypeError(f"{what} must be a list of column names or a dict of column -> required, "
                        f"got {type(value).__name__}")
    for name, required in columns.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what}: column names must be non-empty strings, got {name!r}")
        if not isinstance(required, bool):
            raise TypeError(f"{what}: column {name!r} maps to {required!r}, expected True or False")
    return columns


class ImageTask(Operator):
    r"""
    Base class of image tasks: you say what a row means to an image model, the framework does the rest.

    A subclass declares `inputs` and `outputs` (lists of columns, or dicts of column ->
    required) and implements `format_input(row) -> prompt` and `format_output(output, row)
    -> dict`. The framework batches rows through the serving, makes `num_generations`
    distinct generations per row (each with its own seed derived from the global seed,
    the row's identity and the generation's index), writes every PIL image `format_output`
    returns (as a file named by row identity, or as base64 in the row), fills `model_name`,
    keeps failed rows with their `error`, checkpoints every `save_interval` rows and caches
    the step, on the local and on the Ray runner alike.

    `format_output` receives `output = {"images": [PIL images of this generation], "seed": int}`
    and returns the output columns; a PIL image (or list of them) may go only into the columns
    listed in `image_outputs` (default: `["image"]` when `"image"` is an output). An output
    named `<image column>_path` receives the written file's path (`None` when images travel
    in rows). A subclass's constructor arguments and its source code are part of the step's
    fingerprint: changing them recomputes the step instead of reusing a stale one.

    Args:
        image_generation_model: a serving with `generate(prompts, seeds)` and `config()`
            (`LocalImageGenServing`, `APIImageGenServing`), or a diffusers model id or
            folder to build a `LocalImageGenServing` from.
        num_generations: generations per row, each with its own seed.
        group_generations: one output row per input row with each output column a list of
            `num_generations` values, instead of one output row per generation (distilabel's default).
        image_format: `"png"` (default, lossless) or `"jpeg"`.
        images_in_rows: write images into the rows as base64 strings instead of files.
        save_interval: rows between checkpoints; a killed run resumes from the last one.
        seed: global seed.
        save_dir: folder for image files; default `{cache_path}/{prefix}_step{N}_images`.
        absolute_paths: write absolute paths instead of paths relative to the dataset file.
        strict: raise on the first failed row instead of keeping it with an error.
    """

    default_input_batch_size = 1  # for a serving that does not say its batch size

    def __init__(
        self,
        image_generation_model: Any,
        *,
        num_generations: int = 1,
        group_generations: bool = False,
        image_format: str = "png",
        images_in_rows: bool = False,
        save_interval: int = 50,
        seed: int = 0,
        save_dir: str | os.PathLike | None = None,
        absolute_paths: bool = False,
        strict: bool = False,
    ):
        check_positive_int("num_generations", num_generations)
        self.serving = build_serving(image_generation_model, _local_serving_class(image_generation_model),
                                     argument="image_generation_model", methods=("generate", "config"))
        self.num_generations = num_generations
        self.group_generations = bool(group_generations)
        self.image_output = ImageOutput(image_format, images_in_rows)
        self.keys = _Mappings()
        self._check_columns()

    # -- what a subclass defines ----------------------------------------------------------

    @property
    @abstractmethod
    def inputs(self) -> list[str] | dict[str, bool]:
        """Columns the task reads: a list (all required) or a dict of column -> required."""

    @property
    @abstractmethod
    def outputs(self) -> list[str] | dict[str, bool]:
        """Columns the task writes (`model_name` is added when missing)."""

    @property
    def image_outputs(self) -> list[str]:
        """Output columns that receive images (default: `image`, when it is an output)."""
        return ["image"] if "image" in self.output_columns else []

    @abstractmethod
    def format_input(self, row: dict) -> str:
        """The prompt for `row` (raise ValueError for a row that cannot be used)."""

    @abstractmethod
    def format_output(self, output: dict, row: dict) -> dict:
        """The output columns for one generation; `output` is `{"images": [...], "seed": int}`."""

    # -- running --------------------------------------------------------------------------

    def run(
        self,
        storage: FileStorage,
        input_mappings: dict[str, str] | None = None,
        output_mappings: dict[str, str] | None = None,
        *,
        retry_errors: bool = False,
    ) -> StepSummary:
        """Run the task on `storage`'s step.

        Args:
            storage: the step (`storage.step()`).
            input_mappings: task input column -> dataset column to read it from.
            output_mappings: task output column -> dataset column to write it to.
            retry_errors: recompute every failed row of a finished step (rows that failed
                transiently are always retried).
        """
        mappings = _Mappings(dict(input_mappings or {}), dict(output_mappings or {}))
        unknown = [name for name in mappings.inputs if name not in self.input_columns]
        unknown += [name for name in mappings.outputs if name not in self.output_columns]
        if unknown:
            raise ValueError(f"{self.name}: mapping of unknown column {unknown[0]!r}; inputs are "
                             f"{list(self.input_columns)}, outputs {list(self.output_columns)}")
        return self.run_bound(storage, self._bound_to(mappings), retry_errors=retry_errors)

    @property
    def input_columns(self) -> dict[str, bool]:
        return _columns(self.inputs, f"{self.name}.inputs")

    @property
    def output_columns(self) -> dict[str, bool]:
        columns = _columns(self.outputs, f"{self.name}.outputs")
        columns.setdefault(MODEL_NAME, True)
        return columns

    @property
    def model_name(self) -> str:
        serving = self.serving
        return str(getattr(serving, "model_name", None) or getattr(serving, "model", None) or type(serving).__name__)

    def required_keys(self) -> list[str]:
        return [self._dataset_column(name) for name, required in self.input_columns.items() if required]

    def path_keys(self) -> list[str]:
        if self.image_output.images_in_rows:
            return []
        image_columns = [*self.image_outputs, *(f"{name}_path" for name in self.image_outputs)]
        return [self._output_column(name) for name in image_columns if name in self.output_columns]

    def image_output_keys(self) -> list[str]:
        return [] if self.image_output.images_in_rows else [self._output_column(n) for n in self.image_outputs]

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        prompts: dict[int, str] = {}
        failed: dict[int, str] = {}
        for offset, row in enumerate(rows):
            try:
                prompts[offset] = self._prompt(self._task_row(row))
            except (ValueError, KeyError, TypeError) as error:
                failed[offset] = str(error)
        jobs = [(offset, generation) for offset in prompts for generation in range(self.num_generations)]
        seeds = [derive_seed(self.settings.seed, row_ids[offset], generation) for offset, generation in jobs]
        results = self.serving.generate([prompts[offset] for offset, _ in jobs], seeds) if jobs else []

        generations: dict[int, list[dict | str]] = {offset: [] for offset in prompts}
        for (offset, generation), seed, result in zip(jobs, seeds, results, strict=True):
            generations[offset].append(self._generation(rows[offset], result, seed, row_ids[offset],
                                                        generation, context))
        out_rows: list[dict] = []
        for offset, row in enumerate(rows):
            if offset in failed:
                out_rows.append(self.row_failed(row, failed[offset], offset))
            elif self.group_generations:
                out_rows.append(self._grouped_row(row, generations[offset], offset))
            else:
                out_rows.extend(self._output_row(row, result, offset) for result in generations[offset])
        return out_rows

    # -- one row, one generation ----------------------------------------------------------

    def _check_columns(self) -> None:
        """Fail at construction on malformed `inputs`/`outputs`/`image_outputs` (no model loaded yet)."""
        outputs = self.output_columns
        self.input_columns  # noqa: B018 - validates
        stray = [name for name in self.image_outputs if name not in outputs]
        if stray:
            raise ValueError(f"{self.name}.image_outputs names {stray[0]!r}, which is not in outputs {list(outputs)}")

    def _dataset_column(self, task_column: str) -> str:
        return self.keys.inputs.get(task_column, task_column)

    def _output_column(self, task_column: str) -> str:
        return self.keys.outputs.get(task_column, task_column)

    def _task_row(self, row: dict) -> dict:
        """The row as the task sees it: input columns under their task names."""
        view = dict(row)
        for task_column, column in self.keys.inputs.items():
            view[task_column] = row.get(column)
        for name, required in self.input_columns.items():
            if required and view.get(name) is None:
                raise ValueError(f"input column {self._dataset_column(name)!r} is missing")
        return view

    def _prompt(self, row: dict) -> str:
        prompt = self.format_input(row)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"format_input returned {prompt!r}, expected a non-empty prompt string")
        return prompt

    def _generation(self, row: dict, result: Any, seed: int, row_id: str, generation: int,
                    context: StepContext) -> dict | str:
        """The stored output columns of one generation, or why it failed."""
        if isinstance(result, Exception):
            return _Failure(str(result), is_transient(result))
        if any(image is None for image in result):
            return "an image was flagged by the safety checker after every retry"
        try:
            formatted = self.format_output({"images": list(result), "seed": seed}, self._task_row(row))
        except (ValueError, KeyError, TypeError) as error:
            return f"format_output: {error}"
        if not isinstance(formatted, dict):
            raise TypeError(f"{self.name}.format_output must return a dict, got {type(formatted).__name__}")
        return self._store_images(formatted, row_id, generation, context)

    def _store_images(self, formatted: dict, row_id: str, generation: int, context: StepContext) -> dict:
        stored = dict(formatted)
        for name, value in formatted.items():
            images = value if isinstance(value, list) else [value]
            if not any(isinstance(image, Image.Image) for image in images):
                continue
            if name not in self.image_outputs:
                raise TypeError(f"{self.name}.format_output put an image into {name!r}, which is not in "
                                f"image_outputs {self.image_outputs}; list it there")
            # Files of a second image column get its position in their name, so columns never collide.
            stem = row_id if self.image_outputs.index(name) == 0 else f"{row_id}-{self.image_outputs.index(name)}"
            written = [self.image_output.store(image, context.save_dir, stem, generation, index)
                       for index, image in enumerate(images)]
            stored[name] = written if isinstance(value, list) else written[0]
            if f"{name}_path" in self.output_columns and f"{name}_path" not in formatted:
                stored[f"{name}_path"] = None if self.image_output.images_in_rows else stored[name]
        return stored

    def empty_outputs(self) -> dict:
        """A failed row's outputs: every output column None, the model's name kept."""
        empty = {self._output_column(name): None for name in self.output_columns}
        empty[self._output_column(MODEL_NAME)] = self.model_name
        return empty

    def _with_outputs(self, row: dict, outputs: dict) -> dict:
        renamed = {self._output_column(name): value for name, value in outputs.items()}
        return {**row, **self.empty_outputs(), **renamed, self._output_column(MODEL_NAME): self.model_name}

    def _output_row(self, row: dict, result: dict | str, offset: int) -> dict:
        if isinstance(result, str):
            return self.row_failed(row, result, offset, transient=getattr(result, "transient", False))
        return self._with_outputs(row, result)

    def _grouped_row(self, row: dict, results: list[dict | str], offset: int) -> dict:
        columns = [name for name in self.output_columns if name != MODEL_NAME]
        grouped = {name: [None if isinstance(r, str) else r.get(name) for r in results] for name in columns}
        errors = [f"generation {index}: {r}" for index, r in enumerate(results) if isinstance(r, str)]
        if errors:
            transient = any(getattr(r, "transient", False) for r in results)
            return self.row_failed(self._with_outputs(row, grouped), "; ".join(errors), offset, {},
                                   transient=transient)
        return self._with_outputs(row, grouped)

    def __repr__(self) -> str:
        return f"{self.name}(image_generation_model={self.serving!r}, num_generations={self.num_generations})"


class _Failure(str):
    """Why one generation failed, and whether that may pass on a later run."""

    def __new__(cls, message: str, transient: bool) -> _Failure:
        failure = super().__new__(cls, message)
        failure.transient = transient
        return failure


def _local_serving_class(model: Any) -> type:
    """`LocalImageGenServing` (imported only when a model id or folder asks for it: it pulls torch)."""
    if isinstance(model, (str, os.PathLike)):
        from dataflowmm.serving.image_gen import LocalImageGenServing

        return LocalImageGenServing
    return ImageGenerationServing


class ImageGeneration(ImageTask):
    r"""
    Generate images from a `prompt` column (distilabel's `ImageGeneration`).

    Input columns:
        - prompt (`str`): the text to draw.

    Output columns:
        - image (`str`): the image: its file's path (default) or, with `images_in_rows=True`,
          a base64 string; a list when the serving makes several images per request.
        - image_path (`str`): the file's path; `None` when images travel in rows.
        - model_name (`str`): the serving's model.

    Examples:

    ```python
    from dataflowmm import FileStorage
    from dataflowmm.operators import ImageGeneration
    from dataflowmm.serving import APIImageGenServing

    storage = FileStorage("prompts.jsonl", cache_path="./cache")
    task = ImageGeneration(APIImageGenServing("dall-e-3", size="1024x1024"), num_generations=2)
    task.run(storage.step())               # 2 rows per prompt, each with its own image
    ```
    """

    @property
    def inputs(self) -> list[str]:
        return ["prompt"]

    @property
    def outputs(self) -> list[str]:
        return ["image", "image_path", MODEL_NAME]

    def format_input(self, row: dict) -> str:
        return column_prompt(row["prompt"], self._dataset_column("prompt"))[0]

    def format_output(self, output: dict, row: dict) -> dict:
        images = output["images"]
        return {"image": images[0] if len(images) == 1 else images}


__all__ = ["ImageGeneration", "ImageTask"]
