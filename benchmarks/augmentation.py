"""ImageDiffusionAugmenter through FileStorage vs a Data-Juicer-style loop and a plain batched loop.

Same tiny model, images, captions and settings (image-to-image at a square canvas, resized
back to each source's size, one PNG per image); models are loaded once.

- per_image: Data-Juicer's `image_diffusion_mapper` call pattern: one pipeline call per image
  with batch 1.
- plain: the diffusers img2img pipeline called on batches of `--batch-size` images.

Prints a table and, last, `ratio_vs_per_image_loop=<x>` and `ratio_vs_plain_loop=<x>`
(ours / baseline images per second, medians of alternating rounds).

    .venv/bin/python benchmarks/augmentation.py [--images 32] [--batch-size 16] [--rounds 6]
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
from diffusers import AutoPipelineForImage2Image
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.io.images import load_image  # noqa: E402
from dataflowmm.models.tiny import tiny_model_path  # noqa: E402
from dataflowmm.operators.image_diffusion_augmenter import ImageDiffusionAugmenter  # noqa: E402

STRENGTH = 0.8
GUIDANCE_SCALE = 7.5


def make_inputs(work: Path, count: int) -> tuple[Path, list[Path], list[str]]:
    """`count` smooth 80x60 source images, their captions, and a jsonl entry file."""
    rng = np.random.default_rng(0)
    paths, captions = [], []
    for index in range(count):
        base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((80, 60), Image.Resampling.BILINEAR)
        path = work / "images" / f"source_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
        captions.append(f"a photo of object number {index} on a table")
    entry = work / "rows.jsonl"
    entry.write_text("".join(json.dumps({"images": [f"images/{p.name}"], "text": c}) + "\n"
                             for p, c in zip(paths, captions, strict=True)))
    return entry, paths, captions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="square canvas side (image_size)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    model = str(tiny_model_path("tiny-sd"))
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-aug-"))
    entry, paths, captions = make_inputs(work, args.images)
    canvas = (args.size, args.size)
    call_settings = dict(strength=STRENGTH, guidance_scale=GUIDANCE_SCALE,
                         num_inference_steps=args.steps)

    augmenter = ImageDiffusionAugmenter(
        model, caption_key="text", aug_num=1, batch_size=args.batch_size, image_size=args.size,
        save_interval=args.batch_size * 2, **call_settings)
    augmenter.diffusion.load()
    plain = AutoPipelineForImage2Image.from_pretrained(model, torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    runs = {"ours": 0, "per_image": 0, "plain": 0}

    def fresh_folder(name: str) -> Path:
        runs[name] += 1
        folder = work / f"{name}{runs[name]}"
        folder.mkdir()
        return folder

    def ours() -> None:
        cache = fresh_folder("ours")
        augmenter.run(FileStorage(entry, cache_path=cache).step())
        shutil.rmtree(cache)

    def per_image_loop() -> None:
        out = fresh_folder("per_image")
        with torch.inference_mode():
            for index, (path, caption) in enumerate(zip(paths, captions, strict=True)):
                image = load_image(path)
                result = plain(image=image.resize(canvas, Image.Resampling.BILINEAR), prompt=[caption],
                               generator=torch.Generator().manual_seed(index), **call_settings).images[0]
                result.resize(image.size, Image.Resampling.BILINEAR).save(out / f"{index}.png")
        shutil.rmtree(out)

    def plain_loop() -> None:
        out = fresh_folder("plain")
        with torch.inference_mode():
            for start in range(0, len(paths), args.batch_size):
                sources = [load_image(path) for path in paths[start:start + args.batch_size]]
                results = plain(image=[s.resize(canvas, Image.Resampling.BILINEAR) for s in sources],
                                prompt=captions[start:start + args.batch_size],
                                generator=torch.Generator().manual_seed(start), **call_settings).images
                for offset, (source, result) in enumerate(zip(sources, results, strict=True)):
                    result.resize(source.size, Image.Resampling.BILINEAR).save(out / f"{start + offset}.png")
        shutil.rmtree(out)

    ours(), per_image_loop(), plain_loop()  # warm-up: first calls pay one-off costs
    print(f"image-to-image augmentation: tiny-sd, {args.images} images (80x60), batch {args.batch_size}, "
          f"{args.steps} steps, strength {STRENGTH}, {args.size}px canvas, {args.rounds} alternating rounds, "
          f"torch threads {torch.get_num_threads()}")
    seconds = alternate_rounds({"ours": ours, "per_image": per_image_loop, "plain": plain_loop}, args.rounds)
    shutil.rmtree(work, ignore_errors=True)
    ratio_table(seconds, args.images, "ours", ["per_image", "plain"])


if __name__ == "__main__":
    main()
