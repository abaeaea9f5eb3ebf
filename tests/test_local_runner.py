"""The local runner with a model-free operator: chunking, checkpoints, reuse, errors, paths."""

import json

import numpy as np
import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.contract import Input, Operator, Output, RowError
from dataflowmm.execution.checkpoints import finished_chunks
from dataflowmm.execution.local_runner import run_step
from dataflowmm.execution.step import chunk_size
from dataflowmm.io.images import image_file_name, save_png
from dataflowmm.seeds import derive_seed


class Crash(RuntimeError):
    pass


class NoiseImageOperator(Operator):
    """Writes one deterministic noise image per row; fails rows whose text is empty."""

    columns = [Input("text", "input_text_key", "text"),
               Input("source", "input_source_key", "source", images=True, required=False),
               Output("images", "output_image_key", "images", images=True, empty=[])]
    execution_arguments = frozenset({"crash_after_batches", "at"})  # test hooks, not parameters

    def __init__(self, input_batch_size=2, save_interval=3, crash_after_batches=None, tag="a", **settings):
        self.tag, self.crash_after = tag, crash_after_batches
        self.batches_seen = []

    def process_batch(self, rows, row_ids, context):
        if self.crash_after is not None and len(self.batches_seen) == self.crash_after:
            raise Crash("killed")
        self.batches_seen.append([row["text"] for row in rows])
        out = []
        for offset, (row, row_id) in enumerate(zip(rows, row_ids, strict=True)):
            if not row["text"]:
                out.append(self.row_failed(row, "key 'text': empty prompt", offset))
                continue
            pixels = np.random.default_rng(derive_seed(self.settings.seed, row_id)).integers(0, 255, (8, 8, 3))
            path = save_png(Image.fromarray(pixels.astype("uint8")), context.save_dir / image_file_name(row_id, 0))
            out.append({**row, "images": [str(path)], "tag": self.tag})
        return out


def make_entry(tmp_path, n=7, empty_at=()):
    rows = [{"text": "" if i in empty_at else f"prompt {i}", "source": "pics/x.png"} for i in range(n)]
    entry = tmp_path / "data" / "input.jsonl"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return entry


def run_once(entry, cache, operator, cache_type="jsonl"):
    storage = FileStorage(entry, cache_path=cache, cache_type=cache_type)
    return run_step(storage.step(), operator), storage


def test_chunk_size_rounds_up_to_whole_batches():
    assert chunk_size(3, 2) == 4 and chunk_size(4, 2) == 4 and chunk_size(1, 8) == 8


def test_output_rows_images_and_summary(tmp_path):
    entry = make_entry(tmp_path, n=5, empty_at={2})
    summary, storage = run_once(entry, tmp_path / "cache", NoiseImageOperator())
    rows = [json.loads(line) for line in open(summary.output_path)]
    assert len(rows) == 5 and (summary.rows_in, summary.rows_out) == (5, 5)
    assert summary.images_written == 4 and summary.errors == 1
    assert rows[2]["images"] == [] and rows[2]["error"] == "NoiseImageOperator: key 'text': empty prompt"
    assert all(row["error"] is None for i, row in enumerate(rows) if i != 2)
    # paths are relative to the dataset file and resolve to the written files
    for row in rows:
        for path in row["images"]:
            assert not path.startswith("/") and (tmp_path / "cache" / path).is_file()
    # an input path relative to the entry file is rewritten relative to the cache file
    assert (tmp_path / "cache" / rows[0]["source"]).resolve() == (tmp_path / "data/pics/x.png").resolve()
    assert not (tmp_path / "cache" / "dataflow_cache_step_step1.partial").exists()


def test_absolute_paths_on_request(tmp_path):
    summary, _ = run_once(make_entry(tmp_path, n=2), tmp_path / "cache", NoiseImageOperator(absolute_paths=True))
    row = json.loads(open(summary.output_path).readline())
    assert row["images"][0].startswith("/")


def test_batches_start_at_multiples_of_batch_rows_whatever_save_interval(tmp_path):
    for save_interval in (1, 3, 5):
        op = NoiseImageOperator(input_batch_size=2, save_interval=save_interval)
        run_once(make_entry(tmp_path, n=7), tmp_path / f"cache{save_interval}", op)
        assert op.batches_seen == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"],
                                   ["prompt 4", "prompt 5"], ["prompt 6"]]


def test_crash_then_resume_equals_uninterrupted_run(tmp_path):
    entry = make_entry(tmp_path, n=7, empty_at={4})
    clean, _ = run_once(entry, tmp_path / "clean", NoiseImageOperator())
    with pytest.raises(Crash):  # chunks of 4 rows: batch 3 is in the second chunk
        run_once(entry, tmp_path / "resumed", NoiseImageOperator(crash_after_batches=3))
    assert finished_chunks(tmp_path / "resumed/dataflow_cache_step_step1.partial") == 1
    op = NoiseImageOperator()
    resumed, _ = run_once(entry, tmp_path / "resumed", op)
    assert resumed.chunks_resumed == 1
    assert op.batches_seen == [["", "prompt 5"], ["prompt 6"]]  # only the unfinished chunk ran
    assert open(resumed.output_path).read() == open(clean.output_path).read()
    for row in map(json.loads, open(clean.output_path)):
        for path in row["images"]:
            assert (tmp_path / "clean" / path).read_bytes() == (tmp_path / "resumed" / path).read_bytes()


def test_finished_step_is_reused_and_parameter_change_recomputes_downstream(tmp_path):
    entry = make_entry(tmp_path, n=4)

    def pipeline(tag_one, tag_two):
        storage = FileStorage(entry, cache_path=tmp_path / "cache")
        first, second = NoiseImageOperator(tag=tag_one), NoiseImageOperator(tag=tag_two)
        return run_step(storage.step(), first), run_step(storage.step(), second), first, second

    pipeline("a", "b")
    s1, s2, first, second = pipeline("a", "b")
    assert s1.reused and s2.reused and first.batches_seen == [] and second.batches_seen == []
    s1, s2, first, second = pipeline("changed", "b")  # step 1 changes: step 2 must rerun too
    assert not s1.reused and not s2.reused and second.batches_seen
    s1, s2, first, second = pipeline("changed", "b2")
    assert s1.reused and not s2.reused


def test_stale_checkpoints_of_other_parameters_are_discarded(tmp_path):
    entry = make_entry(tmp_path, n=6)
    with pytest.raises(Crash):
        run_once(entry, tmp_path / "cache", NoiseImageOperator(tag="old", crash_after_batches=2))
    op = NoiseImageOperator(tag="new")
    summary, _ = run_once(entry, tmp_path / "cache", op)
    assert summary.chunks_resumed == 0 and len(op.batches_seen) == 3
    assert {row["tag"] for row in map(json.loads, open(summary.output_path))} == {"new"}


def test_missing_key_fails_before_any_batch(tmp_path):
    entry = tmp_path / "in.jsonl"
    entry.write_text('{"prompt": "x"}\n')
    op = NoiseImageOperator()
    with pytest.raises(KeyError, match=r"in\.jsonl: no row has key 'text'"):
        run_once(entry, tmp_path / "cache", op)
    assert op.batches_seen == []


def test_strict_raises_naming_file_and_row(tmp_path):
    entry = make_entry(tmp_path, n=5, empty_at={3})
    with pytest.raises(RowError, match=r"input\.jsonl: row 3: key 'text': empty prompt"):
        run_once(entry, tmp_path / "cache", NoiseImageOperator(strict=True))


@pytest.mark.parametrize("cache_type", ["json", "csv", "parquet"])
def test_other_cache_types_carry_image_lists(tmp_path, cache_type):
    summary, storage = run_once(make_entry(tmp_path, n=3), tmp_path / "cache", NoiseImageOperator(), cache_type)
    rows = storage.step().read("dict")
    assert len(rows) == 3 and all(len(row["images"]) == 1 for row in rows)
