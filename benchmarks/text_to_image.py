"""PromptedImageGenerator through FileStorage vs a plain diffusers loop.

Same tiny model, prompts, settings and batch size; both write one PNG per image.
Prints a table and, last, `ratio_vs_plain_loop=<ours/plain images per second>`.

    .venv/bin/python benchmarks/text_to_image.py [--prompts 32] [--batch-size 8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.models.tiny import tiny_model_path  # noqa: E402
from dataflowmm.operators import PromptedImageGenerator  # noqa: E402
from dataflowmm.serving import LocalImageGenServing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    model = str(tiny_model_path("tiny-sd"))
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-"))
    prompts = [f"a photo of object number {i} on a table" for i in range(args.prompts)]
    entry = work / "prompts.jsonl"
    entry.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": p}]}) + "\n"
                             for p in prompts))
    settings = dict(num_inference_steps=args.steps, height=args.size, width=args.size)

    serving = LocalImageGenServing(model, batch_size=args.batch_size, **settings)
    serving.load()
    plain = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    runs = {"ours": 0, "plain": 0}

    def ours() -> None:
        runs["ours"] += 1
        cache = work / f"ours{runs['ours']}"
        PromptedImageGenerator(serving, save_interval=args.batch_size * 2).run(
            FileStorage(entry, cache_path=cache).step())
        shutil.rmtree(cache)

    def plain_loop() -> None:
        runs["plain"] += 1
        out = work / f"plain{runs['plain']}"
        out.mkdir()
        with torch.inference_mode():
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start:start + args.batch_size]
                images = plain(batch, generator=torch.Generator().manual_seed(start), **settings).images
                for offset, image in enumerate(images):
                    image.save(out / f"{start + offset}.png")
        shutil.rmtree(out)

    ours(), plain_loop()  # warm-up: first calls pay one-off costs
    print(f"text-to-image: tiny-sd, {args.prompts} prompts, batch {args.batch_size}, "
          f"{args.steps} steps, {args.size}px, {args.rounds} alternating rounds, "
          f"torch threads {torch.get_num_threads()}")
    seconds = alternate_rounds({"ours": ours, "plain": plain_loop}, args.rounds)
    shutil.rmtree(work, ignore_errors=True)
    ratio_table(seconds, args.prompts, "ours", ["plain"])


if __name__ == "__main__":
    main()
