"""Image captioning: rows with images in, caption samples out (Data-Juicer image_captioning_mapper).

    python image_captioning_pipeline.py --tiny                          # offline, tiny random BLIP-2
    python image_captioning_pipeline.py --model Salesforce/blip2-opt-2.7b --caption-num 4 --keep-candidate-mode all
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.operators import ImageCaptioner
from dataflowmm.serving import LocalCaptionServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "image_captioning" / "images.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "image_captioning"  # beside example_data, wherever you run from


class ImageCaptioningPipeline:
    def __init__(
        self,
        runner=None,
        model: str = "Salesforce/blip2-opt-2.7b",
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        caption_num: int = 1,
        keep_candidate_mode: str = "random_any",
        keep_original_sample: bool = True,
        prompt: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        save_interval: int = 10,
        seed: int = 0,
    ):
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,  # None: this process; RayRunner(...): a Ray cluster
        )
        self.serving = LocalCaptionServing(model, caption_num=caption_num, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
        self.captioner = ImageCaptioner(
            self.serving,
            caption_num=caption_num,
            keep_candidate_mode=keep_candidate_mode,
            keep_original_sample=keep_original_sample,
            prompt=prompt,
            batch_size=batch_size,
            save_interval=save_interval,
            seed=seed,
        )

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        return self.captioner.run(
            storage=self.storage.step(),
            input_image_key="images",
            input_text_key="text",
            output_text_key="text", retry_errors=self.retry_errors,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight BLIP-2 (offline, CPU)")
    parser.add_argument("--model", default="Salesforce/blip2-opt-2.7b", help="hub id or local folder")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with an images list per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--caption-num", type=int, default=1)
    parser.add_argument("--keep-candidate-mode", default="random_any",
                        choices=["random_any", "similar_one_simhash", "all"])
    parser.add_argument("--drop-original", action="store_true", help="keep only the generated rows")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--save-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    model, max_new_tokens = args.model, args.max_new_tokens
    if args.tiny:
        model, max_new_tokens = "tiny:tiny-blip2", min(max_new_tokens, 8)
    pipeline = ImageCaptioningPipeline(
        runner=runner_from_args(args),
        model=model,
        input_file=args.input,
        cache_path=args.cache_path,
        caption_num=args.caption_num,
        keep_candidate_mode=args.keep_candidate_mode,
        keep_original_sample=not args.drop_original,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        save_interval=args.save_interval,
        seed=args.seed,
    )
    pipeline.retry_errors = args.retry_errors
    return pipeline.forward()


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
