"""ImageCaptioner: new samples whose text is generated captions of the sample's images.

Data-Juicer's `image_captioning_mapper` semantics (parameter names, defaults and output
counts), batched across rows and images, seeded per image, and resumable.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Input, Operator, Output, StepContext, is_transient
from dataflowmm.io.images import ImageReadError, load_image
from dataflowmm.operators.sample_format import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    SpecialTokens,
    captioned_chunk,
    most_similar_by_simhash,
    row_image_paths,
)
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import build_serving
from dataflowmm.serving.vlm_protocol import VLMPrompt

if TYPE_CHECKING:
    from dataflowmm.serving.caption import LocalCaptionServing
    from dataflowmm.serving.vlm_protocol import VLMServing

KEEP_CANDIDATE_MODES = ("random_any", "similar_one_simhash", "all")
# What a VLM serving is asked for each caption when neither `prompt` nor `prompt_key` says.
VLM_CAPTION_PROMPT = "Describe this image in one sentence."


@dataclass
class _RowPlan:
    """What to caption in one row and how the captions go back into its text."""

    images: list[Image.Image]
    references: list[str]  # original text each image's candidates are compared with
    chunks: list[str] | None  # Data-Juicer chunks, None for a plain row
    prompt: str | None
    captions: list[list[str]] = field(default_factory=list)  # per image, its candidates


def load_row_images(paths: list[str], key: str) -> dict[str, Image.Image]:
    """Each distinct path of a row loaded once."""
    loaded: dict[str, Image.Image] = {}
    for path in paths:
        if path not in loaded:
            try:
                loaded[path] = load_image(path)
            except ImageReadError as error:
                raise ValueError(f"key {key!r}: {error}") from None
    return loaded


class ImageCaptioner(Operator):
    """Generate caption samples for the images of every row.

    Output rows per input row with images: the original first when `keep_original_sample`,
    then 1 generated row (`random_any`, `similar_one_simhash`) or `caption_num` rows (`all`).
    Rows without images pass through when originals are kept and produce nothing otherwise.
    A row that cannot be captioned is kept once, unchanged, with its `error` set.

    Args:
        caption_serving: a `LocalCaptionServing`, or a model id/folder to build one from; or a
            VLM serving (`LocalVLMServing`, `APIVLMServing`: a chat VLM, local or behind a
            vLLM/SGLang/OpenAI server), asked `caption_num` times per image (each with its own
            seed) with the row's prompt, else `VLM_CAPTION_PROMPT`. A VLM answer that fails
            fails its row (a transient failure is retried by the step's next run).
        hf_img2seq: model id/folder used when `caption_serving` is not given.
        caption_num: candidate captions generated per image (> 0).
        keep_candidate_mode: `random_any` (one seeded random candidate), `similar_one_simhash`
            (the candidate whose 64-bit SimHash over word bigrams is closest to the original
            text; ties to the first) or `all` (one generated row per candidate).
        keep_original_sample: keep each original row before its generated rows.
        prompt: text prompt conditioning every caption (a VLM serving's instruction).
        prompt_key: row field holding a per-row prompt; wins over `prompt` when both are set.
        batch_size: images per forward pass of the serving built here (default 8), and rows
            per batch. With a serving passed in, its own `batch_size` applies; giving a different
            one is an error.
        save_interval: rows between checkpoints; a killed run resumes from the last one.
        seed: global seed; an image's sampling and `random_any` pick derive from it and the row.
        image_token, eoc_token: Data-Juicer's special tokens in the text field.
        torch_dtype, trust_remote_code: for the serving built here ("auto" and False when not
            given); giving values that differ from a passed serving's is an error.
        strict: raise on the first row that cannot be captioned.
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's list of image paths", images=True),
        Input("text", "input_text_key", "text", "column with the original text (Data-Juicer tokens optional)",
              required=False),
        Output("output", "output_text_key", "text", "column of the generated rows receiving the captions"),
    ]

    def __init__(
        self,
        caption_serving: LocalCaptionServing | VLMServing | str | os.PathLike | None = None,
        *,
        hf_img2seq: str | os.PathLike = "Salesforce/blip2-opt-2.7b",
        caption_num: int = 1,
        keep_candidate_mode: str = "random_any",
        keep_original_sample: bool = True,
        prompt: str | None = None,
        prompt_key: str | None = None,
        batch_size: int | None = None,
        save_interval: int = 50,
        seed: int = 0,
        image_token: str = IMAGE_TOKEN,
        eoc_token: str = EOC_TOKEN,
        torch_dtype: str | None = None,
        trust_remote_code: bool | None = None,
        strict: bool = False,
    ):
        check_positive_int("caption_num", caption_num)
        if keep_candidate_mode not in KEEP_CANDIDATE_MODES:
            raise ValueError(f"keep_candidate_mode must be one of {', '.join(KEEP_CANDIDATE_MODES)}, "
                             f"got {keep_candidate_mode!r}")
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if prompt and prompt_key:
            warnings.warn("both `prompt` and `prompt_key` are set: `prompt_key` is used where the row "
                          "has a string there", stacklevel=3)
        from dataflowmm.serving.caption import LocalCaptionServing

        self.serving = build_serving(
            caption_serving or hf_img2seq, LocalCaptionServing, argument="caption_serving",
            settings={"batch_size": batch_size, "torch_dtype": torch_dtype, "trust_remote_code": trust_remote_code},
            defaults={"caption_num": caption_num},
            methods=("generate", "config") if _is_vlm(caption_serving) else ("caption", "config"))
        self.caption_num = caption_num
        self.keep_candidate_mode = keep_candidate_mode
        self.keep_original_sample = keep_original_sample
        self.prompt = prompt
        self.prompt_key = prompt_key
        self.tokens = SpecialTokens(image_token, eoc_token)

    @property
    def generated_per_row(self) -> int:
        return self.caption_num if self.keep_candidate_mode == "all" else 1

    # -- one row -------------------------------------------------------------------------

    def _row_prompt(self, row: dict) -> str | None:
        if self.prompt_key and isinstance(row.get(self.prompt_key), str):
            return row[self.prompt_key]
        return self.prompt

    def _plan_row(self, row: dict, paths: list[str]) -> _RowPlan:
        text = row.get(self.keys.text)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError(f"key {self.keys.text!r}: text is {type(text).__name__}, expected a string")
        if not self.tokens.has_tokens(text):
            loaded = load_row_images(paths, self.keys.image)
            return _RowPlan([loaded[p] for p in paths], [text] * len(paths), None, self._row_prompt(row))
        chunks = self.tokens.chunks(text)
        wanted = sum(chunk.count(self.tokens.image) for chunk in chunks)
        if wanted > len(paths):
            raise ValueError(f"key {self.keys.text!r}: {wanted} image tokens but key "
                             f"{self.keys.image!r} has {len(paths)} images")
        loaded = load_row_images(paths[:wanted], self.keys.image)
        references = [self.tokens.remove(chunk) for chunk in chunks for _ in range(chunk.count(self.tokens.image))]
        return _RowPlan([loaded[p] for p in paths[:wanted]], references, chunks, self._row_prompt(row))

    def _kept_candidates(self, plan: _RowPlan, image_index: int, row_id: str) -> list[str]:
        """The candidates of one image that survive the keep mode, one per generated row."""
        candidates = plan.captions[image_index]
        if self.keep_candidate_mode == "all" or len(candidates) == 1:  # one candidate: nothing to pick
            return candidates
        if self.keep_candidate_mode == "random_any":
            picker = random.Random(derive_seed(self.settings.seed, row_id, image_index, "random_any"))
            return [picker.choice(candidates)]
        return [candidates[most_similar_by_simhash(plan.references[image_index], candidates)]]

    def _generated_texts(self, plan: _RowPlan, row_id: str) -> list[str]:
        kept = [self._kept_candidates(plan, index, row_id) for index in range(len(plan.images))]
        texts = []
        for k in range(self.generated_per_row):
            captions = [per_image[k] for per_image in kept]
            if plan.chunks is None:
                texts.append(" ".join(captions))
                continue
            parts, offset = [], 0
            for chunk in plan.chunks:
                count = chunk.count(self.tokens.image)
                parts.append(captioned_chunk(chunk, captions[offset:offset + count], self.tokens))
                offset += count
            texts.append(" ".join(parts))
        return texts

    # -- a batch -------------------------------------------------------------------------

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        plans: dict[int, _RowPlan] = {}
        failed: dict[int, str] = {}
        for offset, row in enumerate(rows):
            try:
                paths = row_image_paths(row.get(self.keys.image), self.keys.image)
                if paths:
                    plans[offset] = self._plan_row(row, paths)
            except ValueError as error:
                failed[offset] = str(error)

        transient = set()
        for offset, answer in self._caption(plans, row_ids).items():
            failed[offset] = str(answer)
            if is_transient(answer):
                transient.add(offset)

        out_rows = []
        for offset, row in enumerate(rows):
            if offset in failed:
                out_rows.append(self.row_failed(row, failed[offset], offset, transient=offset in transient))
                continue
            if self.keep_original_sample:
                out_rows.append(row)
            if offset in plans:
                out_rows.extend({**row, self.keys.output: text}
                                for text in self._generated_texts(plans[offset], row_ids[offset]))
        return out_rows

    def _caption(self, plans: dict[int, _RowPlan], row_ids: list[str]) -> dict[int, Exception]:
        """One serving call for every image of every row in the batch; returns the rows whose
        captions failed (a VLM serving's answer), with the first failure of each."""
        jobs = [(offset, index) for offset, plan in plans.items() for index in range(len(plan.images))]
        if not jobs:
            return {}
        seeds = [derive_seed(self.settings.seed, row_ids[offset], index) for offset, index in jobs]
        if _is_vlm(self.serving):
            return self._caption_with_vlm(plans, jobs, seeds)
        captions = self.serving.caption(
            [plans[offset].images[index] for offset, index in jobs],
            prompts=[plans[offset].prompt for offset, _ in jobs],
            seeds=seeds,
            caption_num=self.caption_num,
        )
        for (offset, _), candidates in zip(jobs, captions, strict=True):
            plans[offset].captions.append(candidates)
        return {}

    def _caption_with_vlm(self, plans: dict[int, _RowPlan], jobs: list[tuple[int, int]],
                          seeds: list[int]) -> dict[int, Exception]:
        """`caption_num` prompts per image (candidate k > 0 seeded apart), one serving call."""
        prompts = [VLMPrompt((plans[offset].images[index],), plans[offset].prompt or VLM_CAPTION_PROMPT)
                   for offset, index in jobs for _ in range(self.caption_num)]
        candidate_seeds = [seed if k == 0 else derive_seed(seed, "candidate", k)
                           for seed in seeds for k in range(self.caption_num)]
        answers = self.serving.generate(prompts, candidate_seeds)
        failures: dict[int, Exception] = {}
        for position, (offset, _) in enumerate(jobs):
            candidates = answers[position * self.caption_num:(position + 1) * self.caption_num]
            failure = next((answer for answer in candidates if isinstance(answer, BaseException)), None)
            if failure is not None:
                failures.setdefault(offset, failure)
            plans[offset].captions.append(candidates)
        return failures


def _is_vlm(serving: object) -> bool:
    """A VLM serving (prompts in, texts out) rather than a captioning one."""
    return callable(getattr(serving, "generate", None)) and not callable(getattr(serving, "caption", None))
