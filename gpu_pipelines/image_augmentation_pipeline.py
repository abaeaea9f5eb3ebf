"""Caption, then augment: two storage steps chained (Data-Juicer image_captioning_mapper,
then image_diffusion_mapper driven by those captions).

Step 1 writes one caption row per input row with images (field "caption");
step 2 reads step 1's file and adds `aug_num` img2img variations of every row.

    python image_augmentation_pipeline.py --tiny                        # offline, tiny random models
    python image_augmentation_pipeline.py --diffusion-model CompVis/stable-diffusion-v1-4 \\
        --caption-model Salesforce/blip2-opt-2.7b --aug-num 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter
from dataflowmm.serving import LocalCaptionServing, LocalImageGenServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "image_captioning" / "images.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "image_augmentation"  # beside example_data, wherever you run from


class ImageAugmentationPipeline:
    def __init__(
        self,
        runner=None,
        diffusion_model: str = "CompVis/stable-diffusion-v1-4",
        caption_model: str = "Salesforce/blip2-opt-2.7b",
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        aug_num: int = 2,
        strength: float = 0.8,
        num_inference_steps: int | None = None,
        image_size: int | None = 512,
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
        self.caption_serving = LocalCaptionServing(caption_model, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size)
        self.diffusion_serving = LocalImageGenServing(diffusion_model, task="image2image", batch_size=batch_size,
                                                      strength=strength, num_inference_steps=num_inference_steps)
        self.captioner = ImageCaptioner(self.caption_serving, keep_original_sample=False,
                                        batch_size=batch_size, save_interval=save_interval, seed=seed)
        self.augmenter = ImageDiffusionAugmenter(self.diffusion_serving, aug_num=aug_num, caption_key="caption",
                                                 keep_original_sample=True, image_size=image_size,
                                                 batch_size=batch_size, save_interval=save_interval, seed=seed)

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        captions = self.captioner.run(
            storage=self.storage.step(),
            input_image_key="images",
            input_text_key="text",
            output_text_key="caption", retry_errors=self.retry_errors,
        )
        augmented = self.augmenter.run(storage=self.storage.step(), input_image_key="images", retry_errors=self.retry_errors)
        return [captions, augmented]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight SD and BLIP-2 (offline, CPU)")
    parser.add_argument("--diffusion-model", default="CompVis/stable-diffusion-v1-4")
    parser.add_argument("--caption-model", default="Salesforce/blip2-opt-2.7b")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with an images list per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--aug-num", type=int, default=2)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (model default if unset)")
    parser.add_argument("--image-size", type=int, default=512, help="working canvas for img2img")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    diffusion, captioner, steps, size, tokens = args.diffusion_model, args.caption_model, args.steps, args.image_size, 32
    if args.tiny:
        diffusion, captioner = "tiny:tiny-sd", "tiny:tiny-blip2"
        steps, size, tokens = steps or 4, 32, 8
    pipeline = ImageAugmentationPipeline(
        runner=runner_from_args(args),
        diffusion_model=diffusion,
        caption_model=captioner,
        input_file=args.input,
        cache_path=args.cache_path,
        aug_num=args.aug_num,
        strength=args.strength,
        num_inference_steps=steps,
        image_size=size,
        batch_size=args.batch_size,
        max_new_tokens=tokens,
        save_interval=args.save_interval,
        seed=args.seed,
    )
    pipeline.retry_errors = args.retry_errors
    return pipeline.forward()


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
