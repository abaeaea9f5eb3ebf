"""Text-to-image generation: a jsonl of prompts in, a dataset of generated images out.

    python text_to_image_generation_pipeline.py --tiny                  # offline, tiny random model
    python text_to_image_generation_pipeline.py --model black-forest-labs/FLUX.1-dev
    python text_to_image_generation_pipeline.py --tiny --runner ray --replicas 2   # on Ray
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.operators import PromptedImageGenerator
from dataflowmm.serving import LocalImageGenServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "text_to_image" / "prompts.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "text_to_image"  # beside example_data, wherever you run from


class TextToImagePipeline:
    def __init__(
        self,
        runner=None,
        model: str = "black-forest-labs/FLUX.1-dev",
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        save_interval: int = 4,
        batch_size: int = 4,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        torch_dtype: str = "auto",
    ):
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,  # None: this process; RayRunner(...): a Ray cluster
        )
        self.serving = LocalImageGenServing(
            model,
            task="text2image",
            batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            torch_dtype=torch_dtype,
        )
        self.generator = PromptedImageGenerator(t2i_serving=self.serving, save_interval=save_interval, seed=seed)

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        return self.generator.run(
            storage=self.storage.step(),
            input_conversation_key="conversations",
            output_image_key="images", retry_errors=self.retry_errors,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight SD model (offline, CPU)")
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="hub id or local folder")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl of conversations")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--save-interval", type=int, default=4,
                        help="rows per checkpointed chunk (the resume unit; rounded up to whole batches)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images-per-prompt", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (model default if unset)")
    parser.add_argument("--size", type=int, default=None, help="height and width in pixels (model default if unset)")
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    model, steps, size = args.model, args.steps, args.size
    if args.tiny:
        model, steps, size = "tiny:tiny-sd", steps or 4, size or 32
    pipeline = TextToImagePipeline(
        runner=runner_from_args(args),
        model=model,
        input_file=args.input,
        cache_path=args.cache_path,
        save_interval=args.save_interval,
        batch_size=args.batch_size,
        seed=args.seed,
        num_images_per_prompt=args.num_images_per_prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
    )
    pipeline.retry_errors = args.retry_errors
    return pipeline.forward()


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
