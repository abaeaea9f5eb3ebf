"""PromptTemplate, the example operator: rows, errors, strict, caching and key binding."""

import json

import pytest

from dataflowmm import FileStorage
from dataflowmm.operators import PromptTemplate, RowError

ROWS = [
    {"subject": "a red fox", "style": "watercolour"},
    {"subject": "a tower", "style": None},
    {"subject": "两只猫", "style": "ink", "meta": {"lang": "zh"}},
]


def entry_file(tmp_path, rows=ROWS):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_fills_the_template_and_keeps_rows_missing_a_field(tmp_path):
    storage = FileStorage(entry_file(tmp_path), cache_path=tmp_path / "cache")
    summary = PromptTemplate("a photo of {subject}, {style}").run(storage.step())
    rows = read(summary.output_path)
    assert [row["prompt"] for row in rows] == ["a photo of a red fox, watercolour", "", "a photo of 两只猫, ink"]
    assert rows[1]["error"] == "PromptTemplate: key 'style': missing"
    assert summary.errors == 1 and summary.rows_out == 3 and summary.images_written == 0


def test_strict_names_file_and_row(tmp_path):
    storage = FileStorage(entry_file(tmp_path), cache_path=tmp_path / "cache")
    with pytest.raises(RowError, match=r"rows\.jsonl: row 1: key 'style': missing"):
        PromptTemplate("{subject} {style}", strict=True).run(storage.step())


def test_one_operator_runs_in_two_steps_with_other_keys(tmp_path):
    template = PromptTemplate("{subject}!")
    storage = FileStorage(entry_file(tmp_path), cache_path=tmp_path / "cache")
    template.run(storage.step(), output_key="first")
    second = template.run(storage.step(), output_key="second")
    row = read(second.output_path)[0]
    assert row["first"] == row["second"] == "a red fox!"
    assert template.keys.output == "prompt"  # binding keys never changes the operator itself


def test_rerun_reuses_and_a_new_template_recomputes(tmp_path):
    entry = entry_file(tmp_path)
    first = PromptTemplate("{subject}").run(FileStorage(entry, cache_path=tmp_path / "c").step())
    again = PromptTemplate("{subject}").run(FileStorage(entry, cache_path=tmp_path / "c").step())
    changed = PromptTemplate("{subject}?").run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert not first.reused and again.reused and not changed.reused
    assert read(changed.output_path)[0]["prompt"] == "a red fox?"


def test_template_fields_are_required_keys(tmp_path):
    storage = FileStorage(entry_file(tmp_path), cache_path=tmp_path / "cache")
    with pytest.raises(KeyError, match="no row has key 'colour'"):
        PromptTemplate("{subject} in {colour}").run(storage.step())
    assert PromptTemplate("{meta[lang]}: {subject}").required_keys() == ["meta", "subject"]
    with pytest.raises(ValueError, match="names no"):
        PromptTemplate("no fields")


@pytest.mark.parametrize("meta", [{"region": "cn"}, "zh", ["zh"], None])
def test_a_row_missing_a_nested_field_is_a_row_error(tmp_path, meta):
    rows = [{"subject": "a fox", "meta": {"lang": "en"}}, {"subject": "a cat", "meta": meta}]
    storage = FileStorage(entry_file(tmp_path, rows), cache_path=tmp_path / "cache")
    summary = PromptTemplate("{subject} ({meta[lang]})").run(storage.step())
    out = read(summary.output_path)
    assert out[0]["prompt"] == "a fox (en)" and out[0]["error"] is None
    assert out[1]["prompt"] == "" and out[1]["error"].startswith("PromptTemplate: ")
    assert summary.errors == 1
