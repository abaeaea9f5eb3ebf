import pytest
from PIL import Image

from dataflowmm.io import (
    ImageReadError,
    base64_to_files,
    decode_base64,
    encode_base64,
    image_file_name,
    load_image,
    save_png,
)
from dataflowmm.io.paths import relative_paths, resolve_paths


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 3), 200).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (200, 200, 200)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"image not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageReadError, match=r"cannot read image .*bad\.png"):
        load_image(tmp_path / "bad.png")


def test_file_names_come_from_row_identity_only():
    assert image_file_name("0123abcd", 2, 1) == "0123abcd_2_1.png"


def test_save_png_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = save_png(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "sub" / "x.png")
    assert load_image(path).getpixel((3, 3)) == (1, 2, 3)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_base64_round_trip_and_data_uri(tmp_path):
    image = Image.new("RGB", (6, 2), (9, 99, 199))
    text = encode_base64(image)
    assert decode_base64(text).tobytes() == image.tobytes()
    assert decode_base64("data:image/png;base64," + text).tobytes() == image.tobytes()
    with pytest.raises(ImageReadError, match="cannot decode base64"):
        decode_base64("not base64 at all!")
    paths = base64_to_files([text, None, text], tmp_path / "out", stem="row")
    assert paths[1] is None and paths[0].endswith("row_0.png") and paths[2].endswith("row_2.png")
    assert load_image(paths[2]).tobytes() == image.tobytes()


def test_paths_resolve_against_a_folder_and_back(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    absolute = resolve_paths(["pics/a.png", "https://x/y.png", None], data)
    assert absolute == [str(data / "pics" / "a.png"), "https://x/y.png", None]
    assert relative_paths(absolute, cache) == ["../data/pics/a.png", "https://x/y.png", None]


def test_read_image_file_checks_the_header_and_decodes_nothing(tmp_path):
    import struct
    import zlib

    from dataflowmm.io.images import read_image_file

    Image.new("RGB", (7, 5), (1, 2, 3)).save(tmp_path / "rgb.png")
    Image.new("RGBA", (7, 5)).save(tmp_path / "rgba.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    assert read_image_file(tmp_path / "rgb.png")[1:] == ("PNG", "RGB", (7, 5))  # from the IHDR chunk
    assert read_image_file(tmp_path / "rgb.png").data == (tmp_path / "rgb.png").read_bytes()
    assert read_image_file(tmp_path / "rgba.png")[1:] == ("PNG", "RGBA", (7, 5))  # Pillow's header parse
    assert read_image_file(tmp_path / "photo.jpg")[1:] == ("JPEG", "RGB", (4, 4))
    # A header claiming 100000 x 100000 pixels: refused before anything is decoded.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    with pytest.raises(ImageReadError, match="100000x100000 pixels is over the decompression-bomb limit"):
        read_image_file(tmp_path / "bomb.png")
    (tmp_path / "secret.png").write_text("aws_secret_access_key = abc")
    with pytest.raises(ImageReadError, match=r"secret\.png: not an image \(text\)"):
        read_image_file(tmp_path / "secret.png")
    with pytest.raises(ImageReadError, match="image not found"):
        read_image_file(tmp_path)
