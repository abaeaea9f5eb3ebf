"""Nothing lost when two runs, a failed manifest write, a flaky API or odd input meet a step."""

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
    assert json.loads(old_manifest.read_text())["sha256"]
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
