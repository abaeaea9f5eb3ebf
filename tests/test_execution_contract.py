"""The execution contract: one batch function, streamed steps, identities, layering."""

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from dataflowmm import FileStorage
from dataflowmm.contract import Input, Operator, Output
from dataflowmm.execution.checkpoints import finished_chunks
from dataflowmm.seeds import RowIdentities, canonical_json, canonical_json_bytes, row_identity
from dataflowmm.storage import StorageError

PACKAGE = Path(__file__).resolve().parent.parent / "dataflowmm"


class Tagger(Operator):
    """Adds `tag` and records the row identities it was handed."""

    columns = [Input("text", "input_key", "text"), Output("tag", "key", "tag")]
    default_input_batch_size = 4

    def __init__(self, save_interval=10):
        self.seen_ids = []

    def process_batch(self, rows, row_ids, context):
        self.seen_ids.extend(row_ids)
        return [{**row, self.keys.tag: row_id} for row, row_id in zip(rows, row_ids, strict=True)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_execution_never_imports_operators_or_their_base_class():
    pattern = re.compile(r"^\s*(from|import)\s+dataflowmm\.(operators|contract)", re.MULTILINE)
    offenders = [str(path) for path in (PACKAGE / "execution").rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []


def test_a_malformed_line_fails_naming_it_after_earlier_chunks_are_saved(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(25)]
    lines[22] = '{"text": "broken",'
    entry = write_lines(tmp_path / "in.jsonl", lines)
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    operator = Tagger(save_interval=8)
    with pytest.raises(StorageError, match=r"in\.jsonl:23: malformed JSON line"):
        operator.run(storage.step())
    # the input is streamed: the chunks before the bad line were computed and kept
    assert finished_chunks(tmp_path / "cache" / "dataflow_cache_step_step1.partial") == 2
    assert len(operator.seen_ids) == 16
    # Fixing the line changes the file's digest, yet the chunks before it are still valid:
    # each chunk records the digest of its own input rows.
    lines[22] = json.dumps({"text": "fixed"})
    write_lines(entry, lines)
    fixed = Tagger(save_interval=8)
    summary = fixed.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert summary.chunks_resumed == 2 and len(fixed.seen_ids) == 25 - 16
    clean = Tagger(save_interval=8).run(FileStorage(entry, cache_path=tmp_path / "clean").step())
    assert Path(summary.output_path).read_bytes() == Path(clean.output_path).read_bytes()
    resumed_manifest = json.loads(Path(summary.output_path).with_suffix(".manifest.json").read_text())
    assert resumed_manifest["sha256"] == hashlib.sha256(Path(clean.output_path).read_bytes()).hexdigest()
    # A change inside a finished chunk recomputes from that chunk on, not before it.
    lines[3] = json.dumps({"text": "changed early"})
    write_lines(entry, lines)
    with pytest.raises(KeyboardInterrupt):
        Interrupted(after_rows=17).run(FileStorage(entry, cache_path=tmp_path / "again").step())
    lines[12] = json.dumps({"text": "changed in the second chunk"})
    write_lines(entry, lines)
    resumed = Interrupted(after_rows=10**9)
    summary = resumed.run(FileStorage(entry, cache_path=tmp_path / "again").step())
    assert summary.chunks_resumed == 1 and len(resumed.seen_ids) == 25 - 8


class Interrupted(Tagger):
    """Ctrl-C once `after_rows` rows were handed to it."""

    execution_arguments = frozenset({"after_rows"})

    def __init__(self, after_rows, save_interval=8):
        super().__init__(save_interval=save_interval)
        self.after_rows = after_rows

    def process_batch(self, rows, row_ids, context):
        if len(self.seen_ids) >= self.after_rows:
            raise KeyboardInterrupt
        return super().process_batch(rows, row_ids, context)


def test_identities_are_position_and_content_whatever_the_chunking(tmp_path):
    rows = [{"text": "same"}] * 3 + [{"text": f"row {i}", "n": i / 3} for i in range(8)]
    entry = write_lines(tmp_path / "in.jsonl", [json.dumps(row) for row in rows])
    expected = [row_identity(row, index) for index, row in enumerate(rows)]
    for save_interval in (1, 4, 100):
        operator = Tagger(save_interval=save_interval)
        summary = operator.run(FileStorage(entry, cache_path=tmp_path / f"c{save_interval}").step())
        assert [row["tag"] for row in map(json.loads, open(summary.output_path))] == expected
    assert len(set(expected)) == len(expected)  # duplicates at other positions differ


def test_row_identities_are_lazy_and_equal_to_row_identity():
    rows = [{"a": i} for i in range(5)]
    ids = RowIdentities(rows, 10)
    assert ids._ids == [None] * 5  # nothing hashed before it is asked for
    assert ids[3] == row_identity(rows[3], 13) and ids[-1] == row_identity(rows[4], 14)
    assert ids[1:3] == [row_identity(rows[1], 11), row_identity(rows[2], 12)]
    assert list(ids) == [row_identity(row, 10 + i) for i, row in enumerate(rows)]


def _random_value(rng, depth=0):
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return "".join(chr(rng.choice([rng.randrange(0x20), rng.randrange(0x20, 0x7f), 0x7f, 0x2028,
                                       rng.randrange(0x80, 0xd800), ord('"'), ord("\\")]))
                       for _ in range(rng.randrange(6)))
    if choice == 1:
        return rng.choice([rng.random(), 10 ** rng.uniform(-12, 25), 1e-5, 1e16, 100.0, -0.0, 5e-324])
    if choice == 2:
        return rng.randrange(-2 ** 63, 2 ** 63)
    if choice == 3:
        return rng.choice([True, False, None, 2 ** 70])
    if choice == 4:
        return rng.randrange(-9, 99)
    if choice < 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_value(rng, 3)): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_fast_canonical_json_equals_the_standard_library():
    rng = random.Random(1)
    for _ in range(20_000):
        row = {str(_random_value(rng, 3)): _random_value(rng) for _ in range(rng.randrange(5))}
        assert canonical_json_bytes(row) == canonical_json(row).encode("utf-8")


def test_json_cache_type_is_the_standard_indented_list(tmp_path):
    rows = [{"text": "a", "meta": {"x": [1, 2]}}, {"text": "猫", "meta": {}}]
    entry = write_lines(tmp_path / "in.jsonl", [json.dumps(row) for row in rows])
    summary = Tagger().run(FileStorage(entry, cache_path=tmp_path / "c", cache_type="json").step())
    written = Path(summary.output_path).read_text(encoding="utf-8")
    assert written == json.dumps(json.loads(written), ensure_ascii=False, indent=1)
    assert [row["text"] for row in json.loads(written)] == ["a", "猫"]


def test_an_empty_input_gives_an_empty_step(tmp_path):
    entry = write_lines(tmp_path / "in.jsonl", [])
    summary = Tagger().run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert summary.rows_in == summary.rows_out == 0 and Path(summary.output_path).read_bytes() == b""


def test_a_runner_is_chosen_per_storage(tmp_path):
    calls = []

    class RecordingRunner:
        def run(self, storage, operator):
            calls.append((storage.operator_step, operator.keys.tag))
            return "ran"

    entry = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "x"})])
    storage = FileStorage(entry, cache_path=tmp_path / "c", runner=RecordingRunner())
    operator = Tagger()
    assert operator.run(storage.step(), key="first") == "ran"
    assert operator.run(storage.step(), key="second") == "ran"
    assert calls == [(1, "first"), (2, "second")] and operator.keys.tag == "tag"
    with pytest.raises(ValueError, match="runner must be 'local'"):
        FileStorage(entry, cache_path=tmp_path / "c", runner="spark")
