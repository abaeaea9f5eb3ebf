"""`dataflowmm export --to webdataset`: img2dataset-style tar shards read back with the
webdataset library and with `datasets.load_dataset("webdataset")`, byte for byte and pixel
for pixel; shard splitting, per-shard parquet, stats, resume and start-over."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dataflowmm.cli import main
from dataflowmm.export import export_step
from dataflowmm.export import training_rows as training_rows_module
from dataflowmm.export import webdataset as exporter
from dataflowmm.io.images import image_to_str

wds = pytest.importorskip("webdataset")


def noise(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(image: Image.Image) -> list:
    return np.asarray(image.convert("RGB")).tolist()


@pytest.fixture
def step(tmp_path) -> Path:
    """A step file with PNG and JPEG files, a base64 image, a list-of-images column with a
    gap, an error row and a row without image: rows 0, 1, 3, 5, 6 are exported."""
    folder = tmp_path / "cache" / "imgs"
    folder.mkdir(parents=True)
    noise(0).save(folder / "0.png")
    noise(1).save(folder / "1.jpg", quality=90)
    noise(2).save(folder / "2.png")
    rows = [
        {"caption": "a cat", "image": "imgs/0.png", "views": ["imgs/1.jpg", None, "imgs/2.png"], "score": 0.5,
         "error": None},
        {"caption": "a dog", "image": "imgs/1.jpg", "views": [], "score": 0.25, "error": None},
        {"caption": "failed", "image": None, "views": [], "score": None, "error": "ImageGeneration: HTTP 500"},
        {"caption": "", "prompt": "a bird", "image": image_to_str(noise(3)), "views": None, "score": 1.0,
         "error": None},
        {"caption": "no picture", "image": None, "views": [None], "score": 0.0, "error": None},
        {"caption": None, "image": None, "views": ["imgs/2.png"], "score": 2.0, "error": None},
        {"caption": "last", "image": "imgs/0.png", "views": ["imgs/0.png"], "score": 3.0, "error": None},
    ]
    path = tmp_path / "cache" / "dataflow_cache_step_step1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_samples(step: Path) -> dict[str, dict[str, bytes]]:
    """The members each exported row's sample must hold (the format, spelled out)."""
    rows = [json.loads(line) for line in step.read_text().splitlines()]
    data = {name: (step.parent / "imgs" / name).read_bytes() for name in ("0.png", "1.jpg", "2.png")}
    inline = base64.b64decode(rows[3]["image"])

    def sample(index, images, text, **replaced):
        key = f"{index:09d}"
        members = {f"{key}.{name}": content for name, content in images.items()}
        members[f"{key}.json"] = json.dumps({**rows[index], **replaced}, separators=(",", ":")).encode() + b"\n"
        if text is not None:
            members[f"{key}.txt"] = text.encode()
        return members

    return {
        "000000000": sample(0, {"png": data["0.png"], "views.0.jpg": data["1.jpg"], "views.2.png": data["2.png"]},
                            "a cat", image="000000000.png",
                            views=["000000000.views.0.jpg", None, "000000000.views.2.png"]),
        "000000001": sample(1, {"jpg": data["1.jpg"]}, "a dog", image="000000001.jpg"),
        "000000003": sample(3, {"png": inline}, "a bird", image="000000003.png"),
        "000000005": sample(5, {"png": data["2.png"]}, None, views=["000000005.png"]),
        "000000006": sample(6, {"png": data["0.png"], "views.0.png": data["0.png"]}, "last", image="000000006.png",
                            views=["000000006.views.0.png"]),
    }


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.mode == 0o644 and m.uid == 0 and m.isfile() for m in members)
        return {m.name: tar.extractfile(m).read() for m in members}


def shard_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.suffix in (".tar", ".parquet")}


def test_shards_hold_img2dataset_samples_read_back_by_webdataset(tmp_path, step):
    out = export_step(step, "webdataset", tmp_path / "shards", shard_size=2).path
    expected = expected_samples(step)
    assert sorted(shard_files(out)) == ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar",
                                        "00002.parquet", "00002.tar"]
    # byte for byte, shard by shard: 5 exported rows, 2 per shard
    keys = list(expected)
    for shard, shard_keys in enumerate([keys[0:2], keys[2:4], keys[4:]]):
        assert tar_members(out / f"{shard:05d}.tar") == {n: b for k in shard_keys for n, b in expected[k].items()}
        table = pq.read_table(out / f"{shard:05d}.parquet").to_pylist()
        assert [row["key"] for row in table] == shard_keys
        rows = [{"key": k, **json.loads(expected[k][f"{k}.json"])} for k in shard_keys]
        columns = list(dict.fromkeys(name for row in rows for name in row))  # a column some rows lack: None
        assert table == [{name: row.get(name) for name in columns} for row in rows]

    stats = json.loads((out / "stats.json").read_text())
    assert {k: stats[k] for k in ("rows", "exported", "left_out_error", "left_out_no_image", "dropped_by_filter",
                                  "shards", "shard_size", "resumed_shards", "image_columns", "text_column",
                                  "text_from", "without_text")} == {
        "rows": 7, "exported": 5, "left_out_error": 1, "left_out_no_image": 1, "dropped_by_filter": 0,
        "shards": 3, "shard_size": 2, "resumed_shards": 0, "image_columns": ["image", "views"],
        "text_column": None, "text_from": {"caption": 3, "prompt": 1}, "without_text": 1}

    urls = [str(out / f"{shard:05d}.tar") for shard in range(3)]
    raw = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [sample["__key__"] for sample in raw] == keys
    for sample in raw:
        key = sample["__key__"]
        assert {f"{key}.{field}": data for field, data in sample.items() if not field.startswith("__")} == expected[key]
    decoded = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")}
    source = {name: Image.open(step.parent / "imgs" / name) for name in ("0.png", "1.jpg", "2.png")}
    assert pixels(decoded["000000000"]["png"]) == pixels(source["0.png"])
    assert pixels(decoded["000000000"]["views.0.jpg"]) == pixels(source["1.jpg"])  # the same JPEG bytes
    assert pixels(decoded["000000000"]["views.2.png"]) == pixels(source["2.png"])
    assert pixels(decoded["000000001"]["jpg"]) == pixels(source["1.jpg"])
    assert pixels(decoded["000000003"]["png"]) == pixels(noise(3))
    assert decoded["000000003"]["json"]["prompt"] == "a bird" and decoded["000000003"]["txt"] == "a bird"
    assert "txt" not in decoded["000000005"]


def test_load_dataset_webdataset_reads_the_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for index in range(5):
        noise(index).save(folder / f"{index}.png")
        rows.append({"prompt": f"shape {index}", "image": f"imgs/{index}.png", "error": None})
    step = tmp_path / "step.jsonl"
    step.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = export_step(step, "webdataset", tmp_path / "shards", shard_size=2).path
    dataset = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out.glob("*.tar"))},
                                    split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert isinstance(dataset.features["png"], datasets.Image)
    assert dataset["__key__"] == [f"{index:09d}" for index in range(5)]
    for index, sample in enumerate(dataset):
        assert pixels(sample["png"]) == pixels(noise(index))
        assert sample["txt"] == f"shape {index}"
        assert sample["json"] == {**rows[index], "image": f"{index:09d}.png"}


def test_two_exports_are_byte_identical_and_a_text_column_can_be_named(tmp_path, step):
    first = shard_files(export_step(step, "webdataset", tmp_path / "a", shard_size=2).path)
    assert shard_files(export_step(step, "webdataset", tmp_path / "b", shard_size=2).path) == first
    out = export_step(step, "webdataset", tmp_path / "c", shard_size=10, text_column="score").path
    members = tar_members(out / "00000.tar")
    assert members["000000000.txt"] == b"0.5" and members["000000003.txt"] == b"1.0"
    with pytest.raises(KeyError, match="no row has column 'title'"):
        export_step(step, "webdataset", tmp_path / "d", text_column="title")


def test_an_interrupted_export_resumes_at_the_first_unfinished_shard(tmp_path, step, monkeypatch):
    reference = shard_files(export_step(step, "webdataset", tmp_path / "reference", shard_size=2).path)
    out = tmp_path / "shards"
    add_member = exporter._TarWriter.add

    def killed_in_shard_2(tar, name, data):
        if name.startswith("000000006"):
            raise KeyboardInterrupt
        add_member(tar, name, data)

    monkeypatch.setattr(exporter._TarWriter, "add", killed_in_shard_2)
    with pytest.raises(KeyboardInterrupt):
        export_step(step, "webdataset", out, shard_size=2)
    monkeypatch.setattr(exporter._TarWriter, "add", add_member)
    assert sorted(path.name for path in out.iterdir()) == [".export.json", "00000.parquet", "00000.tar",
                                                           "00001.parquet", "00001.tar"]
    (out / ".00002.tar.x1y2.tmp").write_bytes(b"half a shard")  # as a killed process leaves it
    (out / "00002.tar").write_bytes(b"a tar whose parquet never came")
    before = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in reference
              if name < "00002"}

    image_reads = []
    image_ref = training_rows_module.image_ref

    def recording_image_ref(value, base_dir, where):
        image_reads.append(where.split(": ", 1)[1])
        return image_ref(value, base_dir, where)

    monkeypatch.setattr(training_rows_module, "image_ref", recording_image_ref)
    result = CliRunner().invoke(main, ["export", str(step), "--to", "webdataset", str(out), "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert "resumed: 2 finished shard(s) kept" in result.output
    assert image_reads == ["row 6, column 'image'", "row 6, column 'views'[0]"]  # finished rows: not read
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in before} == before
    assert shard_files(out) == reference
    assert sorted(path.name for path in out.iterdir()) == [".export.json", *reference, "stats.json"]
    stats, fresh = (json.loads((folder / "stats.json").read_text()) for folder in (out, tmp_path / "reference"))
    assert stats["resumed_shards"] == 2 and fresh["resumed_shards"] == 0
    for name in ("seconds", "resumed_shards"):
        del stats[name], fresh[name]
    assert stats == fresh  # the finished shards' rows counted as well

    # a shard whose parquet is missing is unfinished: it and the ones after it are rewritten
    (out / "00001.parquet").unlink()
    kept = (out / "00000.tar").stat().st_ino
    assert json.loads((out / "stats.json").read_text())["resumed_shards"] == 2
    export_step(step, "webdataset", out, shard_size=2)
    assert json.loads((out / "stats.json").read_text())["resumed_shards"] == 1
    assert (out / "00000.tar").stat().st_ino == kept and shard_files(out) == reference


def test_other_options_or_another_step_file_start_over(tmp_path, step):
    out = tmp_path / "shards"
    export_step(step, "webdataset", out, shard_size=2)
    export_step(step, "webdataset", out, shard_size=3)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"] == 2 and stats["resumed_shards"] == 0
    assert sorted(p.name for p in out.glob("0*")) == ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    export_step(step, "webdataset", out, shard_size=3, text_column="caption")
    assert json.loads((out / "stats.json").read_text())["resumed_shards"] == 0
    export_step(step, "webdataset", out, shard_size=3, text_column="caption")
    assert json.loads((out / "stats.json").read_text())["resumed_shards"] == 2

    with open(step, "a") as file:  # the step file changed: a new row, a new fingerprint
        file.write(json.dumps({"caption": "new", "image": "imgs/2.png", "views": [], "error": None}) + "\n")
    export_step(step, "webdataset", out, shard_size=3, text_column="caption")
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["resumed_shards"], stats["exported"], stats["shards"]) == (0, 6, 2)
    assert "000000007.png" in tar_members(out / "00001.tar")


def test_bad_image_bytes_stop_the_export_and_nothing_is_half_written(tmp_path, step):
    (step.parent / "imgs" / "secret.png").write_text("AWS_SECRET_ACCESS_KEY=...\n")
    with open(step, "a") as file:
        file.write(json.dumps({"caption": "bad", "image": "imgs/secret.png", "views": [], "error": None}) + "\n")
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["export", str(step), "--to", "webdataset", str(out), "--shard-size", "2"])
    assert result.exit_code != 0
    assert "row 7, column 'image'" in result.output and "not an image" in result.output
    # shards 0 and 1 are finished; shard 2 (rows 6 and 7) never reached its name
    assert sorted(path.name for path in out.iterdir()) == [".export.json", "00000.parquet", "00000.tar",
                                                           "00001.parquet", "00001.tar"]
    assert b"AWS_SECRET" not in b"".join(shard_files(out).values())


def test_folders_holding_other_shards_are_left_alone(tmp_path, step):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(FileExistsError, match="did not write"):
        export_step(step, "webdataset", out)
    assert (out / "00000.tar").read_bytes() == b"someone else's shard"


def test_cli_exports_to_webdataset_and_says_what_it_left_out(tmp_path, step):
    out = tmp_path / "shards"
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(step), "--to", "webdataset", str(out), "--shard-size", "2",
                                  "--text-column", "caption"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"exported 5 of 7 rows -> {out} (3 shards, written from the start); "
                                     "left out: 1 with errors, 1 without an image")
    assert tar_members(out / "00001.tar").keys() == {"000000003.png", "000000003.json", "000000005.png",
                                                     "000000005.json"}  # caption "" and None: no .txt
    result = runner.invoke(main, ["export", str(step), "--to", "webdataset", str(out), "--shard-size", "2",
                                  "--text-column", "caption"])
    assert "resumed: 3 finished shard(s) kept" in result.output
    result = runner.invoke(main, ["export", str(step), "--to", "hf", str(tmp_path / "hf"), "--shard-size", "2"])
    assert result.exit_code == 2 and "--to hf takes no options, got shard_size" in result.output
    result = runner.invoke(main, ["export", str(step), "--to", "webdataset", str(tmp_path / "x"),
                                  "--image-column", "caption"])
    assert result.exit_code != 0 and "row 0, column 'caption'" in result.output


def test_tar_members_are_plain_bytes(tmp_path, step):
    """The json member is the row with image values replaced, as orjson writes it."""
    out = export_step(step, "webdataset", tmp_path / "shards").path
    members = tar_members(out / "00000.tar")
    row = json.loads(members["000000001.json"])
    assert row == {"caption": "a dog", "image": "000000001.jpg", "views": [], "score": 0.25, "error": None}
    assert Image.open(io.BytesIO(members["000000001.jpg"])).format == "JPEG"


def test_finished_shards_that_do_not_hold_the_expected_rows_start_the_export_over(tmp_path, step):
    reference = shard_files(export_step(step, "webdataset", tmp_path / "reference", shard_size=2).path)
    out = export_step(step, "webdataset", tmp_path / "shards", shard_size=2).path
    import pyarrow as pa

    def resumed() -> int:
        export_step(step, "webdataset", out, shard_size=2)
        assert shard_files(out) == reference
        return json.loads((out / "stats.json").read_text())["resumed_shards"]

    table = pq.read_table(out / "00000.parquet")
    pq.write_table(table.slice(0, 1), out / "00000.parquet")  # a short shard before others
    assert resumed() == 0
    pq.write_table(table.set_column(0, "key", pa.array(["000000000", "000000002"])), out / "00000.parquet")
    assert resumed() == 0  # a shard holding other rows
    (out / "00001.parquet").write_bytes(b"not parquet")
    assert resumed() == 1  # an unreadable parquet: its shard is unfinished


def test_tar_writer_writes_the_bytes_tarfile_writes():
    members = [("000000001.png", b""), ("000000001.json", b"x" * 511), ("n" * 100, b"y" * 512),
               ("000000002." + "c" * 120 + ".0.png", b"z" * 513), ("000000003.txt", b"caf\xc3\xa9" * 700)]
    ours = io.BytesIO()
    writer = exporter._TarWriter(ours)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    theirs = io.BytesIO()
    with tarfile.open(fileobj=theirs, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(exporter._member_info(name, len(data)), io.BytesIO(data))
    assert ours.getvalue() == theirs.getvalue()


def test_per_shard_parquet_keeps_columns_arrow_cannot_type_as_json_text(tmp_path, step):
    rows = [json.loads(line) for line in step.read_text().splitlines()]
    rows[0].update(mixed=1, empty={}, nested={"k": [1]}, key="the row's own")
    rows[1].update(mixed="one", empty={}, nested={"k": []})
    step.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = export_step(step, "webdataset", tmp_path / "shards", shard_size=2).path
    table = pq.read_table(out / "00000.parquet").to_pylist()
    assert [(row["mixed"], row["empty"], row["nested"]) for row in table] == [
        ("1", "{}", {"k": [1]}), ('"one"', "{}", {"k": []})]
    assert [row["key"] for row in table] == ["000000000", "000000001"]
    members = tar_members(out / "00000.tar")
    assert json.loads(members["000000000.json"])["key"] == "the row's own"  # the json is the row
    assert json.loads(members["000000001.json"])["mixed"] == "one"
