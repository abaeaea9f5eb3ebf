"""Nothing lost when two runs, a failed manifest write, a flaky API or odd input meet a step."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dataflowmm
from dataflowmm import FileStorage
from dataflowmm.execution.cache_lock import CacheInUse, cache_lock
from dataflowmm.execution.local_runner import run_step

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import slow_step  # noqa: E402

# Subprocesses import this checkout's dataflowmm, as the tests do.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(dataflowmm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read(path):
    return [json.loads(line) for line in open(path)]


# -- one run per cache ---------------------------------------------------------------------


def test_a_second_process_fails_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    entry = write_rows(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(6)])
    cache, started = tmp_path / "cache", tmp_path / "started"
    holder = subprocess.Popen([sys.executable, str(HELPERS / "slow_step.py"), str(entry), str(cache),
                               str(started), "30"], stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert holder.poll() is None, holder.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        began = time.monotonic()
        with pytest.raises(CacheInUse) as refused:
            slow_step.run(entry, cache)
        assert time.monotonic() - began < 2
        message = str(refused.value)
        assert "\n" not in message and str(cache) in message and f"pid {holder.pid}" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = slow_step.run(entry, cache)  # the killed holder's lock went with it
    solo = slow_step.run(entry, tmp_path / "solo")
    assert Path(summary.output_path).read_bytes() == Path(solo.output_path).read_bytes()
    assert not any(p.name.endswith(".lock") for p in cache.iterdir())


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    entry = write_rows(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    (tmp_path / "cache").mkdir()
    with cache_lock(tmp_path / "cache", "dataflow_cache_step"):
        # a script that builds a second storage on the same cache and runs it
        summary = run_step(FileStorage(entry, cache_path=tmp_path / "cache").step(), slow_step.SlowCopy())
        assert (tmp_path / "cache" / "dataflow_cache_step.lock").read_text().strip() == str(os.getpid())
    assert [row["copy"] for row in read(summary.output_path)] == ["A", "B"]
    assert not (tmp_path / "cache" / "dataflow_cache_step.lock").exists()


# -- manifest and data agree -----------------------------------------------------------------


def test_a_manifest_write_that_fails_after_publishing_leaves_no_manifest_and_the_rerun_recomputes(
        tmp_path, monkeypatch):
    entry = write_rows(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    first = slow_step.run(entry, tmp_path / "cache")
    old_manifest = Path(first.output_path).with_name("dataflow_cache_step_step1.manifest.json")
    # digested as written (the rows are never read back to publish)
    assert json.loads(old_manifest.read_text())["sha256"] == hashlib.sha256(Path(first.output_path).read_bytes()).hexdigest()
    write_rows(entry, [{"text": "c"}, {"text": "d"}])  # new input: the step is recomputed

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileStorage, "write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        slow_step.run(entry, tmp_path / "cache")
    assert not old_manifest.exists()  # the published file is not described by the old manifest
    assert [row["copy"] for row in read(first.output_path)] == ["C", "D"]
    monkeypatch.undo()
    again = slow_step.run(entry, tmp_path / "cache")
    assert not again.reused and [row["copy"] for row in read(again.output_path)] == ["C", "D"]
    assert slow_step.run(entry, tmp_path / "cache").reused


def test_a_cache_file_changed_behind_the_manifest_is_recomputed(tmp_path):
    entry = write_rows(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    first = slow_step.run(entry, tmp_path / "cache")
    solo = Path(first.output_path).read_bytes()
    Path(first.output_path).write_bytes(solo.replace(b'"A"', b'"Z"'))  # same size, other data
    again = slow_step.run(entry, tmp_path / "cache")
    assert not again.reused and Path(again.output_path).read_bytes() == solo
    os.utime(again.output_path)  # touched, same bytes: the digest says it is the same file
    assert slow_step.run(entry, tmp_path / "cache").reused


# -- transient failures are retried on the next run, and only they ---------------------------


def test_rows_that_failed_transiently_are_retried_and_every_other_row_is_kept_byte_for_byte(tmp_path):
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_images_api import LoopbackImagesAPI
    from dataflowmm.operators import ImageGeneration
    from dataflowmm.serving.api_image_gen import APIImageGenServing

    prompts = ["a fox", "b [429]", "c [refuse]", "d [500x2]", "e owl"]
    entry = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    with LoopbackImagesAPI(api_key="k") as api:
        def run(**options):
            task = ImageGeneration(APIImageGenServing("loopback-image", base_url=api.base_url, api_key="k",
                                                      max_retries=0, timeout=2), save_interval=2)
            return task.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), **options)

        first = run()
        lines = Path(first.output_path).read_bytes().splitlines()
        manifest = json.loads(Path(first.output_path).with_name("dataflow_cache_step_step1.manifest.json").read_text())
        assert first.errors == 3 and manifest["transient_rows"] == 2
        assert [record[0] for record in manifest["failed_rows"] if record[3]] == [1, 3]
        assert api.total_requests == 5

        second = run()  # 429 passes now; the second 500 of "[500x2]" does not
        assert "2 rows retried" in second.line() and not second.reused
        assert api.requests == {"a fox": 1, "b [429]": 2, "c [refuse]": 1, "d [500x2]": 2, "e owl": 1}
        again = Path(second.output_path).read_bytes().splitlines()
        assert [again[i] for i in (0, 2, 4)] == [lines[i] for i in (0, 2, 4)]  # byte for byte
        assert json.loads(again[1])["error"] is None and json.loads(again[3])["error"].startswith(
            "ImageGeneration: HTTP 500")

        third = run()
        assert third.rows_retried == 1 and third.errors == 1 and api.requests["d [500x2]"] == 3
        assert run().reused and api.total_requests == 8  # only the refusal is left: a data failure
        forced = run(retry_errors=True)
        assert forced.rows_retried == 1 and api.requests["c [refuse]"] == 2
    rows = read(forced.output_path)
    assert [row["error"] is None for row in rows] == [True, True, False, True, True]
    for row in rows[:2] + rows[3:]:
        assert (Path(forced.output_path).parent / row["image"]).is_file()


def test_out_of_memory_and_marked_errors_are_transient():
    from dataflowmm.contract import TransientError, is_transient

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda gives it
        pass

    assert is_transient(TransientError("503")) and is_transient(OutOfMemoryError("CUDA out of memory"))
    assert not is_transient(ValueError("bad image")) and not is_transient(None)


# -- markers never collide with user columns --------------------------------------------------


class FailOdd(slow_step.SlowCopy):
    """Fails rows whose text ends in an odd digit; keeps each original before its copy."""

    def process_batch(self, rows, row_ids, context):
        out = []
        for offset, row in enumerate(rows):
            assert "error" not in row or row["error"] is None  # never given a row failed upstream
            if int(row["text"][-1]) % 2:
                out.append(self.row_failed(row, "odd", offset))
            else:
                out += [row, {**row, "copy": row["text"].upper()}]
        return out


def test_a_row_failed_upstream_passes_through_once_and_is_counted_apart(tmp_path):
    rows = [{"text": "t0"}, {"text": "t1", "error": "Upstream: bad"}, {"text": "t2"}, {"text": "t3"}]
    entry = write_rows(tmp_path / "in.jsonl", rows)
    summary = run_step(FileStorage(entry, cache_path=tmp_path / "cache").step(), FailOdd(input_batch_size=4))
    out = read(summary.output_path)
    assert [(row["text"], row.get("copy"), row["error"]) for row in out] == [
        ("t0", None, None), ("t0", "T0", None), ("t1", None, "Upstream: bad"), ("t2", None, None),
        ("t2", "T2", None), ("t3", None, "FailOdd: odd")]
    assert summary.errors == 1 and summary.failed_upstream == 1 and "1 failed upstream" in summary.line()
    manifest = json.loads(Path(summary.output_path).with_name("dataflow_cache_step_step1.manifest.json").read_text())
    assert manifest["failed_upstream"] == 1 and manifest["errors"] == 1
    assert manifest["failed_rows"] == [[3, 5, 6, 0]]


def test_an_input_column_named_dropped_by_never_drops_a_row(tmp_path):
    rows = [{"text": "a", "dropped_by": "Filter: low score"}, {"text": "b", "dropped_by": None}]
    entry = write_rows(tmp_path / "in.jsonl", rows)  # e.g. a .dropped.jsonl fed back in
    summary = slow_step.run(entry, tmp_path / "cache")
    assert summary.rows_out == 2 and summary.rows_dropped == 0
    assert [row["dropped_by"] for row in read(summary.output_path)] == ["Filter: low score", None]
