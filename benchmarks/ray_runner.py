"""The Ray runner against the local runner on this machine's CPUs.

ImageDiffusionAugmenter on tiny-sd (64 px canvas, 4 steps) and PromptedImageGenerator
(tiny-sd, 32 px, 4 steps): Ray with N one-thread actors vs the local runner with N torch
threads, alternating rounds. Every Ray step starts a fresh actor pool (each actor imports
torch and loads its model); that start-up is measured on its own (a 2-row step) and
reported separately, and the ratios compare the work after it. Prints
`ratio_ray_vs_local=` (img2img) and `ratio_ray_vs_local_t2i=` (local seconds / Ray seconds
without start-up), and the same with start-up included.

    .venv/bin/python benchmarks/ray_runner.py [--images 32] [--prompts 64] [--rounds 3] [--replicas 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.execution.ray_runner import RayRunner, connect
from dataflowmm.models.tiny import tiny_model_path
from dataflowmm.operators import ImageDiffusionAugmenter, PromptedImageGenerator
from dataflowmm.serving import LocalImageGenServing


def write_inputs(work: Path, images: int, prompts: int) -> dict[str, Path]:
    pictures = work / "pics"
    pictures.mkdir(parents=True)
    rows = []
    for index in range(images):
        pixels = np.random.default_rng(index).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pictures / f"{index}.png")
        rows.append({"images": [f"pics/{index}.png"], "caption": f"picture {index}"})
    inputs = {"img2img": work / "images.jsonl", "t2i": work / "prompts.jsonl"}
    inputs["img2img"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    inputs["t2i"].write_text("".join(json.dumps({"prompt": f"a shape number {i}"}) + "\n" for i in range(prompts)))
    inputs["img2img_tiny"] = work / "images_2.jsonl"
    inputs["img2img_tiny"].write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    inputs["t2i_tiny"] = work / "prompts_2.jsonl"
    inputs["t2i_tiny"].write_text("".join(json.dumps({"prompt": f"warm {i}"}) + "\n" for i in range(2)))
    return inputs


def operator(kind: str, model: str):
    if kind == "img2img":
        serving = LocalImageGenServing(model, task="image2image", batch_size=4, num_inference_steps=4)
        return ImageDiffusionAugmenter(serving, caption_key="caption", image_size=64, save_interval=4), {}
    serving = LocalImageGenServing(model, batch_size=4, num_inference_steps=4, height=32, width=32)
    return PromptedImageGenerator(serving, save_interval=4), {"input_prompt_key": "prompt"}


def timed_step(entry: Path, cache: Path, kind: str, model: str, runner) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    op, kwargs = operator(kind, model)
    started = time.perf_counter()
    op.run(FileStorage(entry, cache_path=cache, runner=runner).step(), **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    model = str(tiny_model_path("tiny-sd"))
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-ray-bench-"))
    inputs = write_inputs(work, args.images, args.prompts)
    torch.set_num_threads(args.replicas)
    started = time.perf_counter()
    connect(num_cpus=args.replicas)
    cluster_start = time.perf_counter() - started
    ray = RayRunner(replicas=args.replicas)

    print(f"ray runner: {args.replicas} actors x 1 torch thread vs local with {args.replicas} threads; "
          f"cluster start {cluster_start:.1f} s")
    print(f"{'task':>8} | {'round':>5} | {'local s':>8} | {'ray s':>7} | {'start-up s':>10} | "
          f"{'ratio':>6} | {'ratio incl. start-up':>20}")
    results = {}
    for kind, items in (("img2img", args.images), ("t2i", args.prompts)):
        timed_step(inputs[kind], work / "warm", kind, model, None)  # model load and first call out of the rounds
        ratios, ratios_with_startup = [], []
        for round_index in range(args.rounds):
            order = ["local", "ray"] if round_index % 2 == 0 else ["ray", "local"]
            seconds = {}
            for name in order:
                runner = None if name == "local" else ray
                seconds[name] = timed_step(inputs[kind], work / name, kind, model, runner)
            startup = timed_step(inputs[f"{kind}_tiny"], work / "startup", kind, model, ray)
            work_seconds = max(seconds["ray"] - startup, 1e-9)
            ratios.append(seconds["local"] / work_seconds)
            ratios_with_startup.append(seconds["local"] / seconds["ray"])
            print(f"{kind:>8} | {round_index + 1:>5} | {seconds['local']:>8.1f} | {seconds['ray']:>7.1f} | "
                  f"{startup:>10.1f} | {ratios[-1]:>6.2f} | {ratios_with_startup[-1]:>20.2f}")
        results[kind] = (statistics.median(ratios), statistics.median(ratios_with_startup), items)
    shutil.rmtree(work, ignore_errors=True)
    print(f"ratio_ray_vs_local={results['img2img'][0]:.3f}")
    print(f"ratio_ray_vs_local_t2i={results['t2i'][0]:.3f}")
    print(f"ratio_ray_vs_local_with_startup={results['img2img'][1]:.3f}")
    print(f"ratio_ray_vs_local_t2i_with_startup={results['t2i'][1]:.3f}")


if __name__ == "__main__":
    main()
