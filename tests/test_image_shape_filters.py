"""ImageSizeFilter, ImageShapeFilter, ImageAspectRatioFilter: Data-Juicer's parameters and
verdicts (inclusive bounds, any/all, rows without images kept), read from image headers,
failed rows kept with their error, dropped rows kept aside with the value and the bound."""

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.operators import ImageAspectRatioFilter, ImageShapeFilter, ImageSizeFilter
from dataflowmm.operators.image_shape_filters import size_to_bytes


def bmp_bytes(width: int, height: int) -> int:
    """A 24-bit BMP's size: 54 header bytes and rows padded to 4 bytes (exact on any machine)."""
    return 54 + height * ((3 * width + 3) // 4 * 4)


@pytest.fixture
def pics(tmp_path):
    folder = tmp_path / "data" / "pics"
    folder.mkdir(parents=True)
    for name, size in {"square": (16, 16), "wide": (32, 8), "tall": (8, 32), "half": (16, 32),
                       "w15": (15, 16), "w17": (17, 16), "w12": (12, 16), "w20": (20, 16)}.items():
        Image.new("RGB", size, (200, 40, 40)).save(folder / f"{name}.bmp")
    (folder / "corrupt.png").write_bytes(b"not a png")
    # A PNG cut inside its pixel data: the header says 64x48; its pixels cannot be decoded.
    Image.new("RGB", (64, 48), (1, 2, 3)).save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[:whole.index(b"IDAT") + 8])
    return folder


def run(tmp_path, rows, operator, cache="cache", **keys):
    entry = tmp_path / "data" / "rows.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = operator.run(FileStorage(entry, cache_path=tmp_path / cache).step(), **keys)
    kept = [json.loads(line) for line in open(summary.output_path)]
    side = Path(summary.output_path.replace(".jsonl", ".dropped.jsonl"))
    dropped = [json.loads(line) for line in side.read_text().splitlines()] if side.exists() else []
    return summary, kept, dropped


def ids(rows):
    return [row["id"] for row in rows]


def test_size_strings_are_read_as_data_juicer_reads_them():
    assert size_to_bytes("0") == 0 and size_to_bytes("4096") == 4096 and size_to_bytes(512) == 512
    assert size_to_bytes("10KB") == size_to_bytes("10kib") == 10 * 1024
    assert size_to_bytes("1MiB") == size_to_bytes("1 mb") == 1 << 20
    assert size_to_bytes("1TB") == 1 << 40 and size_to_bytes("2GB") == 2 << 30
    assert size_to_bytes("1.5KB") == 1536  # Data-Juicer drops the point (15 KB): read as written here
    for bad in ("10XB", "KB", "-5", "", "1e3", None, 1.5, True):
        with pytest.raises(ValueError, match="min_size must be a size"):
            size_to_bytes(bad, "min_size")


def test_bounds_are_inclusive(tmp_path, pics):
    rows = [{"id": name, "images": [f"pics/{name}.bmp"]} for name in ("w15", "square", "w17")]
    _, kept, _ = run(tmp_path, rows, ImageShapeFilter(min_width=16, max_width=16), cache="shape")
    assert ids(kept) == ["square"]
    rows = [{"id": name, "images": [f"pics/{name}.bmp"]} for name in ("w12", "square", "w20")]
    square = bmp_bytes(16, 16)
    _, kept, _ = run(tmp_path, rows, ImageSizeFilter(min_size=str(square), max_size=square), cache="size")
    assert ids(kept) == ["square"]  # w12's file is smaller, w20's larger
    rows = [{"id": name, "images": [f"pics/{name}.bmp"]} for name in ("half", "square", "tall", "wide")]
    _, kept, _ = run(tmp_path, rows, ImageAspectRatioFilter(min_ratio=0.5, max_ratio=1.0), cache="ratio")
    assert ids(kept) == ["half", "square"]  # 16/32 is exactly min_ratio


def test_defaults_are_data_juicers(tmp_path, pics):
    Image.new("RGB", (30, 10)).save(pics / "three.bmp")  # exactly max_ratio 3.0
    rows = [{"id": name, "images": f"pics/{name}.bmp"} for name in ("square", "wide", "tall", "three")]
    _, kept, _ = run(tmp_path, rows, ImageAspectRatioFilter(), cache="ratio")
    assert ids(kept) == ["square", "three"]  # 32/8 = 4 and 8/32 = 0.25 are outside [0.333, 3.0]
    for default in (ImageSizeFilter(), ImageShapeFilter()):  # "0".."1TB", 1..sys.maxsize: keep all
        _, kept, _ = run(tmp_path, rows, default, cache=default.name)
        assert ids(kept) == ids(rows)


ROWS = [
    {"id": 0, "images": ["pics/square.bmp"]},
    {"id": 1, "images": ["pics/wide.bmp", "pics/square.bmp"]},  # one of two too wide
    {"id": 2, "images": []},  # no images: kept, as Data-Juicer
    {"id": 3, "images": ["pics/wide.bmp", "pics/tall.bmp"]},  # both out
    {"id": 4, "images": ["pics/corrupt.png"]},  # unreadable: kept with its error
    {"id": 5, "images": "pics/tall.bmp"},  # one path, not a list
    {"id": 6},  # no image column at all: kept
]


@pytest.mark.parametrize("any_or_all, kept_ids", [("any", [0, 1, 2, 4, 6]), ("all", [0, 2, 4, 6])])
def test_any_or_all_over_a_rows_images(tmp_path, pics, any_or_all, kept_ids):
    op = ImageShapeFilter(max_width=16, max_height=16, any_or_all=any_or_all)
    summary, kept, _ = run(tmp_path, ROWS, op)
    assert ids(kept) == kept_ids
    assert summary.rows_dropped == 7 - len(kept_ids) and summary.errors == 1
    assert all(DROPPED_KEY not in row for row in kept)


def test_dropped_rows_are_kept_aside_with_the_value_and_the_bound(tmp_path, pics):
    op = ImageShapeFilter(max_width=16, max_height=16, any_or_all="all", keep_dropped=True)
    summary, kept, dropped = run(tmp_path, ROWS, op, output_stats_key="shape")
    assert Path(summary.dropped_path).exists()
    assert {row["id"]: row[DROPPED_KEY] for row in dropped} == {
        1: "ImageShapeFilter: image 0: width 32 > max_width 16 (all)",
        3: "ImageShapeFilter: image 0: width 32 > max_width 16; image 1: height 32 > max_height 16 (all)",
        5: "ImageShapeFilter: height 32 > max_height 16 (all)",
    }
    # The stats column: [width, height] per image, on kept and dropped rows; None on a failed row.
    assert {row["id"]: row["shape"] for row in kept + dropped} == {
        0: [[16, 16]], 1: [[32, 8], [16, 16]], 2: [], 3: [[32, 8], [8, 32]], 4: None, 5: [[8, 32]], 6: []}
    assert dropped[0]["images"] == ["../data/pics/wide.bmp", "../data/pics/square.bmp"]


def test_size_and_ratio_reasons_name_the_measured_value_and_the_bound(tmp_path, pics):
    op = ImageSizeFilter(min_size="1KiB", max_size="2000", keep_dropped=True)
    _, kept, dropped = run(tmp_path, ROWS[:1] + ROWS[3:4], op, cache="size", output_stats_key="bytes")
    assert bmp_bytes(16, 16) < 1024 and bmp_bytes(32, 8) < 1024  # so both rows are too small
    assert [row[DROPPED_KEY] for row in dropped] == [
        f"ImageSizeFilter: size {bmp_bytes(16, 16)} bytes < min_size 1KiB (1024 bytes) (any)",
        f"ImageSizeFilter: image 0: size {bmp_bytes(32, 8)} bytes < min_size 1KiB (1024 bytes); "
        f"image 1: size {bmp_bytes(8, 32)} bytes < min_size 1KiB (1024 bytes) (any)"]
    assert dropped[0]["bytes"] == [bmp_bytes(16, 16)] and not kept
    op = ImageAspectRatioFilter(min_ratio=0.5, max_ratio=2.0, keep_dropped=True)
    _, _, dropped = run(tmp_path, ROWS[5:6], op, cache="ratio", output_stats_key="ratio")
    assert dropped[0][DROPPED_KEY] == "ImageAspectRatioFilter: aspect ratio 0.2500 (8x32) < min_ratio 0.5 (any)"
    assert dropped[0]["ratio"] == [0.25]


def test_an_unreadable_image_keeps_its_row_with_an_error_naming_the_key_and_file(tmp_path, pics):
    rows = [{"id": 0, "images": ["pics/square.bmp", "pics/corrupt.png"]}, {"id": 1, "images": ["pics/gone.png"]},
            {"id": 2, "images": [3]}]
    for op in (ImageSizeFilter(min_size="1MB"), ImageShapeFilter(min_width=100), ImageAspectRatioFilter()):
        summary, kept, _ = run(tmp_path, rows, op, cache=op.name, output_stats_key="stats")
        assert ids(kept) == [0, 1, 2] and summary.errors == 3 and summary.rows_dropped == 0
        assert kept[0]["error"].startswith(f"{op.name}: key 'images': cannot read image ")
        assert kept[0]["error"].endswith("corrupt.png: not an image (text); allowed formats: "
                                         "PNG, JPEG, MPO, WEBP, GIF, BMP, TIFF")
        assert kept[1]["error"] == f"{op.name}: key 'images': image not found: {pics / 'gone.png'}"
        assert "key 'images': expected a list of image paths" in kept[2]["error"]
        assert [row["stats"] for row in kept] == [None, None, None]


def test_only_headers_are_read(tmp_path, pics):
    # A file cut after its header is still measured: no pixel is decoded (a truncated image is
    # the business of an operator that reads pixels).
    rows = [{"id": 0, "images": ["pics/truncated.png"]}]
    _, kept, _ = run(tmp_path, rows, ImageShapeFilter(min_width=64, max_width=64), output_stats_key="shape")
    assert kept[0]["shape"] == [[64, 48]] and kept[0]["error"] is None


def test_an_inline_base64_image_counts_its_decoded_bytes(tmp_path, pics):
    data = (pics / "wide.bmp").read_bytes()
    inline = "data:image/bmp;base64," + base64.b64encode(data).decode()
    png = base64.b64encode((pics / "whole.png").read_bytes()).decode()  # raw base64 PNG (iVBORw0KGgo...)
    rows = [{"id": 0, "images": [inline]}, {"id": 1, "images": [png]}]
    _, kept, _ = run(tmp_path, rows, ImageSizeFilter(), cache="size", output_stats_key="bytes")
    assert [row["bytes"] for row in kept] == [[len(data)], [(pics / "whole.png").stat().st_size]]
    assert kept[0]["images"] == [inline]  # not taken for a path
    _, kept, _ = run(tmp_path, rows, ImageAspectRatioFilter(max_ratio=4), cache="ratio", output_stats_key="ratio")
    assert [row["ratio"] for row in kept] == [[4.0], [1.3333]]


def test_bad_arguments_fail_when_the_filter_is_built():
    cases = [
        (lambda: ImageSizeFilter(min_size="10XB"), "min_size must be a size .* got '10XB'"),
        (lambda: ImageSizeFilter(max_size="lots"), "max_size must be a size"),
        (lambda: ImageSizeFilter(min_size="2MB", max_size="1MB"), r"min_size \('2MB': 2097152 bytes\) must not "
                                                                 r"exceed max_size \('1MB': 1048576 bytes\)"),
        (lambda: ImageShapeFilter(min_width=10, max_width=5), r"min_width \(10\) must not exceed max_width \(5\)"),
        (lambda: ImageShapeFilter(min_height=-1), "min_height must be an int >= 0, got -1"),
        (lambda: ImageShapeFilter(max_height=10.5), "max_height must be an int"),
        (lambda: ImageAspectRatioFilter(min_ratio=2, max_ratio=1), r"min_ratio \(2\) must not exceed max_ratio"),
        (lambda: ImageAspectRatioFilter(max_ratio="3"), "max_ratio must be a number"),
        (lambda: ImageAspectRatioFilter(any_or_all="most"), "any_or_all must be 'any' or 'all', got 'most'"),
        (lambda: ImageSizeFilter(input_batch_size=0), "input_batch_size must be a positive"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()


def test_parameters_are_fingerprinted_and_a_finished_step_is_reused(tmp_path, pics):
    first, _, _ = run(tmp_path, ROWS, ImageShapeFilter(max_width=16))
    again, _, _ = run(tmp_path, ROWS, ImageShapeFilter(max_width=16, save_interval=3))
    other, kept, _ = run(tmp_path, ROWS, ImageShapeFilter(max_width=40))
    assert not first.reused and again.reused and not other.reused
    assert other.rows_dropped == 0 and len(kept) == 7
