"""Your own image task: subjects and styles in, illustrations out; then a Hugging Face
dataset and a gallery page to look at.

    python image_generation_task_pipeline.py --tiny                       # offline, tiny random model
    python image_generation_task_pipeline.py --model black-forest-labs/FLUX.1-schnell
    python image_generation_task_pipeline.py --api-model dall-e-3         # OPENAI_API_KEY in the environment
    python image_generation_task_pipeline.py --api-model flux --api-base-url http://localhost:8000/v1
    python image_generation_task_pipeline.py --tiny --runner ray           # on Ray

Copy `IllustrationTask` and change `inputs`, `outputs`, `format_input` and `format_output`:
the framework does batching, `num_generations` (each with its own seed), errors kept per
row, checkpoints every `save_interval` rows and the cached step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.gallery import build_gallery
from dataflowmm.operators import ImageTask

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "image_generation_task" / "subjects.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "image_generation_task"  # beside example_data, wherever you run from


class IllustrationTask(ImageTask):
    """An illustration of `subject` in `style` (a default style when the row has none)."""

    def __init__(self, *args, default_style: str = "children's book illustration", **kwargs):
        self.default_style = default_style  # public attributes are part of the step's fingerprint
        super().__init__(*args, **kwargs)

    @property
    def inputs(self):
        return {"subject": True, "style": False}  # column -> required

    @property
    def outputs(self):
        # `image` gets the image (its file path, or base64 with images_in_rows=True),
        # `image_path` the file's path; `model_name` is added by the framework.
        return ["image", "image_path", "illustration_prompt"]

    def format_input(self, row: dict) -> str:
        if not row["subject"].strip():
            raise ValueError("empty subject")  # this row is kept with the error
        return f"{row['subject']}, {row.get('style') or self.default_style}, detailed, soft light"

    def format_output(self, output: dict, row: dict) -> dict:
        return {"image": output["images"][0], "illustration_prompt": self.format_input(row)}


class ImageGenerationTaskPipeline:
    def __init__(
        self,
        serving,
        runner=None,
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        save_interval: int = 10,
        num_generations: int = 2,
        seed: int = 0,
        images_in_rows: bool = False,
    ):
        self.cache_path = Path(cache_path)
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,
        )
        self.task = IllustrationTask(serving, num_generations=num_generations, save_interval=save_interval,
                                     seed=seed, images_in_rows=images_in_rows)

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        return self.task.run(storage=self.storage.step(), retry_errors=self.retry_errors)

    def publish(self, summary) -> dict[str, Path]:
        """A gallery page to look at and, when `datasets` is installed, a dataset for a trainer."""
        outputs = {"gallery": build_gallery(summary.output_path, self.cache_path / "gallery.html")}
        try:
            from dataflowmm.export import export_step

            outputs["dataset"] = export_step(summary.output_path, "hf", self.cache_path / "hf_dataset").path
        except ImportError:  # pip install 'dataflowmm[hf]'
            pass
        return outputs


def build_serving(args: argparse.Namespace):
    if args.api_model:
        from dataflowmm.serving import APIImageGenServing

        return APIImageGenServing(args.api_model, base_url=args.api_base_url, size=args.api_size,
                                  max_concurrency=args.max_concurrency)
    from dataflowmm.serving import LocalImageGenServing

    model, steps, size = args.model, args.steps, args.size
    if args.tiny:
        model, steps, size = "tiny:tiny-sd", steps or 4, size or 32
    return LocalImageGenServing(model, batch_size=args.batch_size, num_inference_steps=steps,
                                height=size, width=size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight SD model (offline, CPU)")
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-schnell", help="diffusers hub id or folder")
    parser.add_argument("--api-model", default=None, help="use an OpenAI-compatible images API with this model")
    parser.add_argument("--api-base-url", default=None, help="API root of a compatible server, e.g. http://host:8000/v1")
    parser.add_argument("--api-size", default=None, help="image size the API should draw, e.g. 1024x1024")
    parser.add_argument("--max-concurrency", type=int, default=8, help="API requests in flight at once")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with subject (and style) columns")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--save-interval", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-in-rows", action="store_true", help="base64 images in the rows instead of files")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (model default if unset)")
    parser.add_argument("--size", type=int, default=None, help="height and width in pixels (model default if unset)")
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    pipeline = ImageGenerationTaskPipeline(
        build_serving(args),
        runner=runner_from_args(args),
        input_file=args.input,
        cache_path=args.cache_path,
        save_interval=args.save_interval,
        num_generations=args.num_generations,
        seed=args.seed,
        images_in_rows=args.images_in_rows,
    )
    pipeline.retry_errors = args.retry_errors
    summary = pipeline.forward()
    for name, path in pipeline.publish(summary).items():
        print(f"{name}: {path.resolve()}")
    return summary


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
