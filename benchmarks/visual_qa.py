"""PromptedVQAGenerator with APIVLMServing (16 requests in flight) against the loopback chat
server (in its own process, a fixed latency per request), vs a sequential client loop and vs
calling the server directly with the same concurrency (a thread pool over the official client).

Every contender reads the same 256 shapes-world images from disk, sends each as a base64 PNG
data URL with its question through the official `openai` client, and writes the answers as
JSON Lines; "ours" also goes through FileStorage (row identities, per-row seeds, checkpoints,
the cache file and its manifest). Answers are checked against the pixel truth. Prints a table
and ends with `ratio_vs_sequential=<x>` (goal >= 10) and `ratio_vs_plain_client=<x>` (the
framework's cost at the same concurrency; goal >= 0.95), medians of per-round ratios.

    .venv/bin/python benchmarks/visual_qa.py [--images 256] [--latency 0.05] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternate_rounds, ratio_table  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.kit.shapes import write_shapes_dataset  # noqa: E402
from dataflowmm.operators import PromptedVQAGenerator  # noqa: E402
from dataflowmm.serving import APIVLMServing  # noqa: E402

API_KEY = "sk-bench"
MODEL = "loopback-vlm"
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is shown?",
             "background": "What colour is the background?"}


def write_rows(work: Path, count: int) -> tuple[Path, list[dict]]:
    entry = write_shapes_dataset(work / "data", count, seed=1)
    rows = [json.loads(line) for line in entry.read_text().splitlines()]
    for index, row in enumerate(rows):
        row["asks"] = list(QUESTIONS)[index % 3]
        row["question"] = QUESTIONS[row["asks"]]
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return entry, rows


def ask_directly(client: openai.OpenAI, folder: Path, row: dict, seed: int) -> str:
    """One request as a plain client sends it: the file's bytes as a data URL, the question."""
    data = base64.b64encode((folder / row["images"][0]).read_bytes()).decode("ascii")
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
               {"type": "text", "text": row["question"]}]
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=256, seed=seed)
    return response.choices[0].message.content.strip()


def write_answers(path: Path, rows: list[dict], answers: list[str]) -> None:
    path.write_text("".join(json.dumps({**row, "answer": answer}) + "\n" for row, answer in zip(rows, answers, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per step batch (ours; the serving's default)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dataflowmm-bench-"))
    entry, rows = write_rows(work, args.images)
    runs = {"count": 0}
    # The server runs in its own process, as a remote API would: in this one it would compete
    # with the client for the interpreter lock.
    server = subprocess.Popen([sys.executable, "-m", "dataflowmm.kit.loopback_chat_api", "--latency",
                               str(args.latency), "--api-key", API_KEY], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        serving = APIVLMServing(MODEL, base_url=base_url, api_key=API_KEY, max_concurrency=args.concurrency,
                                batch_size=args.batch_size)
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY)
        folder = entry.parent

        # Warm up both (clients made, connections open), as the other benchmarks load models first.
        warm = rows[: args.concurrency]
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda row: ask_directly(client, folder, row, 0), warm))
        PromptedVQAGenerator(serving).run(FileStorage(entry, cache_path=work / "warm").step(),
                                          input_prompt_key="question")

        def ours() -> None:
            runs["count"] += 1
            cache = work / f"ours{runs['count']}"
            summary = PromptedVQAGenerator(serving).run(FileStorage(entry, cache_path=cache).step(),
                                                        input_prompt_key="question")
            answered = [json.loads(line) for line in open(summary.output_path)]
            assert summary.errors == 0 and all(row["answer"] == row[row["asks"]] for row in answered)
            shutil.rmtree(cache)

        def sequential() -> None:
            answers = [ask_directly(client, folder, row, index) for index, row in enumerate(rows)]
            assert all(answer == row[row["asks"]] for row, answer in zip(rows, answers, strict=True))
            write_answers(work / "sequential.jsonl", rows, answers)

        def plain_client() -> None:
            with ThreadPoolExecutor(args.concurrency) as pool:
                answers = list(pool.map(lambda item: ask_directly(client, folder, item[1], item[0]), enumerate(rows)))
            assert all(answer == row[row["asks"]] for row, answer in zip(rows, answers, strict=True))
            write_answers(work / "plain.jsonl", rows, answers)

        print(f"visual qa: {args.images} images, {args.latency * 1000:.0f} ms per request, {args.concurrency} in "
              f"flight, batch {args.batch_size}, {args.rounds} alternating rounds")
        seconds = alternate_rounds({"ours": ours, "sequential": sequential, "plain_client": plain_client},
                                   args.rounds)
        medians = ratio_table(seconds, len(rows), "ours", ["sequential", "plain_client"])
    finally:
        server.terminate()
        server.wait()
    print(f"ratio_vs_sequential={medians['sequential']:.3f}")
    print(f"ratio_vs_plain_client={medians['plain_client']:.3f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
