"""PromptedImageEditGenerator through FileStorage vs a plain diffusers loop.

Same tiny InstructPix2Pix, (source image, instruction) pairs, settings and batch size; both
read the source PNGs and write one PNG per edit; the model is loaded once for each.

- plain: `StableDiffusionInstructPix2PixPipeline` called on batches of `--batch-size` pairs
  (one generator per batch, as a hand-written loop would).

Prints a table and, last, `ratio_vs_plain_loop=<ours/plain edits per second>`.

    .venv/bin/python benchmarks/image_editing.py [--images 32] [--batch-size 8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.io.images import load_image  # noqa: E402
from dataflowmm.models.tiny import tiny_model_path  # noqa: E402
from dataflowmm.operators import PromptedImageEditGenerator  # noqa: E402

INSTRUCTIONS = ["make it snow", "turn it into a watercolour", "add a red hat", "make it night time"]


def make_inputs(work: Path, count: int, size: int) -> tuple[Path, list[Path], list[str]]:
    """`count` smooth `size`-px source images, an instruction each, and a jsonl entry file."""
    rng = np.random.default_rng(0)
    paths, instructions = [], []
    for index in range(count):
        base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        path = work / "images" / f"source_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
        instructions.append(f"{INSTRUCTIONS[index % len(INSTRUCTIONS)]} ({index})")
    entry = work / "rows.jsonl"
    entry.write_text("".join(json.dumps({"images": [f"images/{p.name}"],
                                         "conversation": [{"role": "user", "content": text}]}) + "\n"
                             for p, text in zip(paths, instructions, strict=True)))
    return entry, paths, instructions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="side of the square source images")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    model = str(tiny_model_path("tiny-instruct-pix2pix"))
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-edit-"))
    entry, paths, instructions = make_inputs(work, args.images, args.size)
    settings = dict(num_inference_steps=args.steps, guidance_scale=7.5, image_guidance_scale=1.5)

    editor = PromptedImageEditGenerator(model, batch_size=args.batch_size, torch_dtype="fp32",
                                        save_interval=args.batch_size * 2, **settings)
    editor.serving.load()
    plain = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    runs = {"ours": 0, "plain": 0}

    def fresh_folder(name: str) -> Path:
        runs[name] += 1
        folder = work / f"{name}{runs[name]}"
        folder.mkdir()
        return folder

    def ours() -> None:
        cache = fresh_folder("ours")
        editor.run(FileStorage(entry, cache_path=cache).step())
        shutil.rmtree(cache)

    def plain_loop() -> None:
        out = fresh_folder("plain")
        with torch.inference_mode():
            for start in range(0, len(paths), args.batch_size):
                sources = [load_image(path) for path in paths[start:start + args.batch_size]]
                edits = plain(prompt=instructions[start:start + args.batch_size], image=sources,
                              generator=torch.Generator().manual_seed(start), **settings).images
                for offset, image in enumerate(edits):
                    image.save(out / f"{start + offset}.png")
        shutil.rmtree(out)

    ours(), plain_loop()  # warm-up: first calls pay one-off costs
    print(f"instruction editing: tiny-instruct-pix2pix, {args.images} images ({args.size}x{args.size}), "
          f"batch {args.batch_size}, {args.steps} steps, image guidance 1.5, {args.rounds} alternating rounds, "
          f"torch threads {torch.get_num_threads()}")
    seconds = alternate_rounds({"ours": ours, "plain": plain_loop}, args.rounds)
    shutil.rmtree(work, ignore_errors=True)
    ratio_table(seconds, args.images, "ours", ["plain"])


if __name__ == "__main__":
    main()
