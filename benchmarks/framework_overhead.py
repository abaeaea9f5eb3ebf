"""What the framework costs per row: a pass-through operator vs a plain stdlib-json loop.

Both read the same jsonl, add one short field to every row and write jsonl. Ours runs as a
real step (row identities, batches, chunk checkpoints, atomic publish, manifest); the
plain loop is `json.loads` / `json.dumps` line by line. Rounds alternate; prints a table,
`ratio_vs_plain_json=` (ours / plain, rows per second) and `us_per_row=`. Then the peak
resident memory of a step over 100,000 and over 1,000,000 rows, each in a fresh process,
and `rss_growth_mb_per_million_rows=`.

    .venv/bin/python benchmarks/framework_overhead.py [--rows 100000] [--rounds 6] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.contract import Input, Operator, Output  # noqa: E402


class PassThrough(Operator):
    """Adds `"tag": "seen"` to every row."""

    columns = [Input("prompt", "input_key", "prompt"), Output("tag", "output_key", "tag")]
    default_input_batch_size = 1024

    def __init__(self, save_interval: int = 10_000):
        pass

    def process_batch(self, rows, row_ids, context):
        return [{**row, self.keys.tag: "seen"} for row in rows]


def write_input(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for index in range(rows):
            row = {"id": f"row-{index:08d}", "prompt": f"a watercolour painting of a fox number {index} in snow",
                   "conversations": [{"role": "user", "content": f"draw fox {index}"}], "score": index / 7}
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def plain_loop(entry: Path, output: Path) -> None:
    with open(entry, encoding="utf-8") as reader, open(output, "w", encoding="utf-8") as writer:
        for line in reader:
            row = json.loads(line)
            row["tag"] = "seen"
            writer.write(json.dumps(row, ensure_ascii=False) + "\n")


def ours(entry: Path, cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)  # a finished step would be reused, not recomputed
    summary = PassThrough().run(FileStorage(entry, cache_path=cache).step())
    assert summary.rows_out == summary.rows_in


def peak_rss_mb(rows: int) -> float:
    """Peak resident memory of a fresh process running one step over `rows` rows."""
    result = subprocess.run([sys.executable, __file__, "--memory-child", str(rows)],
                            check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def memory_child(rows: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dataflowmm-mem-"))
    try:
        entry = work / "in.jsonl"
        write_input(entry, rows)
        ours(entry, work / "cache")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return

    work = Path(tempfile.mkdtemp(prefix="dataflowmm-overhead-"))
    try:
        entry = work / "in.jsonl"
        write_input(entry, args.rows)
        ours(entry, work / "warm")  # imports and first-use costs out of the rounds
        seconds = alternate_rounds({"ours": lambda: ours(entry, work / "cache"),
                                    "plain": lambda: plain_loop(entry, work / "plain.jsonl")}, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"framework overhead: pass-through operator, {args.rows} jsonl rows, {args.rounds} rounds")
    print(f"{'round':>6} | {'ours rows/s':>12} | {'plain rows/s':>12} | {'ours/plain':>10}")
    ratios = []
    for index, (mine, plain) in enumerate(zip(seconds["ours"], seconds["plain"], strict=True), start=1):
        ratios.append(plain / mine)
        print(f"{index:>6} | {args.rows / mine:>12.0f} | {args.rows / plain:>12.0f} | {ratios[-1]:>10.3f}")
    print(f"ratio_vs_plain_json={statistics.median(ratios):.3f}")
    print(f"us_per_row={statistics.median(seconds['ours']) / args.rows * 1e6:.2f}")
    if args.skip_memory:
        return
    small, large = peak_rss_mb(100_000), peak_rss_mb(1_000_000)
    print(f"peak_rss_mb_100k={small:.0f} peak_rss_mb_1m={large:.0f}")
    print(f"rss_growth_mb_per_million_rows={(large - small) / 0.9:.1f}")


if __name__ == "__main__":
    main()
