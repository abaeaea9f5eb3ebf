"""The Ray runner against the local runner on this machine's CPUs, start-up included.

Two steps a user would hand to Ray (each runs for over a minute locally here):
ImageDiffusionAugmenter on tiny-sd (64 px canvas, 4 steps) and PromptedImageGenerator
(tiny-sd, 32 px, 4 steps). Ray with N one-thread actors vs the local runner with N torch
threads, alternating rounds. Each Ray run starts from no actors, so its time includes
what a user pays at a pipeline's first step: starting the actors (a process, torch's
import) and loading the model in each. Prints `ratio_ray_vs_local_with_startup=` (img2img)
and `ratio_ray_vs_local_t2i_with_startup=` (local seconds / Ray seconds), and, to show where
the time goes, the start-up alone (a 4-row step from no actors) and the ratios without it
(`ratio_ray_vs_local=`, `ratio_ray_vs_local_t2i=`).

Then a 3-step pipeline (text-to-image, image-to-image on its images, captions of those) on
a few rows per step, so its time is mostly start-up: once with the actors ended after each
step (as every Ray step did before actors lived across steps), once with one pool for the
whole pipeline. Prints `pipeline_startup_per_step_pools_s=` and `pipeline_startup_one_pool_s=`.

What distribution costs, whatever the CPU's thread scaling: Ray with N one-thread actors
(already started, models loaded) against N times the throughput of a one-thread local run
of the same step: `ratio_ray_vs_ideal=` (img2img) and `ratio_ray_vs_ideal_t2i=` (goal >= 0.9).
(The old goal, >= 1.3x a local run with N threads, measured torch's thread scaling on the
CPU, not the runner: it is retired.)

Then two real nodes on this machine (tests/two_nodes.py: a head with no CPUs, a worker in
its own mount namespace; Linux, root): text-to-image with the driver as the only writer
(the cache on a folder the worker cannot see: images travel back as bytes) against actors
writing to a folder both see: `ratio_driver_writer_vs_shared=` (shared seconds / driver-
writer seconds, warm actors; goal >= 0.9).

    .venv/bin/python benchmarks/ray_runner.py [--images 320] [--prompts 1024] [--rounds 1] [--replicas 2]
                                              [--two-node-prompts 256]
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
from dataflowmm.execution.ray_actors import close_actor_pool
from dataflowmm.execution.ray_runner import RayRunner, connect
from dataflowmm.models.tiny import tiny_model_path
from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter, PromptedImageGenerator
from dataflowmm.serving import LocalCaptionServing, LocalImageGenServing


def write_inputs(work: Path, images: int, prompts: int) -> dict[str, Path]:
    pictures = work / "pics"
    pictures.mkdir(parents=True)
    rows = []
    for index in range(images):
        pixels = np.random.default_rng(index).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pictures / f"{index}.png")
        rows.append({"images": [f"pics/{index}.png"], "caption": f"picture {index}"})
    inputs = {"img2img": work / "images.jsonl", "t2i": work / "prompts.jsonl", "pipeline": work / "few.jsonl"}
    inputs["img2img"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    inputs["t2i"].write_text("".join(json.dumps({"prompt": f"a shape number {i}"}) + "\n" for i in range(prompts)))
    inputs["pipeline"].write_text("".join(json.dumps({"prompt": f"a few {i}"}) + "\n" for i in range(4)))
    inputs["img2img_few"] = work / "images_few.jsonl"
    inputs["img2img_few"].write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    inputs["t2i_few"] = inputs["pipeline"]
    return inputs


def operator(kind: str, sd: str):
    if kind == "img2img":
        serving = LocalImageGenServing(sd, task="image2image", batch_size=4, num_inference_steps=4)
        return ImageDiffusionAugmenter(serving, caption_key="caption", image_size=64, save_interval=4), {}
    serving = LocalImageGenServing(sd, batch_size=4, num_inference_steps=4, height=32, width=32)
    return PromptedImageGenerator(serving, save_interval=4), {"input_prompt_key": "prompt"}


def timed_step(entry: Path, cache: Path, kind: str, sd: str, runner, fresh_pool: bool = True) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    op, kwargs = operator(kind, sd)
    if fresh_pool:
        close_actor_pool()  # the Ray run starts without actors: start-up is inside the timing
    started = time.perf_counter()
    op.run(FileStorage(entry, cache_path=cache, runner=runner).step(), **kwargs)
    return time.perf_counter() - started


def timed_pipeline(entry: Path, cache: Path, sd: str, blip: str, runner: RayRunner, pool_per_step: bool) -> float:
    """Seconds of text-to-image -> image-to-image -> captions on Ray, from no actors."""
    shutil.rmtree(cache, ignore_errors=True)
    close_actor_pool()
    storage = FileStorage(entry, cache_path=cache, runner=runner)
    steps = [
        (PromptedImageGenerator(LocalImageGenServing(sd, batch_size=2, num_inference_steps=2, height=32, width=32),
                                save_interval=2), {"input_prompt_key": "prompt", "output_image_key": "images"}),
        (ImageDiffusionAugmenter(LocalImageGenServing(sd, task="image2image", batch_size=2, num_inference_steps=2),
                                 caption_key="prompt", image_size=32, save_interval=2), {"output_image_key": "augmented"}),
        (ImageCaptioner(LocalCaptionServing(blip, batch_size=2, max_new_tokens=4), save_interval=2),
         {"input_image_key": "augmented"}),
    ]
    started = time.perf_counter()
    for op, kwargs in steps:
        op.run(storage.step(), **kwargs)
        if pool_per_step:
            close_actor_pool()
    return time.perf_counter() - started


def ideal_ratio(inputs: dict, work: Path, kind: str, sd: str, ray: RayRunner, args) -> float:
    """Ray's throughput with N warm one-thread actors / (N x a one-thread local run's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_round = []
        for _ in range(args.rounds):
            one_thread = timed_step(inputs[kind], work / "one", kind, sd, None)
            warm = work / f"{kind}_warm.jsonl"  # a chunk for every actor: all up, models loaded
            warm.write_text("".join(inputs[kind].read_text().splitlines(keepends=True)[:4 * args.replicas]))
            timed_step(warm, work / "warm_ray", kind, sd, ray)
            warm_ray = timed_step(inputs[kind], work / "ray_warm", kind, sd, ray, fresh_pool=False)
            per_round.append(one_thread / (args.replicas * warm_ray))
            print(f"{kind:>8}: one-thread local {one_thread:.1f} s, Ray with {args.replicas} warm actors "
                  f"{warm_ray:.1f} s, ratio to ideal {per_round[-1]:.3f}")
    finally:
        torch.set_num_threads(threads)
    return statistics.median(per_round)


def two_node_ratio(work: Path, sd: str, args) -> float | None:
    """Shared-folder seconds / driver-as-writer seconds of text-to-image on two real nodes."""
    import sys

    import ray as ray_module

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from two_nodes import TwoNodes, unshare_refusal

    refusal = unshare_refusal()
    if refusal:
        print(f"two-node placement skipped: {refusal}")
        return None
    os.environ["RAY_AUTH_MODE"] = "disabled"
    private = work / "private"
    private.mkdir()
    prompts = work / "two_node_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a shape number {i}"}) + "\n"
                               for i in range(args.two_node_prompts)))
    close_actor_pool()
    ray_module.shutdown()
    nodes = TwoNodes(private, [])
    try:
        runner = RayRunner(nodes.start(), replicas=2)
        few = work / "two_node_few.jsonl"
        few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:8]))  # 2 chunks: both actors
        timed_step(few, work / "two_warm", "t2i", sd, runner)  # actors up, model loaded
        seconds: dict[str, list[float]] = {"driver": [], "shared": []}
        for round_index in range(args.rounds):
            order = ["driver", "shared"] if round_index % 2 == 0 else ["shared", "driver"]
            for name in order:
                cache = private / "cache" if name == "driver" else work / "shared_cache"
                seconds[name].append(timed_step(prompts, cache, "t2i", sd, runner, fresh_pool=False))
        driver, shared = statistics.median(seconds["driver"]), statistics.median(seconds["shared"])
        print(f"two nodes, t2i on {args.two_node_prompts} prompts: driver writes {driver:.1f} s, "
              f"actors write to a shared folder {shared:.1f} s")
        return shared / driver
    finally:
        close_actor_pool()
        ray_module.shutdown()
        nodes.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--two-node-prompts", type=int, default=256)
    args = parser.parse_args()

    sd, blip = str(tiny_model_path("tiny-sd")), str(tiny_model_path("tiny-blip"))
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-ray-bench-"))
    inputs = write_inputs(work, args.images, args.prompts)
    torch.set_num_threads(args.replicas)
    started = time.perf_counter()
    connect(num_cpus=args.replicas)
    cluster_start = time.perf_counter() - started
    ray = RayRunner(replicas=args.replicas)

    print(f"ray runner: {args.replicas} actors x 1 torch thread vs local with {args.replicas} threads; "
          f"cluster start {cluster_start:.1f} s (not counted: `ray start` on a cluster)")
    print(f"{'task':>8} | {'rows':>5} | {'round':>5} | {'local s':>8} | {'ray s (start-up incl.)':>22} | "
          f"{'start-up s':>10} | {'ratio':>6} | {'ratio without start-up':>22}")
    ratios, work_ratios, ideal = {}, {}, {}
    for kind, rows in (("img2img", args.images), ("t2i", args.prompts)):
        timed_step(inputs[f"{kind}_few"], work / "warm", kind, sd, None)  # the driver's first load and call
        per_round, per_round_work = [], []
        for round_index in range(args.rounds):
            order = ["local", "ray"] if round_index % 2 == 0 else ["ray", "local"]
            seconds = {name: timed_step(inputs[kind], work / name, kind, sd, None if name == "local" else ray)
                       for name in order}
            startup = timed_step(inputs[f"{kind}_few"], work / "startup", kind, sd, ray)
            per_round.append(seconds["local"] / seconds["ray"])
            per_round_work.append(seconds["local"] / max(seconds["ray"] - startup, 1e-9))
            print(f"{kind:>8} | {rows:>5} | {round_index + 1:>5} | {seconds['local']:>8.1f} | "
                  f"{seconds['ray']:>22.1f} | {startup:>10.1f} | {per_round[-1]:>6.3f} | {per_round_work[-1]:>22.3f}")
        ratios[kind], work_ratios[kind] = statistics.median(per_round), statistics.median(per_round_work)
        ideal[kind] = ideal_ratio(inputs, work, kind, sd, ray, args)

    pipeline = {per_step: timed_pipeline(inputs["pipeline"], work / "pipeline", sd, blip, ray, per_step)
                for per_step in (True, False)}
    print(f"3-step pipeline on 4 rows (t2i -> img2img -> captions): {pipeline[True]:.1f} s with a new pool "
          f"per step, {pipeline[False]:.1f} s with one pool")
    close_actor_pool()
    driver_vs_shared = two_node_ratio(work, sd, args)
    shutil.rmtree(work, ignore_errors=True)
    print(f"ratio_ray_vs_ideal={ideal['img2img']:.3f}")
    print(f"ratio_ray_vs_ideal_t2i={ideal['t2i']:.3f}")
    if driver_vs_shared is not None:
        print(f"ratio_driver_writer_vs_shared={driver_vs_shared:.3f}")
    print(f"ratio_ray_vs_local={work_ratios['img2img']:.3f}")
    print(f"ratio_ray_vs_local_t2i={work_ratios['t2i']:.3f}")
    print(f"ratio_ray_vs_local_with_startup={ratios['img2img']:.3f}")
    print(f"ratio_ray_vs_local_t2i_with_startup={ratios['t2i']:.3f}")
    print(f"pipeline_startup_per_step_pools_s={pipeline[True]:.1f}")
    print(f"pipeline_startup_one_pool_s={pipeline[False]:.1f}")


if __name__ == "__main__":
    main()
