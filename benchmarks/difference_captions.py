"""DifferenceCaptioner through FileStorage vs Data-Juicer's per-box, per-image call pattern and a
plain batched loop.

All three read the same pairs, ask the same tiny VLM (same prompts, seeds, max_new_tokens),
score with the same tiny BLIP ITM and CLIP, keep every box (open score ranges, so all do the
whole work) and write one row per pair. Data-Juicer's pattern: per box, one VLM call per image,
one ITM call per crop, one CLIP call, one VLM call for the difference. The plain loop batches
every region of `--batch-size` pairs per model call, with no storage. Prints a table and ends
with `ratio_vs_per_box_loop=<x>` and `ratio_vs_plain_loop=<x>` (ours / baseline, pairs per second).

    .venv/bin/python benchmarks/difference_captions.py [--pairs 16] [--boxes 4] [--batch-size 8] [--rounds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.io.images import save_png  # noqa: E402
from dataflowmm.kit.difference_pairs import difference_pair  # noqa: E402
from dataflowmm.models.tiny import tiny_model_path  # noqa: E402
from dataflowmm.operators import DifferenceCaptioner  # noqa: E402
from dataflowmm.operators.boxes import clamped_corners  # noqa: E402
from dataflowmm.operators.difference_captioner import DIFFERENCE_PROMPT, marked_pair, region_prompt  # noqa: E402
from dataflowmm.operators.image_difference_regions import load_pair  # noqa: E402
from dataflowmm.serving import ClipServing, ImageTextMatchingServing, LocalVLMServing, VLMPrompt  # noqa: E402

OPEN_ITM, OPEN_SIMILARITY = {"min_score": 0.0, "max_score": 1.0}, {"min_score": -1.0, "max_score": 1.0}


def make_rows(folder: Path, pairs: int, boxes: int) -> list[dict]:
    """`pairs` generated pairs, each with `boxes` boxes on a diagonal of 24 px squares."""
    rows = []
    for index in range(pairs):
        pair = difference_pair(index, "recolour")
        paths = [save_png(image, folder / f"pair_{index}_{side}.png") for side, image in
                 (("a", pair.first), ("b", pair.second))]
        row_boxes = [[16.0 + 32 * (k % 4), 16.0 + 32 * ((k + index) % 4), 24.0, 24.0] for k in range(boxes)]
        rows.append({"image_path1": str(paths[0]), "image_path2": str(paths[1]), "bbox_tag": row_boxes})
    return rows


class Regions:
    """The work list of a plain loop: (pair images, row, box index, box)."""

    def __init__(self, rows: list[dict]):
        self.items = []
        for row in rows:
            first, second = load_pair(row, "image_path1", "image_path2")
            self.items += [(first, second, box) for box in row["bbox_tag"]]


def loop(rows: list[dict], vlm, itm, clip, per_box: bool, batch_rows: int, out: Path) -> None:
    """Describe, match, compare and explain every box; per box and per image when `per_box`."""
    def ask(prompts):  # one generate per prompt (Data-Juicer) or all at once
        return [a for p in prompts for a in vlm.generate([p])] if per_box else vlm.generate(prompts)

    def score(images, texts):
        return [s for i, t in zip(images, texts, strict=True) for s in itm.score([i], [t])] if per_box else itm.score(images, texts)

    def similar(a, b):
        return [float(s) for x, y in zip(a, b, strict=True) for s in clip.text_text_similarity([x], [y])] if per_box \
            else [float(s) for s in clip.text_text_similarity(a, b)]

    lines = []
    for start in range(0, len(rows), batch_rows):
        batch = rows[start:start + batch_rows]
        items = Regions(batch).items
        captions = ask([VLMPrompt((image,), region_prompt(box, first.size))
                        for first, second, box in items for image in (first, second)])
        crops = [image.crop(clamped_corners(box, first.size)) for first, second, box in items
                 for image in (first, second)]
        scores = score(crops, captions)
        similarities = similar(captions[0::2], captions[1::2])
        differences = ask([VLMPrompt((marked_pair(first, second, box),),
                                     DIFFERENCE_PROMPT.format(caption1=captions[2 * k], caption2=captions[2 * k + 1]))
                           for k, (first, second, box) in enumerate(items)])
        per_row = len(items) // len(batch)
        for r, row in enumerate(batch):
            span = slice(r * per_row, (r + 1) * per_row)
            lines.append(json.dumps({**row, "region_caption1": captions[0::2][span], "scores": scores[2 * r * per_row:],
                                     "similarities": similarities[span], "differences": differences[span]}))
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--boxes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); tiny models are latency-bound, and on a "
                             "busy machine extra threads only fight each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-"))
    rows = make_rows(work / "images", args.pairs, args.boxes)
    entry = work / "rows.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts_per_call = 2 * args.boxes * args.batch_size
    vlm = LocalVLMServing(tiny_model_path("tiny-llava-next"), max_new_tokens=args.max_new_tokens,
                          batch_size=prompts_per_call)
    itm = ImageTextMatchingServing(tiny_model_path("tiny-blip-itm"), batch_size=prompts_per_call)
    clip = ClipServing(tiny_model_path("tiny-clip"), batch_size=prompts_per_call)
    for serving in (vlm, itm, clip):
        serving.load()
    runs = {"count": 0}

    def ours() -> None:
        runs["count"] += 1
        cache = work / f"ours{runs['count']}"
        op = DifferenceCaptioner(image_text_matching_filter_args=OPEN_ITM,
                                 text_pair_similarity_filter_args=OPEN_SIMILARITY, vlm_serving=vlm, itm_serving=itm,
                                 clip_serving=clip, input_batch_size=args.batch_size)
        op.run(FileStorage(entry, cache_path=cache).step())
        shutil.rmtree(cache)

    contenders = {
        "ours": ours,
        "per_box": lambda: loop(rows, vlm, itm, clip, True, args.batch_size, work / "per_box.jsonl"),
        "plain": lambda: loop(rows, vlm, itm, clip, False, args.batch_size, work / "plain.jsonl"),
    }
    for run in contenders.values():
        run()  # warm-up
    print(f"difference captions: tiny-llava-next + tiny-blip-itm + tiny-clip, {args.pairs} pairs x "
          f"{args.boxes} boxes, batch {args.batch_size} pairs, {args.max_new_tokens} new tokens, "
          f"{args.rounds} alternating rounds, torch threads {torch.get_num_threads()}")
    seconds = alternate_rounds(contenders, args.rounds)
    shutil.rmtree(work, ignore_errors=True)
    ratio_table(seconds, args.pairs, "ours", ["per_box", "plain"])


if __name__ == "__main__":
    main()
