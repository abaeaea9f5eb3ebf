"""Instruction-editing data that checks itself: source images -> edit instructions -> edited
images -> verified edits -> difference captions of the kept pairs -> edit triples to train on.

    python image_editing_pipeline.py --tiny     # offline: shapes-world sources, "make the circle red" by shapes-sd
    python image_editing_pipeline.py --model timbrooks/instruct-pix2pix --input my_sources.jsonl \\
        --vlm-base-url http://localhost:8000/v1 --vlm-model Qwen/Qwen2.5-VL-7B-Instruct     # GPU + hub

Steps: 1 EditInstructionGenerator (templates over the row's columns, or a VLM server that
looks at the image) writes `instruction`, `source_caption`, `target_caption`; 2
PromptedImageEditGenerator edits `images` by the instruction (InstructPix2Pix, FLUX Kontext,
Qwen-Image-Edit; an image-to-image model such as shapes-sd takes the target caption
instead); 3 EditTriples gives one row per edit (`source_image`, `instruction`,
`edited_image`); 4 EditVerifier keeps edits that changed something but not everything, in
the instructed direction (CLIP), dropped ones kept aside with the reason; 5
ImageDifferenceRegions boxes what changed; 6 DifferenceCaptioner describes it. The last
step's rows are the edit triples; they are exported as a Hugging Face dataset
(`edit_triples_hf/`) and as LLaVA JSON asking what edit turns one image into the other
(`llava/edits.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args

# The shapes world's edit over the example rows' columns: "make the {shape} {target_colour}".
from dataflowmm.kit.shapes_edits import (
    INSTRUCTION_TEMPLATE,
    SOURCE_CAPTION_TEMPLATE,
    TARGET_CAPTION_TEMPLATE,
)
from dataflowmm.operators import (
    DifferenceCaptioner,
    EditInstructionGenerator,
    EditTriples,
    EditVerifier,
    ImageDifferenceRegions,
    PromptedImageEditGenerator,
)
from dataflowmm.serving import ClipServing, ImageTextMatchingServing, LocalVLMServing

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "image_editing" / "sources.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "image_editing"  # beside example_data, wherever you run from
LLAVA_PROMPT = "What edit turns the first image into the second?"


class ImageEditingPipeline:
    def __init__(
        self,
        edit_model: str = "timbrooks/instruct-pix2pix",
        clip_model: str = "openai/clip-vit-large-patch14",
        vlm=None,
        itm_model: str = "Salesforce/blip-itm-base-coco",
        runner=None,
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        instruction_vlm=None,
        image2image: bool = False,
        edit_settings: dict | None = None,
        verifier_settings: dict | None = None,
        caption_settings: dict | None = None,
        batch_size: int = 8,
        save_interval: int = 64,
        seed: int = 0,
    ):
        self.cache_path = Path(cache_path)
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,  # None: this process; RayRunner(...): a Ray cluster
        )
        if instruction_vlm is not None:
            self.instructions = EditInstructionGenerator(instruction_vlm, save_interval=save_interval, seed=seed)
        else:
            self.instructions = EditInstructionGenerator(
                instruction_template=INSTRUCTION_TEMPLATE, source_caption_template=SOURCE_CAPTION_TEMPLATE,
                target_caption_template=TARGET_CAPTION_TEMPLATE, save_interval=save_interval)
        self.image2image = image2image
        self.editor = PromptedImageEditGenerator(
            edit_model, task="image2image" if image2image else "edit", batch_size=batch_size,
            save_interval=save_interval, seed=seed, **(edit_settings or {}))
        self.triples = EditTriples()
        clip = ClipServing(clip_model)
        self.verifier = EditVerifier(clip, save_interval=save_interval, **(verifier_settings or {}))
        self.regions = ImageDifferenceRegions(save_interval=save_interval)
        self.captioner = DifferenceCaptioner(
            vlm_serving=vlm, itm_serving=ImageTextMatchingServing(itm_model), clip_serving=clip,
            save_interval=save_interval, seed=seed, **(caption_settings or {}))

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        pair = {"input_image1_key": "source_image", "input_image2_key": "edited_image"}
        return [
            self.instructions.run(self.storage.step(), input_image_key="images", retry_errors=self.retry_errors),
            self.editor.run(self.storage.step(), input_image_key="images",
                            input_prompt_key="target_caption" if self.image2image else "instruction",
                            output_image_key="edited_images", retry_errors=self.retry_errors),
            self.triples.run(self.storage.step(), input_image_key="images", input_edited_image_key="edited_images",
                             retry_errors=self.retry_errors),
            self.verifier.run(self.storage.step(), input_source_image_key="source_image",
                              input_edited_image_key="edited_image", retry_errors=self.retry_errors),
            self.regions.run(self.storage.step(), output_bbox_key="bbox_tag", retry_errors=self.retry_errors, **pair),
            self.captioner.run(self.storage.step(), input_bbox_key="bbox_tag", retry_errors=self.retry_errors, **pair),
        ]

    def publish(self, summaries) -> dict[str, Path]:
        """The edit triples as a Hugging Face dataset and as LLaVA JSON (when `datasets` is installed)."""
        from dataflowmm.export import export_step

        last = summaries[-1].output_path
        triples = ["source_image", "edited_image"]
        outputs = {"llava": export_step(last, "llava", self.cache_path / "llava" / "edits.json", triples,
                                        text_column="instruction", prompt=LLAVA_PROMPT).path}
        with contextlib.suppress(ImportError):  # pip install 'dataflowmm[hf]'
            outputs["dataset"] = export_step(last, "hf", self.cache_path / "edit_triples_hf", triples).path
        return outputs


@contextlib.contextmanager
def vlm_servings(args: argparse.Namespace) -> Iterator[tuple]:
    """(difference-caption VLM, instruction VLM or None); with --tiny a loopback chat server that
    reads shapes-world pixels answers both while the pipeline runs."""
    if args.tiny:
        from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI
        from dataflowmm.serving import APIVLMServing

        with LoopbackChatAPI() as server:
            vlm = APIVLMServing("loopback-vlm", base_url=server.base_url, api_key=server.api_key, batch_size=64)
            yield vlm, None
        return
    if args.vlm_base_url:
        from dataflowmm.serving import APIVLMServing

        key = os.environ.get(args.api_key_env) or "none"  # self-hosted servers often take no key
        vlm = APIVLMServing(args.vlm_model, base_url=args.vlm_base_url, api_key=key, max_tokens=args.max_new_tokens)
        yield vlm, vlm
        return
    yield LocalVLMServing(args.caption_vlm, max_new_tokens=args.max_new_tokens, batch_size=2 * args.batch_size), None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="offline: shapes-sd edits by target caption, shapes-clip verifies, a loopback chat "
                             "server captions differences")
    parser.add_argument("--model", default="timbrooks/instruct-pix2pix",
                        help="editing model: InstructPix2Pix, black-forest-labs/FLUX.1-Kontext-dev, Qwen/Qwen-Image-Edit")
    parser.add_argument("--image2image", action="store_true",
                        help="--model is a plain image-to-image model: edit by the target caption")
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="CLIP of the verifier")
    parser.add_argument("--vlm-base-url", default=None,
                        help="an OpenAI-compatible VLM server proposing the instructions and captioning differences")
    parser.add_argument("--vlm-model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="the model --vlm-base-url serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding its key")
    parser.add_argument("--caption-vlm", default="llava-hf/llava-v1.6-vicuna-7b-hf",
                        help="local VLM captioning differences when no server is given (instructions then come "
                             "from the templates over the rows' shape/colour columns)")
    parser.add_argument("--itm-model", default="Salesforce/blip-itm-base-coco")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with `images` per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="edits per source image")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="edits per model call")
    parser.add_argument("--save-interval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    models = {"edit_model": args.model, "clip_model": args.clip_model, "itm_model": args.itm_model}
    edit_settings = {"num_images_per_prompt": args.num_images_per_prompt}
    verifier_settings, caption_settings, image2image = {}, {}, args.image2image
    if args.tiny:
        # shapes-sd has no instruction pipeline: it edits by the target caption, at the strength
        # the README's verifier figures were measured at; shapes-clip's own score scale (a right
        # edit scores >= 0.8 against its target caption) sets min_target_score.
        models = {"edit_model": "trained:shapes-sd", "clip_model": "trained:shapes-clip",
                  "itm_model": "tiny:tiny-blip-itm"}
        edit_settings.update(strength=0.65, num_inference_steps=25, guidance_scale=3.0)
        verifier_settings = {"min_target_score": 0.8}
        # 32-pixel shapes fill much of the image, and the random ITM model's scores mean nothing.
        caption_settings = {"max_area_ratio": 1.0,
                            "image_text_matching_filter_args": {"min_score": 0.0, "max_score": 1.0},
                            "text_pair_similarity_filter_args": {"min_score": -1.0, "max_score": 0.99}}
        image2image = True
    with vlm_servings(args) as (vlm, instruction_vlm):
        pipeline = ImageEditingPipeline(
            **models, vlm=vlm, runner=runner_from_args(args), input_file=args.input, cache_path=args.cache_path,
            instruction_vlm=instruction_vlm, image2image=image2image, edit_settings=edit_settings,
            verifier_settings=verifier_settings, caption_settings=caption_settings, batch_size=args.batch_size,
            save_interval=args.save_interval, seed=args.seed)
        pipeline.retry_errors = args.retry_errors
        summaries = pipeline.forward()
    for name, path in pipeline.publish(summaries).items():
        print(f"{name}: {path.resolve()}")
    return summaries


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
