"""The README's code that a user copies must run."""

import json
import re
from pathlib import Path

from dataflowmm import FileStorage

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> str:
    section = README.read_text(encoding="utf-8").split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_write_your_own_operator_example(tmp_path):
    entry = tmp_path / "rows.jsonl"
    entry.write_text(json.dumps({"prompt": "a fox"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    example = readme_block("Write your own operator")
    assert len(example.strip().splitlines()) <= 25  # a whole operator, small enough to read at once
    exec(example, {"storage": storage})
    rows = [json.loads(line) for line in open(tmp_path / "cache" / "dataflow_cache_step_step1.jsonl")]
    assert rows[0]["loud"] == "A FOX" and rows[0]["error"] is None
    assert rows[1]["loud"] is None and "not a string" in rows[1]["error"]


def test_reading_webdataset_shards_back_example(tmp_path, monkeypatch, capsys):
    """The "WebDataset shards" example reads an export back with webdataset and datasets."""
    import functools

    import pytest
    from PIL import Image

    datasets = pytest.importorskip("datasets")
    pytest.importorskip("webdataset")
    from dataflowmm.export import export_step

    for index in range(3):
        Image.new("RGB", (8 + index, 8), (index * 60, 0, 0)).save(tmp_path / f"{index}.png")
    step = tmp_path / "step.jsonl"
    step.write_text("".join(json.dumps({"caption": f"red {index}", "image": f"{index}.png", "error": None}) + "\n"
                            for index in range(3)))
    export_step(step, "webdataset", tmp_path / "shards", shard_size=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset",  # its cache in the test's folder, not the user's
                        functools.partial(datasets.load_dataset, cache_dir=str(tmp_path / "hf_cache")))
    exec(readme_block("WebDataset shards"), {})
    assert capsys.readouterr().out.splitlines() == ["(8, 8) red 0", "(9, 8) red 1", "(10, 8) red 2",
                                                    "(8, 8) red 0 red 0"]


def test_start_from_your_own_dataset_example(tmp_path, monkeypatch):
    """The README's dataset-entry example on a saved dataset, with the tiny BLIP in place of
    the hub model (the only change): a small image is dropped, the others captioned."""
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (48, 40), "red"), Image.new("RGB", (16, 16), "blue"), Image.new("RGB", (40, 48), "green")]
    datasets.Dataset.from_dict({"image": images, "name": ["a", "b", "c"]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "my_dataset"))
    monkeypatch.chdir(tmp_path)
    example = readme_block("Start from your own dataset")
    assert '"Salesforce/blip-image-captioning-base"' in example
    exec(example.replace('"Salesforce/blip-image-captioning-base"', '"tiny:tiny-blip"'), {})
    kept = [json.loads(line) for line in open(tmp_path / "cache" / "dataflow_cache_step_step1.jsonl")]
    dropped = [json.loads(line) for line in open(tmp_path / "cache" / "dataflow_cache_step_step1.dropped.jsonl")]
    assert [row["name"] for row in kept] == ["a", "c"] and [row["name"] for row in dropped] == ["b"]
    captioned = [json.loads(line) for line in open(tmp_path / "cache" / "dataflow_cache_step_step2.jsonl")]
    assert [row["name"] for row in captioned] == ["a", "c"] and all(row["caption"] for row in captioned)
    assert captioned[0]["image"] == "dataflow_cache_step_entry_images/000000000_image.png"
