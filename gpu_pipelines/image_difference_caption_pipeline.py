"""Image-difference captions: pairs in, boxes around what changed and a caption of each difference out.

Two steps: `ImageDifferenceRegions` proposes boxes from pixel differences (no model), then
`DifferenceCaptioner` (Data-Juicer's imgdiff_difference_caption_generator_mapper) describes each
region in both images with a VLM, keeps boxes whose crops match their captions (BLIP ITM) and
whose captions differ (CLIP), and asks the VLM what differs inside the red boxes.

    python image_difference_caption_pipeline.py --tiny     # offline, tiny random models (gibberish text)
    python image_difference_caption_pipeline.py            # llava-v1.6-vicuna-7b, BLIP ITM, CLIP (GPU + hub)
    python image_difference_caption_pipeline.py --boxes-from-input   # rows already carry `bbox_tag`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.operators import DifferenceCaptioner, ImageDifferenceRegions
from dataflowmm.serving import ClipServing, ImageTextMatchingServing, LocalVLMServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "image_difference" / "pairs.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "image_difference"  # beside example_data, wherever you run from


class ImageDifferenceCaptionPipeline:
    def __init__(
        self,
        runner=None,
        vlm_model: str = "llava-hf/llava-v1.6-vicuna-7b-hf",
        itm_model: str = "Salesforce/blip-itm-base-coco",
        clip_model: str = "openai/clip-vit-base-patch32",
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        boxes_from_input: bool = False,
        itm_range: tuple[float, float] = (0.1, 1.0),
        similarity_range: tuple[float, float] = (0.1, 0.8),
        max_new_tokens: int = 256,
        batch_size: int = 8,
        save_marked_pairs: bool = True,
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
        self.regions = None if boxes_from_input else ImageDifferenceRegions(save_interval=save_interval)
        self.captioner = DifferenceCaptioner(
            image_text_matching_filter_args={"min_score": itm_range[0], "max_score": itm_range[1]},
            text_pair_similarity_filter_args={"min_score": similarity_range[0], "max_score": similarity_range[1]},
            vlm_serving=LocalVLMServing(vlm_model, max_new_tokens=max_new_tokens, batch_size=2 * batch_size),
            itm_serving=ImageTextMatchingServing(itm_model),
            clip_serving=ClipServing(clip_model),
            input_batch_size=batch_size,
            save_marked_pairs=save_marked_pairs,
            save_interval=save_interval,
            seed=seed,
        )

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        summaries = []
        if self.regions is not None:
            summaries.append(self.regions.run(storage=self.storage.step(), input_image1_key="image_path1",
                                              input_image2_key="image_path2", output_bbox_key="bbox_tag", retry_errors=self.retry_errors))
        summaries.append(self.captioner.run(storage=self.storage.step(), input_image1_key="image_path1",
                                            input_image2_key="image_path2", input_bbox_key="bbox_tag", retry_errors=self.retry_errors))
        return summaries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random-weight LLaVA-NeXT, BLIP ITM and CLIP (offline, CPU); their scores are "
                             "meaningless, so the score ranges are opened to keep every box")
    parser.add_argument("--vlm-model", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--itm-model", default="Salesforce/blip-itm-base-coco")
    parser.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with image_path1 and image_path2 per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--boxes-from-input", action="store_true",
                        help="skip ImageDifferenceRegions: rows already have bbox_tag ([[cx, cy, w, h], ...])")
    parser.add_argument("--itm-range", type=float, nargs=2, default=(0.1, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--similarity-range", type=float, nargs=2, default=(0.1, 0.8), metavar=("MIN", "MAX"))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch")
    parser.add_argument("--no-marked-pairs", action="store_true", help="do not keep the red-box images")
    parser.add_argument("--save-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    models = (args.vlm_model, args.itm_model, args.clip_model)
    itm_range, similarity_range, max_new_tokens = args.itm_range, args.similarity_range, args.max_new_tokens
    if args.tiny:
        models = ("tiny:tiny-llava-next", "tiny:tiny-blip-itm", "tiny:tiny-clip")
        itm_range, similarity_range, max_new_tokens = (0.0, 1.0), (-1.0, 1.0), min(max_new_tokens, 8)
    pipeline = ImageDifferenceCaptionPipeline(
        runner=runner_from_args(args),
        vlm_model=models[0],
        itm_model=models[1],
        clip_model=models[2],
        input_file=args.input,
        cache_path=args.cache_path,
        boxes_from_input=args.boxes_from_input,
        itm_range=tuple(itm_range),
        similarity_range=tuple(similarity_range),
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size,
        save_marked_pairs=not args.no_marked_pairs,
        save_interval=args.save_interval,
        seed=args.seed,
    )
    pipeline.retry_errors = args.retry_errors
    return pipeline.forward()


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
