"""One way to write an operator: declared columns, recorded parameters, run() from the declaration."""

import inspect
import json
from pathlib import Path

import pytest

from dataflowmm import FileStorage
from dataflowmm.contract import Input, Operator, Output
from dataflowmm.operators import (
    ClipScoreEvaluator,
    ClipScoreFilter,
    DifferenceCaptioner,
    ImageCaptioner,
    ImageDeduplicator,
    ImageDifferenceRegions,
    ImageDiffusionAugmenter,
    ImageQAGenerator,
    ImageTextMatchingFilter,
    PromptedImageGenerator,
    PromptedVQAGenerator,
    PromptTemplate,
    PromptTemplatedVQAGenerator,
)

OPERATORS = Path(__file__).resolve().parent.parent / "dataflowmm" / "operators"


class Suffix(Operator):
    columns = [Input("text", "input_key", "text", "the text"), Output("out", "output_key", "out", "the result",
                                                                      empty="")]

    def __init__(self, suffix="!", *, save_interval=2, strict=False):
        self.suffix = suffix

    def process_batch(self, rows, row_ids, context):
        out = []
        for offset, row in enumerate(rows):
            if not isinstance(row.get(self.keys.text), str):
                out.append(self.row_failed(row, f"key {self.keys.text!r}: not a string", offset))
            else:
                out.append({**row, self.keys.out: row[self.keys.text] + self.suffix})
        return out


class LoudSuffix(Suffix):
    """A subclass that adds an argument and touches nothing else."""

    def __init__(self, suffix="!", *, times=1, **kwargs):
        super().__init__(suffix * times, **kwargs)


def entry(tmp_path, rows=({"text": "a"}, {"text": 3}, {"text": "c"})):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_declared_operator_runs_binds_columns_and_fails_rows(tmp_path):
    summary = Suffix().run(FileStorage(entry(tmp_path), cache_path=tmp_path / "c").step(), output_key="loud")
    rows = [json.loads(line) for line in open(summary.output_path)]
    assert [row["loud"] for row in rows] == ["a!", "", "c!"]
    assert rows[1]["error"] == "Suffix: key 'text': not a string" and summary.errors == 1
    with pytest.raises(KeyError, match="no row has key 'words'"):
        Suffix().run(FileStorage(entry(tmp_path), cache_path=tmp_path / "d").step(), input_key="words")
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_kye'"):
        Suffix().run(FileStorage(entry(tmp_path), cache_path=tmp_path / "e").step(), output_kye="x")


def test_constructor_arguments_are_recorded_and_fingerprinted_without_params(tmp_path):
    assert Suffix("?").arguments == {"suffix": "?", "save_interval": 2, "strict": False}
    assert Suffix().settings.save_interval == 2
    params = Suffix("?").params()["arguments"]
    assert params == {"suffix": "?"}  # save_interval and strict decide how, not what
    # An argument added by a subclass changes the fingerprint with no other edit.
    assert LoudSuffix(times=2).arguments["times"] == 2
    assert LoudSuffix(times=2).params() != LoudSuffix(times=1).params()
    cache = tmp_path / "c"
    first = LoudSuffix(times=1).run(FileStorage(entry(tmp_path), cache_path=cache).step())
    again = LoudSuffix(times=1, save_interval=5).run(FileStorage(entry(tmp_path), cache_path=cache).step())
    louder = LoudSuffix(times=3).run(FileStorage(entry(tmp_path), cache_path=cache).step())
    assert not first.reused and again.reused and not louder.reused
    assert json.loads(open(louder.output_path).readline())["out"] == "a!!!"


def test_run_signatures_are_the_documented_ones():
    def keywords(cls):
        parameters = inspect.signature(cls.run).parameters
        assert parameters["retry_errors"].kind is inspect.Parameter.KEYWORD_ONLY  # after the columns
        assert not parameters["retry_errors"].default
        return [(name, p.default) for name, p in parameters.items()
                if name not in ("self", "storage", "retry_errors")]

    assert keywords(PromptedImageGenerator) == [("input_conversation_key", "conversations"),
                                                ("output_image_key", "images"), ("input_prompt_key", None)]
    assert keywords(ImageCaptioner) == [("input_image_key", "images"), ("input_text_key", "text"),
                                        ("output_text_key", "text")]
    assert keywords(ImageDiffusionAugmenter) == [("input_image_key", "images"), ("input_text_key", "text"),
                                                 ("output_image_key", None)]
    assert keywords(ClipScoreEvaluator) == [("input_image_key", "images"), ("input_text_key", "text"),
                                            ("output_score_key", "clip_score")]
    for cls in (ClipScoreFilter, ImageTextMatchingFilter):
        assert keywords(cls)[-1] == ("output_score_key", None)
    assert keywords(ImageDeduplicator) == [("input_image_key", "images")]
    assert keywords(ImageDifferenceRegions) == [("input_image1_key", "image_path1"),
                                                ("input_image2_key", "image_path2"), ("output_bbox_key", "bbox_tag")]
    assert [name for name, _ in keywords(DifferenceCaptioner)][:4] == [
        "input_image1_key", "input_image2_key", "input_bbox_key", "output_bbox_key"]
    assert keywords(PromptTemplate) == [("output_key", "prompt")]
    # DataFlow-MM's visual QA keys
    assert keywords(PromptedVQAGenerator) == [("input_prompt_key", None), ("input_conversation_key", "conversations"),
                                              ("input_image_key", "images"), ("output_answer_key", "answer")]
    assert keywords(PromptTemplatedVQAGenerator) == [("input_image_key", "images"), ("output_answer_key", "answer")]
    assert keywords(ImageQAGenerator) == [("input_image_key", "images"),
                                          ("output_conversation_key", "conversations")]
    assert "output_image_key: column receiving the list of image paths" in PromptedImageGenerator.run.__doc__


def test_operators_write_no_plumbing():
    sources = {path.name: path.read_text() for path in OPERATORS.glob("*.py")}
    everything = "".join(sources.values())
    assert "def params(" not in everything and "class _Keys" not in everything
    assert "OperatorSettings(" not in everything
    # Only ImageTask writes run(): its columns are distilabel-style mappings checked there.
    assert [name for name, text in sources.items() if "def run(" in text] == ["image_task.py"]


def test_rows_per_batch_and_items_per_model_call_have_their_own_names():
    regions = ImageDifferenceRegions(input_batch_size=5)
    assert regions.input_batch_size == 5
    assert PromptTemplate("{a}").input_batch_size == 1024
    captioner = ImageCaptioner("some/model", batch_size=3)  # built lazily: nothing loads
    assert captioner.serving.batch_size == 3 and captioner.input_batch_size == 3
    assert DifferenceCaptioner(input_batch_size=6).input_batch_size == 6
    assert PromptedVQAGenerator("some/vlm").input_batch_size == 8  # the VLM serving's batch_size
    with pytest.raises(TypeError, match="batch_size"):
        ImageDifferenceRegions(batch_size=5)
