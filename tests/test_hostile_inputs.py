"""Hostile inputs end as one row's error and the step finishes: a decompression bomb, a
disallowed format behind a .png name, a truncated file; export and gallery never carry a
non-image's bytes; image downloads from URL answers stay within bounds."""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.cli import main
from dataflowmm.gallery import build_gallery
from dataflowmm.io.images import ImageReadError, load_image, open_image
from dataflowmm.operators import (
    ImageCaptioner,
    ImageDeduplicator,
    ImageShapeFilter,
    ImageSizeFilter,
)

SECRET = "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def zero_png(side: int) -> bytes:
    """A real, valid greyscale PNG of side x side zero pixels, made without compressing
    side**2 bytes: after a full flush deflate's output for the same block repeats, and the
    adler-32 of all-zero data is known."""
    rows = 100
    block = b"\0" * ((side + 1) * rows)  # each row: filter byte 0, then its pixels
    compressor = zlib.compressobj(9)
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = head + repeat * (side // rows - 1) + b"\x03\x00"  # an empty final block
    stream += struct.pack(">I", (((side + 1) * side % 65521) << 16) | 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_the_crafted_bomb_is_a_real_png():
    with Image.open(io.BytesIO(zero_png(300))) as image:  # small enough to decode here
        image.load()
        assert image.size == (300, 300) and image.getextrema() == (0, 0)


@pytest.fixture
def hostile(tmp_path) -> Path:
    folder = tmp_path / "data" / "pics"
    folder.mkdir(parents=True)
    Image.new("RGB", (24, 16), (220, 30, 30)).save(folder / "red.png")
    (folder / "bomb.png").write_bytes(zero_png(20000))  # over 2x the limit: Pillow's error
    (folder / "big.png").write_bytes(zero_png(10000))  # over the limit, under 2x: Pillow only warns
    Image.new("RGB", (8, 8)).save(folder / "eps.png", format="EPS")
    Image.new("RGB", (8, 8)).save(folder / "pdf.png", format="PDF")
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer := io.BytesIO(), format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "secrets.png").write_text(SECRET + "\n")
    first, second = Image.new("RGB", (10, 10), (30, 200, 30)), Image.new("RGB", (10, 10), (0, 0, 255))
    first.save(folder / "phone.jpg", format="MPO", save_all=True, append_images=[second])
    return folder


EXPECTED = {
    "bomb.png": "over the decompression-bomb limit",
    "big.png": "10000x10000 pixels is over the decompression-bomb limit",
    "eps.png": "format EPS is not read",
    "pdf.png": "format PDF is not read",
    "truncated.png": "truncated",
    "secrets.png": "not an image (text)",
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_each_hostile_file_is_an_image_error_naming_why(hostile):
    for name, reason in EXPECTED.items():
        with pytest.raises(ImageReadError, match=re.escape(reason)):
            load_image(hostile / name)
    with Image.open(hostile / "phone.jpg") as image:
        assert image.format == "MPO"
    assert load_image(hostile / "phone.jpg").getpixel((0, 0))[1] > 180  # the first frame, green
    with pytest.raises(ImageReadError, match="format EPS is not read"):
        open_image((hostile / "eps.png").read_bytes())


class ScriptedCaptions:
    batch_size = 8

    def caption(self, images, prompts=None, seeds=None, caption_num=1):
        return [[f"a thing {image.size[0]}" for _ in range(caption_num)] for image in images]

    def config(self):
        return {"scripted": True}


def run_step(tmp_path, operator, names, cache):
    entry = tmp_path / "data" / "rows.jsonl"
    entry.write_text("".join(json.dumps({"images": [f"pics/{name}"]}) + "\n" for name in names))
    summary = operator.run(FileStorage(entry, cache_path=tmp_path / cache).step())
    return summary, [json.loads(line) for line in open(summary.output_path)]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["captioner", "deduplicator"])
def test_a_step_ends_each_hostile_file_as_its_rows_error_and_finishes(tmp_path, hostile, kind):
    names = ["red.png", *EXPECTED, "phone.jpg"]
    operator = (ImageCaptioner(ScriptedCaptions(), keep_original_sample=False) if kind == "captioner"
                else ImageDeduplicator(similarity_threshold=None))
    started = time.monotonic()
    summary, rows = run_step(tmp_path, operator, names, f"cache-{kind}")
    assert time.monotonic() - started < 10
    assert summary.errors == len(EXPECTED) and len(rows) == len(names)
    by_image = {row["images"][0].rsplit("/", 1)[-1]: row["error"] for row in rows}
    assert by_image["red.png"] is None and by_image["phone.jpg"] is None
    for name, reason in EXPECTED.items():
        assert reason in by_image[name] and name in by_image[name]
    if kind == "captioner":
        assert [row["text"] for row in rows if not row["error"]] == ["a thing 24", "a thing 10"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_header_filters_refuse_each_hostile_file_from_its_header(tmp_path, hostile):
    # Headers only: a truncated file is measured (its pixels are never decoded); the size filter
    # reads no dimensions either, so an image over the decompression-bomb limit is sized. Every
    # other hostile file is its row's error, as for an operator that decodes.
    names = ["red.png", *EXPECTED, "phone.jpg"]
    by_header = {name: reason for name, reason in EXPECTED.items() if name != "truncated.png"}
    by_first_bytes = {name: reason for name, reason in by_header.items() if name not in ("bomb.png", "big.png")}
    for operator, refused in ((ImageShapeFilter(), by_header), (ImageSizeFilter(), by_first_bytes)):
        summary, rows = run_step(tmp_path, operator, names, f"cache-{operator.name}")
        assert summary.errors == len(refused) and len(rows) == len(names)
        by_image = {row["images"][0].rsplit("/", 1)[-1]: row["error"] for row in rows}
        for name in names:
            if name in refused:
                assert refused[name] in by_image[name] and name in by_image[name]
            else:
                assert by_image[name] is None, name


# -- export and gallery: images only ---------------------------------------------------------

def step_with_secret(tmp_path, hostile, value="pics/secrets.png") -> Path:
    step = tmp_path / "data" / "step.jsonl"
    rows = [{"prompt": "fine", "image": "pics/red.png"}, {"prompt": "hostile", "image": value}]
    step.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return step


@pytest.mark.parametrize("value", ["pics/secrets.png", "SECRETS_ABSOLUTE", "data:image/png;base64,SECRET_B64"])
def test_export_refuses_a_non_image_and_writes_nothing(tmp_path, hostile, value):
    pytest.importorskip("datasets")
    import base64

    value = value.replace("SECRETS_ABSOLUTE", str(hostile / "secrets.png"))
    value = value.replace("SECRET_B64", base64.b64encode(SECRET.encode()).decode())
    step = step_with_secret(tmp_path, hostile, value)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(step), "--to", "hf", str(out), "--image-column", "image"])
    assert result.exit_code == 1
    assert "row 1, column 'image'" in result.output and "not an image (text)" in result.output
    assert "nothing exported" in result.output and not out.exists()


def test_gallery_shows_a_non_image_missing_with_the_reason_embedded_or_linked(tmp_path, hostile):
    step = step_with_secret(tmp_path, hostile)
    for embed in (True, False):
        page = build_gallery(step, tmp_path / f"g-{embed}.html", image_columns=["image"], embed=embed).read_text()
        assert SECRET not in page and "secrets.png" in page and "not an image (text)" in page
        assert page.count('"missing": ') == 1
    bomb = step_with_secret(tmp_path, hostile, "pics/bomb.png")
    page = build_gallery(bomb, tmp_path / "g-bomb.html", image_columns=["image"]).read_text()
    assert "decompression-bomb limit" in page


# -- downloads of url answers: bounded -------------------------------------------------------

def test_url_downloads_stay_within_bounds_and_each_refusal_is_its_rows_error(tmp_path):
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_images_api import LoopbackImagesAPI
    from dataflowmm.operators import ImageGeneration
    from dataflowmm.serving.api_image_gen import APIImageGenServing

    prompts = ["fine", "same host [url-redirect-same]", "file [url-file]", "elsewhere [url-redirect-host]",
               "huge [url-huge]", "slow [url-trickle]"]
    with LoopbackImagesAPI(api_key="k", hang_seconds=3, huge_bytes=2 * 2**20) as api:
        serving = APIImageGenServing("loopback-image", base_url=api.base_url, api_key="k", response_format="url",
                                     timeout=1.0, max_retries=0, max_download_bytes=2**20, max_concurrency=6)
        entry = tmp_path / "prompts.jsonl"
        entry.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        started = time.monotonic()
        summary = ImageGeneration(serving).run(FileStorage(entry, cache_path=tmp_path / "cache").step())
        elapsed = time.monotonic() - started
        assert elapsed < 5  # the trickle stopped at the 1 s deadline
    errors = {row["prompt"]: row["error"] for row in map(json.loads, open(summary.output_path))}
    assert errors["fine"] is None and errors["same host [url-redirect-same]"] is None
    failed = "ImageGeneration: downloading the image URL failed: "
    assert errors["file [url-file]"] == failed + "only http(s) URLs are downloaded, not file: URLs"
    assert errors["elsewhere [url-redirect-host]"] == \
        failed + "redirected from 127.0.0.1 to another host (localhost); not followed"
    assert errors["huge [url-huge]"] == failed + f"the image is over max_download_bytes={2**20}; stopped"
    assert errors["slow [url-trickle]"] == failed + "took longer than 1 s; stopped"
    assert summary.errors == 4 and summary.images_written == 2


def test_internal_addresses_are_refused_unless_base_url_is_internal(tmp_path):
    pytest.importorskip("openai")
    import base64

    from dataflowmm.io.downloads import is_internal
    from dataflowmm.kit.loopback_images_api import LoopbackImagesAPI
    from dataflowmm.serving.api_image_gen import APIImageGenServing, GenerationFailed

    assert [is_internal(a) for a in ("127.0.0.1", "10.1.2.3", "192.168.0.7", "169.254.169.254", "::1",
                                     "::ffff:127.0.0.1", "fe80::1", "100.64.0.1", "8.8.8.8")] == [True] * 8 + [False]
    with LoopbackImagesAPI(api_key="k") as api:
        loopback = APIImageGenServing("m", base_url=api.base_url, api_key="k", response_format="url")
        [[image]] = loopback.generate(["fine"], [0])  # a self-hosted server's own URLs are fetched
        url = api.base_url.removesuffix("/v1") + "/files/" + next(iter(api._files)) + ".png"
        public = APIImageGenServing("m", base_url="http://8.8.8.8/v1", api_key="k", timeout=2)  # never contacted
        public.load()
        with pytest.raises(GenerationFailed, match=r"host 127\.0\.0\.1 is an internal address \(127\.0\.0\.1\)"):
            public._image(SimpleNamespace(b64_json=None, url=url))
        assert image.size == (16, 16)
    bomb = SimpleNamespace(b64_json=base64.b64encode(zero_png(20000)).decode(), url=None)
    with pytest.raises(GenerationFailed, match="decompression-bomb limit"):
        public._image(bomb)
