"""A step cache on S3 (moto's server on loopback) vs a plain fsspec loop writing the same objects.

Ours: a step whose operator writes one small PNG per row, with `cache_path=s3://...`:
chunk objects, images sent as each chunk finishes, the cache file in one write, the
manifest, the lock object and its renewal. Plain: `fs.pipe_file` of the same PNG bytes,
one object per row, then the rows as one jsonl object. Rounds alternate; prints a table and
`ratio_vs_plain_fsspec=` (ours / plain, rows per second; the issue asks >= 0.9).

Then the resume cost: a 10,000-row step killed before its last chunk, resumed on a fresh
working folder (another machine): `resume_list_seconds=` (listing and reading the chunk
objects back into a local checkpoint) and `resume_chunk_objects=`.

    .venv/bin/python benchmarks/object_store.py [--rows 2000] [--rounds 4] [--resume-rows 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.contract import Input, Operator, Output  # noqa: E402
from dataflowmm.io.images import image_file_name  # noqa: E402

PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype("uint8")).save(PNG, format="PNG")
PNG_BYTES = PNG.getvalue()


class SmallImageWriter(Operator):
    """Writes the same small PNG for every row (no model: the storage is what is measured)."""

    columns = [Input("prompt", "input_key", "prompt"),
               Output("image", "output_image_key", "image", images=True, empty=None)]
    execution_arguments = frozenset({"stop_after"})

    def __init__(self, input_batch_size: int = 100, save_interval: int = 500, stop_after: int | None = None,
                 **settings):
        self.stop_after, self.batches = stop_after, 0

    def process_batch(self, rows, row_ids, context):
        if self.stop_after is not None and self.batches == self.stop_after:
            raise KeyboardInterrupt  # a kill: finished chunks stay on the store
        self.batches += 1
        out = []
        for row, row_id in zip(rows, row_ids, strict=True):
            path = context.save_dir / (image_file_name(row_id, 0) + ".png")
            path.write_bytes(PNG_BYTES)
            out.append({**row, "image": str(path)})
        return out


def write_input(path: Path, rows: int) -> None:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"a small red fox number {i}"}) + "\n"
                            for i in range(rows)))


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--resume-rows", type=int, default=10_000)
    args = parser.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server, _ = start_moto()
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="dataflowmm-bench-") as folder:
            root = Path(folder)
            entry = root / "input.jsonl"
            write_input(entry, args.rows)
            runs = iter(range(1000))

            def ours() -> None:
                run = next(runs)
                storage = FileStorage(entry, cache_path=f"s3://bench/ours{run}", work_dir=root / f"work{run}")
                SmallImageWriter().run(storage.step(), input_key="prompt")

            def plain() -> None:
                run = next(runs)
                lines = []
                for index, line in enumerate(entry.read_text().splitlines()):
                    name = f"plain{run}/images/{index:06d}.png"
                    fs.pipe_file(f"bench/{name}", PNG_BYTES)
                    lines.append(json.dumps({**json.loads(line), "image": name}) + "\n")
                fs.pipe_file(f"bench/plain{run}/rows.jsonl", "".join(lines).encode())

            seconds = alternate_rounds({"ours": ours, "plain_fsspec": plain}, args.rounds)
            ratios = ratio_table(seconds, args.rows, "ours", ["plain_fsspec"])
            print(f"ratio_vs_plain_fsspec={ratios['plain_fsspec']:.3f}")
            resume_cost(root, args.resume_rows)
    finally:
        server.stop()


def resume_cost(root: Path, rows: int) -> None:
    from dataflowmm.store import StoreMirror

    entry = root / "resume.jsonl"
    write_input(entry, rows)
    storage = FileStorage(entry, cache_path="s3://bench/resume", work_dir=root / "resume-a")
    try:  # batches of 100, chunks of 500: killed in the last chunk
        SmallImageWriter(stop_after=rows // 100 - 1).run(storage.step(), input_key="prompt")
    except KeyboardInterrupt:
        pass
    step = FileStorage(entry, cache_path="s3://bench/resume", work_dir=root / "resume-b").step()
    started = time.perf_counter()
    StoreMirror("s3://bench/resume", None, root / "resume-b").pull_checkpoint(step.checkpoint_dir)
    took = time.perf_counter() - started
    chunks = len((step.checkpoint_dir / "chunks.jsonl").read_bytes().splitlines())
    print(f"resume_rows={rows}")
    print(f"resume_chunk_objects={chunks}")
    print(f"resume_list_seconds={took:.3f}")


if __name__ == "__main__":
    main()
