"""ImageGeneration with APIImageGenServing (max_concurrency=16) vs a sequential client loop,
against the loopback OpenAI-compatible images server (in its own process) with a fixed
latency per request.

Both use the official `openai` client against the same server, request one image per
prompt, and write every image as a PNG file; "ours" also goes through FileStorage (row
identities, checkpoints, the cache file and its manifest). Prints a table and ends with
`ratio_vs_sequential=<x>` (ours / sequential, images per second; the goal is >= 10).

    .venv/bin/python benchmarks/api_image_generation.py [--prompts 256] [--latency 0.05] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.operators import ImageGeneration  # noqa: E402
from dataflowmm.serving import APIImageGenServing  # noqa: E402

API_KEY = "sk-bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step batch (ours)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-"))
    prompts = [f"prompt number {index}: a small red boat" for index in range(args.prompts)]
    entry = work / "prompts.jsonl"
    entry.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    runs = {"count": 0}

    # The server runs in its own process, as a remote API would: in this one it would compete
    # with the client for the interpreter lock.
    server = subprocess.Popen([sys.executable, "-m", "dataflowmm.kit.loopback_images_api", "--latency", str(args.latency),
                               "--api-key", API_KEY], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        serving = APIImageGenServing("loopback-image", base_url=base_url, api_key=API_KEY,
                                     max_concurrency=args.concurrency, batch_size=args.batch_size)
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY)

        # Warm up both (client made, connections open), as the other benchmarks load models first.
        serving.generate(["warm-up"] * args.concurrency, [0] * args.concurrency)
        client.images.generate(model="loopback-image", prompt="warm-up", n=1, response_format="b64_json")

        def ours() -> None:
            runs["count"] += 1
            cache = work / f"ours{runs['count']}"
            summary = ImageGeneration(serving).run(FileStorage(entry, cache_path=cache).step())
            assert summary.images_written == len(prompts), summary.line()
            shutil.rmtree(cache)

        def sequential() -> None:
            folder = work / "sequential"
            folder.mkdir()
            for index, prompt in enumerate(prompts):
                response = client.images.generate(model="loopback-image", prompt=prompt, n=1,
                                                  response_format="b64_json")
                (folder / f"{index}.png").write_bytes(base64.b64decode(response.data[0].b64_json))
            shutil.rmtree(folder)

        print(f"api image generation: {args.prompts} prompts, {args.latency * 1000:.0f} ms per request, "
              f"max_concurrency {args.concurrency}, batch {args.batch_size}, {args.rounds} alternating rounds")
        seconds = alternate_rounds({"ours": ours, "sequential": sequential}, args.rounds)
        medians = ratio_table(seconds, len(prompts), "ours", ["sequential"])
    finally:
        server.terminate()
        server.wait()
    print(f"ratio_vs_sequential={medians['sequential']:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
