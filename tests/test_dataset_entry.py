"""Datasets as a pipeline's entry: a `save_to_disk` folder, a parquet with image bytes and
WebDataset shards stream into rows whose image columns are paths, with stable identities."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.export import export_step
from dataflowmm.io.records import StorageError, read_records
from dataflowmm.operators import ImageDeduplicator

datasets = pytest.importorskip("datasets")


def noise(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def hf_folder(tmp_path) -> tuple[Path, list[Image.Image]]:
    """A saved dataset: an Image column (row 3 repeats row 0's image), a list of images, text."""
    images = [noise(seed) for seed in range(3)]
    features = datasets.Features({"image": datasets.Image(), "views": datasets.List(datasets.Image()),
                                  "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": encoded(images[i % 3]), "path": None} for i in (0, 1, 2, 0)],
            "views": [[{"bytes": encoded(images[2], "JPEG"), "path": None}], [], [], []],
            "caption": ["zero", "one", "two", "zero again"]}
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder, images


def dedup_step(entry: Path, cache: Path):
    storage = FileStorage(entry, cache_path=cache)
    summary = ImageDeduplicator(similarity_threshold=None, keep_dropped=True).run(
        storage.step(), input_image_key="image")
    return storage, summary


def test_a_saved_dataset_is_a_pipeline_entry_with_images_as_paths(tmp_path, hf_folder):
    folder, images = hf_folder
    storage, summary = dedup_step(folder, tmp_path / "cache")
    assert (summary.rows_in, summary.rows_out, summary.rows_dropped) == (4, 3, 1)  # row 3 repeats row 0
    entry = tmp_path / "cache" / "dataflow_cache_step_entry.jsonl"
    rows = read_records(entry)
    assert rows[0]["image"] == "dataflow_cache_step_entry_images/000000000_image.png"
    assert rows[0]["views"] == ["dataflow_cache_step_entry_images/000000000_views_0.jpg"]
    assert rows[1]["views"] == [] and rows[3]["caption"] == "zero again"
    for row, image in zip(rows, [images[0], images[1], images[2], images[0]], strict=True):
        assert np.array_equal(pixels(entry.parent / row["image"]), np.asarray(image))
    # the JPEG's bytes are kept as they are, never re-encoded
    assert (entry.parent / rows[0]["views"][0]).read_bytes() == encoded(images[2], "JPEG")
    kept = read_records(summary.output_path)
    assert [row["caption"] for row in kept] == ["zero", "one", "two"]


def test_the_conversion_is_reused_until_the_dataset_changes(tmp_path, hf_folder):
    folder, _ = hf_folder
    dedup_step(folder, tmp_path / "cache")
    entry = tmp_path / "cache" / "dataflow_cache_step_entry.jsonl"
    first = entry.read_bytes(), entry.stat().st_mtime_ns
    storage, summary = dedup_step(folder, tmp_path / "cache")
    assert summary.reused and (entry.read_bytes(), entry.stat().st_mtime_ns) == first
    # the same dataset converted elsewhere gives the same rows: identities are stable
    dedup_step(folder, tmp_path / "cache2")
    assert (tmp_path / "cache2" / entry.name).read_bytes() == first[0]
    changed = datasets.Dataset.from_dict({"image": [{"bytes": encoded(noise(9)), "path": None}]},
                                         features=datasets.Features({"image": datasets.Image()}))
    changed.save_to_disk(str(tmp_path / "hf2"))
    os.replace(folder, tmp_path / "old")
    os.replace(tmp_path / "hf2", folder)
    storage, summary = dedup_step(folder, tmp_path / "cache")
    assert not summary.reused and summary.rows_in == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "dataflow_cache_step_entry_images").iterdir()) == [
        "000000000_image.png"]  # the earlier dataset's images are gone


def test_a_pipeline_starts_from_what_it_exported(tmp_path, hf_folder):
    folder, _ = hf_folder
    storage, summary = dedup_step(folder, tmp_path / "cache")
    export_step(summary.output_path, "parquet", tmp_path / "out.parquet")
    export_step(summary.output_path, "hf", tmp_path / "out_hf")
    source = read_records(summary.output_path)
    for entry in (tmp_path / "out.parquet", tmp_path / "out_hf"):
        cache = tmp_path / f"again_{entry.stem}"
        _, again = dedup_step(entry, cache)
        rows = read_records(again.output_path)
        assert [row["caption"] for row in rows] == [row["caption"] for row in source]
        for before, after in zip(source, rows, strict=True):
            assert np.array_equal(pixels(Path(summary.output_path).parent / before["image"]),
                                  pixels(cache / after["image"]))


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for extension, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_are_an_entry(tmp_path):
    images = [noise(seed) for seed in range(3)]
    shards = tmp_path / "shards"
    shards.mkdir()
    # img2dataset's layout: jpg + txt + json of metadata
    write_shard(shards / "00000.tar", [
        {"__key__": "000000000", "jpg": encoded(images[0], "JPEG"), "txt": b"a cat",
         "json": json.dumps({"caption": "a cat", "url": "http://x/0.jpg"}).encode()},
        {"__key__": "000000001", "png": encoded(images[1]), "txt": b"a dog"},
    ])
    # dataflowmm's layout: the row's image columns name the sample's members
    write_shard(shards / "00001.tar", [
        {"__key__": "000000005", "png": encoded(images[2]), "views.0.png": encoded(images[0]),
         "json": json.dumps({"id": "r5", "image": "000000005.png", "views": ["000000005.views.0.png"]}).encode()},
    ])
    storage = FileStorage(shards, cache_path=tmp_path / "cache")
    rows = read_records(storage.step().input_path)
    images_dir = "dataflow_cache_step_entry_images"
    assert rows == [
        {"caption": "a cat", "url": "http://x/0.jpg", "image": f"{images_dir}/000000000_image.jpg"},
        {"key": "000000001", "text": "a dog", "image": f"{images_dir}/000000001_image.png"},
        {"id": "r5", "image": f"{images_dir}/000000002_image.png", "views": [f"{images_dir}/000000002_views_0.png"]},
    ]
    assert (tmp_path / "cache" / rows[0]["image"]).read_bytes() == encoded(images[0], "JPEG")
    assert np.array_equal(pixels(tmp_path / "cache" / rows[2]["views"][0]), np.asarray(images[0]))
    one = FileStorage(shards / "00001.tar", cache_path=tmp_path / "cache_one")  # a single shard too
    assert read_records(one.step().input_path)[0]["id"] == "r5"


def test_unusable_datasets_are_named(tmp_path, hf_folder):
    folder, _ = hf_folder
    dataset_dict = datasets.DatasetDict({"train": datasets.load_from_disk(str(folder)),
                                         "test": datasets.load_from_disk(str(folder))})
    dataset_dict.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(StorageError, match=r"dd: a DatasetDict folder holds splits test, train; give one split"):
        FileStorage(tmp_path / "dd", cache_path=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="neither a datasets save_to_disk folder"):
        FileStorage(tmp_path / "empty", cache_path=tmp_path / "cache")
    bad = datasets.Dataset.from_dict({"image": [{"bytes": encoded(noise(1)), "path": None},
                                                {"bytes": b"%PDF-1.4 not an image", "path": None}]},
                                     features=datasets.Features({"image": datasets.Image()}))
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    storage = FileStorage(tmp_path / "bad.parquet", cache_path=tmp_path / "cache")
    with pytest.raises(StorageError) as raised:
        _ = storage.step().input_path
    assert str(raised.value).startswith(f"cannot read {tmp_path / 'bad.parquet'}: row 1, column 'image': format PDF is not read")
    assert not (tmp_path / "cache" / "dataflow_cache_step_entry.jsonl").exists()


def test_a_pipeline_starts_from_its_webdataset_export(tmp_path, hf_folder):
    folder, _ = hf_folder
    _, summary = dedup_step(folder, tmp_path / "cache")
    export_step(summary.output_path, "webdataset", tmp_path / "shards", shard_size=2)
    _, again = dedup_step(tmp_path / "shards", tmp_path / "again")
    source, rows = read_records(summary.output_path), read_records(again.output_path)
    assert len(rows) == len(source) == 3
    for before, after in zip(source, rows, strict=True):
        assert {k: v for k, v in after.items() if k not in ("image", "views")} == {
            k: v for k, v in before.items() if k not in ("image", "views")}
        assert len(after["views"]) == len(before["views"])
        pairs = [(before["image"], after["image"]), *zip(before["views"], after["views"], strict=True)]
        for old, new in pairs:  # the same bytes, under the entry's own names
            assert (Path(summary.output_path).parent / old).read_bytes() == (tmp_path / "again" / new).read_bytes()
