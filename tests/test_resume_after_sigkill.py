"""A generation step killed with SIGKILL mid-step resumes to the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.execution.checkpoints import finished_chunks as recorded_chunks
from dataflowmm.operators import PromptedImageGenerator
from dataflowmm.serving import LocalImageGenServing

ROWS = 16
SAVE_INTERVAL = 2

KILL_AT_CHUNK = 2  # the child blocks when it starts chunk 2: chunks 0 and 1 are finished

# Blocks (then is killed) at a known point, so a fast machine cannot finish before the kill.
CHILD = """
import pathlib, sys, time
from dataflowmm import FileStorage
from dataflowmm.operators import PromptedImageGenerator
from dataflowmm.serving import LocalImageGenServing
model, entry, cache, marker, block_at = sys.argv[1:6]

serving = LocalImageGenServing(model, batch_size=2, num_inference_steps=4, height=32, width=32)
generate, calls = serving.generate, []

def blocking_generate(*args, **kwargs):  # same serving, same fingerprint as the parent's
    if len(calls) == int(block_at):
        pathlib.Path(marker).write_text("blocked")
        time.sleep(600)
    calls.append(1)
    return generate(*args, **kwargs)

serving.generate = blocking_generate
PromptedImageGenerator(serving, save_interval=2).run(FileStorage(entry, cache_path=cache).step(),
                                                     input_prompt_key="prompt")
"""


def run_in_process(model, entry, cache):
    serving = LocalImageGenServing(model, batch_size=2, num_inference_steps=4, height=32, width=32)
    storage = FileStorage(entry, cache_path=cache)
    return PromptedImageGenerator(serving, save_interval=SAVE_INTERVAL).run(storage.step(), input_prompt_key="prompt")


def finished_chunks(cache: Path) -> int:
    return recorded_chunks(cache / "dataflow_cache_step_step1.partial")


def test_sigkill_mid_step_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    model = str(tiny_model("tiny-sd"))
    entry = tmp_path / "in.jsonl"
    entry.write_text("".join(json.dumps({"prompt": f"picture number {i}"}) + "\n" for i in range(ROWS)))
    killed_cache = tmp_path / "killed"

    marker = tmp_path / "blocked"
    child = subprocess.Popen([sys.executable, "-c", CHILD, model, str(entry), str(killed_cache), str(marker),
                              str(KILL_AT_CHUNK)], stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the child never reached the chunk where it is killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (killed_cache / "dataflow_cache_step_step1.jsonl").exists()
    done_before_kill = finished_chunks(killed_cache)
    assert done_before_kill == KILL_AT_CHUNK

    images_dir = killed_cache / "dataflow_cache_step_step1_images"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images_dir.glob("*.png")}
    resumed = run_in_process(model, entry, killed_cache)
    assert resumed.chunks_resumed == done_before_kill
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images_dir.glob("*.png")}
    rewritten = [name for name, stamp in after.items() if before.get(name) != stamp]
    assert len(rewritten) == ROWS - done_before_kill * SAVE_INTERVAL  # finished chunks were not redone

    clean = run_in_process(model, entry, tmp_path / "clean")
    assert Path(resumed.output_path).read_text() == Path(clean.output_path).read_text()
    rows = [json.loads(line) for line in open(clean.output_path)]
    assert len(rows) == ROWS
    for row in rows:
        path = row["images"][0]
        assert (killed_cache / path).read_bytes() == (tmp_path / "clean" / path).read_bytes()
    assert len(list(images_dir.glob("*.png"))) == ROWS  # nothing duplicated, no temp files left
    assert not list(images_dir.glob(".*"))
