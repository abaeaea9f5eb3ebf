"""`dataflowmm export`: a step file as a Hugging Face dataset with real Image() columns,
round-tripped pixel for pixel; images inside rows and the helpers that read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from dataflowmm.cli import main
from dataflowmm.export import export_step
from dataflowmm.io.image_columns import transform_columns_to_image
from dataflowmm.io.images import (
    ImageReadError,
    image_from_str,
    image_to_str,
)

datasets = pytest.importorskip("datasets")


def noise(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def step_file(tmp_path) -> tuple[Path, list[Image.Image]]:
    """A step file as operators write them: image paths relative to it, base64 images in
    rows, lists of paths, failed rows, and plain columns of several types."""
    images = [noise(i) for i in range(4)]
    folder = tmp_path / "cache" / "dataflow_cache_step_step1_images"
    folder.mkdir(parents=True)
    for index, image in enumerate(images[:3]):
        image.save(folder / f"row{index}.png")
    rows = [
        {"prompt": "a cat", "image": "dataflow_cache_step_step1_images/row0.png", "inline": image_to_str(images[3]),
         "images": ["dataflow_cache_step_step1_images/row1.png", "dataflow_cache_step_step1_images/row2.png"],
         "image_path": "dataflow_cache_step_step1_images/row0.png", "score": 0.5, "n": 1,
         "tags": ["x", "y"], "error": None},
        {"prompt": "a dog", "image": "dataflow_cache_step_step1_images/row1.png", "inline": image_to_str(images[0]),
         "images": [], "image_path": "dataflow_cache_step_step1_images/row1.png", "score": 0.25, "n": 2,
         "tags": [], "error": None},
        {"prompt": "<b>bad</b>", "image": None, "inline": None, "images": [], "image_path": None,
         "score": None, "n": 3, "tags": ["z"], "error": "ImageGeneration: HTTP 500"},
    ]
    path = tmp_path / "cache" / "dataflow_cache_step_step1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, images


def array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def check_round_trip(dataset, images):
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["inline"], datasets.Image)
    assert dataset.features["images"] == datasets.List(datasets.Image())
    assert dataset.features["image_path"] == datasets.Value("string")  # paths stay text
    assert dataset.features["score"] == datasets.Value("float64")
    assert dataset.features["n"] == datasets.Value("int64")
    assert dataset.features["tags"] == datasets.List(datasets.Value("string"))
    first, second, failed = dataset[0], dataset[1], dataset[2]
    assert isinstance(first["image"], Image.Image)
    assert np.array_equal(array(first["image"]), array(images[0]))
    assert np.array_equal(array(first["inline"]), array(images[3]))
    assert [array(image).tolist() for image in first["images"]] == [array(images[1]).tolist(), array(images[2]).tolist()]
    assert np.array_equal(array(second["inline"]), array(images[0]))
    assert failed["image"] is None and failed["error"] == "ImageGeneration: HTTP 500"
    assert first["prompt"] == "a cat" and first["tags"] == ["x", "y"] and second["score"] == 0.25


def test_export_to_hf_round_trips_pixel_for_pixel(tmp_path, step_file):
    path, images = step_file
    result = CliRunner().invoke(main, ["export", str(path), "--to", "hf", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # The saved dataset holds the bytes: it needs none of the step's files.
    for file in (path.parent / "dataflow_cache_step_step1_images").iterdir():
        file.unlink()
    check_round_trip(datasets.load_from_disk(str(tmp_path / "out")), images)


def test_export_to_parquet_round_trips_pixel_for_pixel(tmp_path, step_file):
    path, images = step_file
    result = CliRunner().invoke(main, ["export", str(path), "--to", "parquet", str(tmp_path / "out.parquet")])
    assert result.exit_code == 0, result.output
    check_round_trip(datasets.Dataset.from_parquet(str(tmp_path / "out.parquet")), images)


def test_a_missing_image_file_is_named(tmp_path, step_file):
    path, _ = step_file
    (path.parent / "dataflow_cache_step_step1_images" / "row1.png").unlink()
    result = CliRunner().invoke(main, ["export", str(path), "--to", "hf", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "row 0, column 'images'[0]" in result.output and "row1.png not found" in result.output


def test_export_of_a_pipeline_step_with_images_in_rows(tmp_path):
    from test_image_task import ScriptedServing, write_prompts

    from dataflowmm import FileStorage
    from dataflowmm.operators import ImageGeneration

    entry = write_prompts(tmp_path / "prompts.jsonl", ["a cat", "", "a dog"])
    for images_in_rows in (False, True):
        storage = FileStorage(entry, cache_path=tmp_path / f"cache{images_in_rows}")
        summary = ImageGeneration(ScriptedServing(), images_in_rows=images_in_rows, num_generations=2).run(storage.step())
        dataset = datasets.load_from_disk(str(export_step(summary.output_path, "hf", tmp_path / f"hf{images_in_rows}").path))
        assert len(dataset) == 5 and isinstance(dataset.features["image"], datasets.Image)
        assert dataset[0]["image"].size == (8, 8) and dataset[2]["image"] is None
        assert dataset[2]["error"].endswith("empty prompt")


# ------------------------------------------------------------- images in rows: helpers
def test_image_to_str_and_back_is_lossless_for_png():
    image = noise(7)
    assert np.array_equal(array(image_from_str(image_to_str(image))), array(image))
    assert image_from_str("data:image/png;base64," + image_to_str(image)).size == image.size
    with pytest.raises(ImageReadError, match="base64"):
        image_from_str("not an image")


def test_transform_columns_to_image_on_rows_and_dataframes(tmp_path, step_file):
    path, images = step_file
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    converted = transform_columns_to_image(rows, ["image", "inline", "images"], base_dir=path.parent)
    assert np.array_equal(array(converted[0]["image"]), array(images[0]))
    assert np.array_equal(array(converted[1]["inline"]), array(images[0]))
    assert len(converted[0]["images"]) == 2 and converted[2]["image"] is None
    assert isinstance(rows[0]["image"], str)  # the input rows are not changed
    frame = transform_columns_to_image(pd.DataFrame(rows), "inline")
    assert isinstance(frame.loc[0, "inline"], Image.Image) and list(frame.columns) == list(rows[0])
    with pytest.raises(KeyError, match="'picture'"):
        transform_columns_to_image(rows, "picture")
    with pytest.raises(ImageReadError, match="row 0, column 'prompt'"):
        transform_columns_to_image(rows, "prompt")
