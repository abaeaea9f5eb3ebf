"""What `dataflowmm export --to webdataset` costs: our exporter vs a plain tarfile loop.

The input is a step file of N rows, each naming its own tiny PNG file (32x32 noise, ~3 KB;
the bytes come from a pool of 256 encoded images, written once per row) with a caption and
a score. Both contenders read every image file and write the same members per sample
(`{key}.png`, `{key}.json`, `{key}.txt`) into one tar per `--shard-size` samples. Ours
runs `export_step(..., "webdataset")` into a fresh folder each round: rows streamed through
`TrainingRows` (header check of every image), orjson rows, a parquet per shard, atomic
shards (temp file, fsync, rename), `.export.json` and `stats.json`. The plain loop is
`json.loads` per line, `open().read()` per image, `json.dumps` and `TarFile.addfile`.
Rounds alternate; prints a table and `ratio_vs_plain_tar=` (ours / plain, rows per second).

Then the peak resident memory of an export of 10,000 and of 100,000 rows (shard size
10,000, the CLI's default), each in a fresh process, and `rss_growth_mb=`. Those inputs name
hard links to 256 distinct image files (so building 100,000 rows takes seconds, not
minutes); the exporter reads each link as its own file.

    .venv/bin/python benchmarks/export.py [--rows 10000] [--shard-size 1000] [--rounds 5] [--skip-memory]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds  # noqa: E402

from dataflowmm.export import export_step  # noqa: E402

DISTINCT_IMAGES = 256


def encoded_pngs(count: int, size: int = 32) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def build_step(folder: Path, rows: int, hard_links: bool = False) -> Path:
    """`folder/step.jsonl` naming `rows` image files in `folder/images/` (each row its own file:
    written from a pool of encoded PNGs, or hard links to the pool's files)."""
    images = folder / "images"
    images.mkdir(parents=True)
    pool = encoded_pngs(DISTINCT_IMAGES)
    if hard_links:
        for index, data in enumerate(pool):
            (images / f"pool{index}.png").write_bytes(data)
    step = folder / "step.jsonl"
    with open(step, "w", encoding="utf-8") as file:
        for index in range(rows):
            name = f"images/{index:08d}.png"
            if hard_links:
                os.link(images / f"pool{index % DISTINCT_IMAGES}.png", folder / name)
            else:
                handle = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(handle, pool[index % DISTINCT_IMAGES])
                os.close(handle)
            row = {"id": f"row-{index:08d}", "caption": f"a watercolour fox number {index} in snow",
                   "image": name, "score": index / 7, "error": None}
            file.write(json.dumps(row) + "\n")
    return step


def plain_tar(step: Path, out: Path, shard_size: int) -> None:
    """The same samples, written by the simplest loop: one tar per `shard_size` rows."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    tar, count, shard = None, 0, 0

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with open(step, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            row = json.loads(line)
            if tar is None:
                tar = tarfile.open(out / f"{shard:05d}.tar", "w")
            key = f"{index:09d}"
            with open(step.parent / row["image"], "rb") as image:
                add(f"{key}.png", image.read())
            row["image"] = f"{key}.png"
            add(f"{key}.json", json.dumps(row).encode())
            add(f"{key}.txt", row["caption"].encode())
            count += 1
            if count == shard_size:
                tar.close()
                tar, count, shard = None, 0, shard + 1
    if tar is not None:
        tar.close()


def ours(step: Path, out: Path, shard_size: int) -> None:
    shutil.rmtree(out, ignore_errors=True)  # a finished export would be resumed, not redone
    export_step(step, "webdataset", out, shard_size=shard_size)


def peak_rss_mb(step: Path, out: Path) -> float:
    """Peak resident memory of a fresh process exporting `step` (shard size 10,000)."""
    result = subprocess.run([sys.executable, __file__, "--memory-child", str(step), str(out)],
                            check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def memory_child(step: Path, out: Path) -> None:
    export_step(step, "webdataset", out)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, type=Path)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    work = Path(tempfile.mkdtemp(prefix="dataflowmm-export-"))
    try:
        step = build_step(work / "input", args.rows)
        ours(step, work / "warm", args.shard_size)  # imports and first-use costs out of the rounds
        seconds = alternate_rounds({"ours": lambda: ours(step, work / "ours", args.shard_size),
                                    "plain": lambda: plain_tar(step, work / "plain", args.shard_size)},
                                   args.rounds)
        mb = sum(path.stat().st_size for path in (work / "ours").glob("*.tar")) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"webdataset export: {args.rows} rows, one 32x32 PNG file each, {args.shard_size} per shard "
          f"({mb:.0f} MB of tar), {args.rounds} alternating rounds")
    print(f"{'round':>6} | {'ours rows/s':>12} | {'plain rows/s':>12} | {'ours/plain':>10}")
    ratios = []
    for index, (mine, plain) in enumerate(zip(seconds["ours"], seconds["plain"], strict=True), start=1):
        ratios.append(plain / mine)
        print(f"{index:>6} | {args.rows / mine:>12.0f} | {args.rows / plain:>12.0f} | {ratios[-1]:>10.3f}")
    print(f"ratio_vs_plain_tar={statistics.median(ratios):.3f}")
    print(f"us_per_row={statistics.median(seconds['ours']) / args.rows * 1e6:.1f}")
    if args.skip_memory:
        return
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-export-mem-"))
    try:
        peaks = {}
        for rows in (10_000, 100_000):
            step = build_step(work / f"input{rows}", rows, hard_links=True)
            peaks[rows] = peak_rss_mb(step, work / f"out{rows}")
            shutil.rmtree(work / f"out{rows}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for rows, peak in peaks.items():
        print(f"peak_rss_mb[{rows}]={peak:.0f}")
    print(f"rss_growth_mb={peaks[100_000] - peaks[10_000]:.1f}")


if __name__ == "__main__":
    main()
