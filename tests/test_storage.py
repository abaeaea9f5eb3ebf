import json
import os

import pandas as pd
import pytest

from dataflowmm import FileStorage
from dataflowmm.storage import StorageError, read_records

ROWS = [
    {"id": 1, "text": "a red cube", "images": ["a.png", "b.png"], "meta": {"lang": "en"}},
    {"id": 2, "text": "一只猫", "images": [], "meta": {"lang": "zh"}},
    {"id": 3, "text": "", "images": ["c.png"], "meta": None},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def entry(tmp_path):
    return write_jsonl(tmp_path / "input.jsonl", ROWS)


@pytest.mark.parametrize("cache_type", ["jsonl", "json", "csv", "parquet"])
def test_round_trip_each_cache_type(tmp_path, entry, cache_type):
    storage = FileStorage(entry, cache_path=tmp_path / "cache", cache_type=cache_type)
    step1 = storage.step()
    assert step1.read("dict") == ROWS
    path = step1.write(step1.read("dataframe"))
    assert path.endswith(f"dataflow_cache_step_step1.{cache_type}")
    step2 = storage.step()
    expected = ROWS
    if cache_type == "csv":  # CSV cannot tell an empty string from a missing value
        expected = [dict(row, text=row["text"] or None) for row in ROWS]
    assert step2.read("dict") == expected
    assert isinstance(step2.read("dataframe"), pd.DataFrame)


def test_step_numbering_follows_dataflow(tmp_path, entry):
    storage = FileStorage(entry, cache_path=tmp_path / "cache", file_name_prefix="run")
    first = storage.step()
    assert first.input_path == entry
    first.write(ROWS[:2])
    second = storage.step()
    assert second.input_path == tmp_path / "cache" / "run_step1.jsonl"
    assert second.output_path == tmp_path / "cache" / "run_step2.jsonl"
    assert len(second.read("dict")) == 2


def test_write_before_step_is_an_error(tmp_path, entry):
    with pytest.raises(RuntimeError, match="storage.step"):
        FileStorage(entry, cache_path=tmp_path / "cache").write(ROWS)


def test_manifest_records_rows_and_fingerprint(tmp_path, entry):
    step = FileStorage(entry, cache_path=tmp_path / "cache").step()
    step.write(ROWS, operator="Op", params={"x": 1}, input_fingerprint="in", step_fingerprint="fp")
    manifest = json.loads(step.manifest_path.read_text())
    assert manifest["operator"] == "Op" and manifest["params"] == {"x": 1}
    assert manifest["rows"] == 3 and manifest["fingerprint"] == "fp"
    assert step.is_finished("fp") and not step.is_finished("other")


def test_write_is_atomic_when_serialisation_fails(tmp_path, entry):
    step = FileStorage(entry, cache_path=tmp_path / "cache").step()
    step.write(ROWS)
    before = step.output_path.read_bytes()
    with pytest.raises(TypeError):
        step.write([{"bad": object()}])  # not JSON-serialisable: fails half way
    assert step.output_path.read_bytes() == before
    assert [p.name for p in step.output_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2,,}\n')
    with pytest.raises(StorageError, match=r"bad\.jsonl:3: malformed JSON line"):
        read_records(bad)


def test_non_object_jsonl_line_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(StorageError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_records(bad)


def test_missing_entry_file_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FileStorage(tmp_path / "nope.jsonl", cache_path=tmp_path / "cache")


def test_unknown_cache_type(tmp_path, entry):
    with pytest.raises(ValueError, match="pickle"):
        FileStorage(entry, cache_path=tmp_path / "cache", cache_type="pickle")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_cache_path(tmp_path, entry):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="not writable"):
        FileStorage(entry, cache_path=locked)


def test_input_fingerprint_chains_upstream_manifest(tmp_path, entry):
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    storage.step().write(ROWS, step_fingerprint="upstream-a")
    fingerprint_a = storage.step().input_fingerprint()
    storage.operator_step = 0
    storage.step().write(ROWS, step_fingerprint="upstream-b")  # same bytes, other parameters
    assert storage.step().input_fingerprint() != fingerprint_a


def test_a_chunk_has_one_input_digest_whichever_way_it_is_read(tmp_path):
    # The local runner streams chunks, Ray actors read byte spans, a resume skips rows: a
    # finished chunk is kept on resume only if all three name its input the same way.
    from dataflowmm.execution.checkpoints import chunk_digest
    from dataflowmm.io.records import iter_chunks, jsonl_spans, read_jsonl_span

    entry = tmp_path / "in.jsonl"
    entry.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}\n  \n{"a": 4}\n{"a": 5}')
    streamed = list(iter_chunks(entry, 2))
    spans = [read_jsonl_span(entry, span) for span in jsonl_spans(entry, 2)]
    assert [list(chunk) for chunk in streamed] == [list(chunk) for chunk in spans] == [
        [{"a": 1}, {"a": 2}], [{"a": 3}, {"a": 4}], [{"a": 5}]]
    digests = [chunk_digest(chunk) for chunk in streamed]
    assert len(set(digests)) == 3
    assert [chunk_digest(chunk) for chunk in spans] == digests
    assert [chunk_digest(chunk) for chunk in iter_chunks(entry, 2, skip=2)] == digests[1:]

    entry.write_bytes(b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}\n  \n{"a": 40}\n{"a": 5}')
    changed = [chunk_digest(chunk) for chunk in iter_chunks(entry, 2)]
    assert changed[0] == digests[0] and changed[1] != digests[1] and changed[2] == digests[2]
