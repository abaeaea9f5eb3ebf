"""The shapes world end to end, on small models that mean something and run offline:
prompts -> images (shapes-sd) -> captions (shapes-captioner) -> image-prompt scores
(shapes-clip) -> only the images that show their prompt, and a gallery page of them (with
the rows the filter dropped, and why).

    python shapes_world_pipeline.py      # the three shapes models ship with the package (CPU, seconds)
    python shapes_world_pipeline.py --runner ray --replicas 2                   # on Ray

Swap in real models with --sd-model, --caption-model and --clip-model (hub ids or folders).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.gallery import build_gallery
from dataflowmm.operators import (
    ClipScoreEvaluator,
    ClipScoreFilter,
    ImageCaptioner,
    PromptedImageGenerator,
)
from dataflowmm.serving import ClipServing, LocalCaptionServing, LocalImageGenServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "shapes_world" / "prompts.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "shapes_world"  # beside example_data, wherever you run from


class ShapesWorldPipeline:
    def __init__(
        self,
        runner=None,
        sd_model: str = "trained:shapes-sd",
        caption_model: str = "trained:shapes-captioner",
        clip_model: str = "trained:shapes-clip",
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        min_score: float = 0.75,
        save_interval: int = 16,
        seed: int = 0,
    ):
        self.cache_path = Path(cache_path)
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,
        )
        sd = LocalImageGenServing(sd_model, task="text2image", batch_size=8,
                                  num_inference_steps=25, guidance_scale=3.0)
        captioner = LocalCaptionServing(caption_model, batch_size=8,
                                        max_new_tokens=12)
        clip = ClipServing(clip_model, batch_size=32)
        self.generator = PromptedImageGenerator(t2i_serving=sd, save_interval=save_interval, seed=seed)
        self.captioner = ImageCaptioner(captioner, keep_original_sample=False, save_interval=save_interval)
        self.scorer = ClipScoreEvaluator(clip, save_interval=save_interval)
        self.filter = ClipScoreFilter(clip, min_score=min_score, keep_dropped=True, save_interval=save_interval)

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        return [
            self.generator.run(self.storage.step(), input_prompt_key="prompt", output_image_key="images", retry_errors=self.retry_errors),
            self.captioner.run(self.storage.step(), input_image_key="images", output_text_key="caption", retry_errors=self.retry_errors),
            self.scorer.run(self.storage.step(), input_text_key="prompt", output_score_key="clip_score", retry_errors=self.retry_errors),
            self.filter.run(self.storage.step(), input_text_key="prompt", retry_errors=self.retry_errors),
        ]

    def publish(self, summaries) -> dict[str, Path]:
        """A gallery page of the kept rows (images, captions, scores) and the dropped ones."""
        return {"gallery": build_gallery(summaries[-1].output_path, self.cache_path / "gallery.html",
                                         title="shapes world: generated, captioned, scored, filtered")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="accepted for symmetry: the shapes models are the default")
    parser.add_argument("--sd-model", default="trained:shapes-sd", help="text-to-image model")
    parser.add_argument("--caption-model", default="trained:shapes-captioner", help="captioning model")
    parser.add_argument("--clip-model", default="trained:shapes-clip", help="CLIP model")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with a `prompt` per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--min-score", type=float, default=0.75, help="lowest image-prompt CLIP score kept")
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    pipeline = ShapesWorldPipeline(
        runner=runner_from_args(args),
        sd_model=args.sd_model,
        caption_model=args.caption_model,
        clip_model=args.clip_model,
        input_file=args.input,
        cache_path=args.cache_path,
        min_score=args.min_score,
        seed=args.seed,
    )
    pipeline.retry_errors = args.retry_errors
    summaries = pipeline.forward()
    for name, path in pipeline.publish(summaries).items():
        print(f"{name}: {path.resolve()}")
    return summaries


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
