"""ImageDeduplicator with perceptual hashes (method="phash" and Data-Juicer's other names): no
model, near duplicates by Hamming distance, the exact/near semantics of the CLIP method, resume;
and the figure: precision and recall on shapes-world near duplicates, phash against exact."""

import io
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.kit.shapes import ShapesWorld
from dataflowmm.operators import ImageDeduplicator
from dataflowmm.operators import image_deduplicator as dedup_module
from dataflowmm.operators.image_deduplicator import (
    DEFAULT_HAMMING_DISTANCE,
    HASH_METHODS,
    perceptual_hash,
)

WORLD = ShapesWorld(image_size=96)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture
def scenes(tmp_path):
    """Four distinct scenes, near copies of scenes 0 and 1, a lossless copy, a corrupt file."""
    folder = tmp_path / "data" / "pics"
    folder.mkdir(parents=True)
    images = [WORLD.scene(index, seed=5) for index in range(4)]
    for index, image in enumerate(images):
        image.save(folder / f"s{index}.png")
    images[0].resize((72, 72), Image.Resampling.BILINEAR).save(folder / "s0-small.png")
    jpeg(images[1].crop((2, 1, 94, 95)), 80).save(folder / "s1-cropped.jpg")
    images[0].save(folder / "s0-copy.bmp")  # the same pixels in another format
    (folder / "corrupt.png").write_bytes(b"not a png")
    return folder


ROWS = [
    {"id": 0, "images": ["pics/s0.png"]},
    {"id": 1, "images": ["pics/s1.png"]},
    {"id": 2, "images": ["pics/s0-copy.bmp"]},  # same pixels as row 0: exact duplicate
    {"id": 3, "images": ["pics/s1-cropped.jpg"]},  # cropped, JPEG re-encoded: near duplicate of row 1
    {"id": 4, "images": []},  # no images: kept
    {"id": 5, "images": ["pics/corrupt.png"]},  # unreadable: kept with its error
    {"id": 6, "images": ["pics/s2.png", "pics/s0.png"]},
    {"id": 7, "images": ["pics/s2.png", "pics/s0-small.png"]},  # near duplicate of row 6
    {"id": 8, "images": ["pics/s0.png", "pics/s2.png"]},  # another order: distinct
    {"id": 9, "images": ["pics/s0-small.png", "pics/s3.png"]},  # the second image differs: distinct
    {"id": 10, "images": ["pics/missing.png"]},  # missing: kept with its error
]


def run(tmp_path, rows, operator, cache="cache"):
    entry = tmp_path / "data" / "rows.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = operator.run(FileStorage(entry, cache_path=tmp_path / cache).step())
    side = Path(summary.output_path.replace(".jsonl", ".dropped.jsonl"))
    dropped = [json.loads(line) for line in side.read_text().splitlines()] if side.exists() else []
    return summary, [json.loads(line) for line in open(summary.output_path)], dropped


@pytest.fixture
def no_clip(monkeypatch):
    """Building a CLIP serving (the only model the deduplicator has) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CLIP serving was built")

    monkeypatch.setattr(dedup_module, "_clip_serving", refuse)


def test_phash_keeps_the_first_of_each_group_and_builds_no_model(tmp_path, scenes, no_clip):
    op = ImageDeduplicator(method="phash", keep_dropped=True, save_interval=3)
    assert op.serving is None and op.hamming_distance == DEFAULT_HAMMING_DISTANCE
    summary, kept, dropped = run(tmp_path, ROWS, op)
    assert [row["id"] for row in kept] == [0, 1, 4, 5, 6, 8, 9, 10]
    assert summary.rows_dropped == 3 and summary.errors == 2
    assert all(set(row) <= {"id", "images", "error"} for row in kept)  # no temporary column left
    reasons = {row["id"]: row[DROPPED_KEY] for row in dropped}
    assert reasons[2] == "ImageDeduplicator: exact duplicate of row 0"
    assert reasons[3].startswith("ImageDeduplicator: near duplicate of row 1 (phash distance ")
    assert reasons[7].startswith("ImageDeduplicator: near duplicate of row 6 (phash distance ")
    errors = {row["id"]: row["error"] for row in kept if row["error"]}
    assert errors[5].startswith("ImageDeduplicator: key 'images': cannot read image ")
    assert errors[10] == f"ImageDeduplicator: key 'images': image not found: {scenes / 'missing.png'}"


@pytest.mark.parametrize("method", sorted(HASH_METHODS))
def test_every_data_juicer_hash_method_finds_the_near_copies(tmp_path, scenes, no_clip, method):
    _, kept, dropped = run(tmp_path, ROWS[:4] + ROWS[6:9], ImageDeduplicator(method=method, keep_dropped=True))
    assert [row["id"] for row in kept] == [0, 1, 6, 8]
    assert [row["id"] for row in dropped] == [2, 3, 7]
    assert f"({method} distance " in dropped[1][DROPPED_KEY]


def test_hamming_distance_is_the_largest_distance_dropped(tmp_path, scenes, no_clip):
    near = [ROWS[1], ROWS[3]]  # the cropped copy: some bits differ
    hashes = [perceptual_hash(Image.open(scenes / name).convert("RGB")) for name in ("s1.png", "s1-cropped.jpg")]
    distance = bin(int(hashes[0], 16) ^ int(hashes[1], 16)).count("1")
    assert distance > 0
    _, kept, _ = run(tmp_path, near, ImageDeduplicator(method="phash", hamming_distance=distance), cache="at")
    assert [row["id"] for row in kept] == [1]  # inclusive
    _, kept, _ = run(tmp_path, near, ImageDeduplicator(method="phash", hamming_distance=distance - 1),
                     cache="below")
    assert [row["id"] for row in kept] == [1, 3]


def test_exact_method_finds_same_pixels_only(tmp_path, scenes, no_clip):
    op = ImageDeduplicator(method="exact")
    assert op.serving is None
    _, kept, _ = run(tmp_path, ROWS, op)
    assert [row["id"] for row in kept] == [0, 1, 3, 4, 5, 6, 7, 8, 9, 10]


def test_method_and_hamming_distance_are_fingerprinted(tmp_path, scenes, no_clip):
    params = [ImageDeduplicator(method=method, hamming_distance=distance).params()["arguments"]
              for method, distance in (("phash", None), ("phash", 4), ("dhash", None))]
    assert params[0]["method"] == "phash" and params[1]["hamming_distance"] == 4
    assert params[0] != params[1] and params[0] != params[2]
    first, _, _ = run(tmp_path, ROWS, ImageDeduplicator(method="phash"))
    again, _, _ = run(tmp_path, ROWS, ImageDeduplicator(method="phash", save_interval=7))
    tighter, kept, _ = run(tmp_path, ROWS, ImageDeduplicator(method="phash", hamming_distance=0))
    assert not first.reused and again.reused and not tighter.reused
    assert 3 in [row["id"] for row in kept]  # the cropped copy differs by some bits: kept at distance 0


def test_phash_resumes_to_the_same_output(tmp_path, scenes, monkeypatch):
    calls = []

    def dying(image, method="phash"):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return perceptual_hash(image, method)

    rows = ROWS * 2
    monkeypatch.setattr(dedup_module, "perceptual_hash", dying)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, rows, ImageDeduplicator(method="phash", batch_size=2, save_interval=2, keep_dropped=True))
    monkeypatch.setattr(dedup_module, "perceptual_hash", perceptual_hash)
    summary, resumed, resumed_dropped = run(tmp_path, rows, ImageDeduplicator(
        method="phash", batch_size=2, save_interval=2, keep_dropped=True))
    assert summary.chunks_resumed == 3  # rows 0-1, 2-3, 4-5; the 6th hash was row 6's second image
    _, fresh, fresh_dropped = run(tmp_path, rows, ImageDeduplicator(method="phash", keep_dropped=True),
                                  cache="fresh")
    assert resumed == fresh and resumed_dropped == fresh_dropped
    # The second copy of ROWS: every row with images repeats one of the first copy.
    assert [row["id"] for row in resumed] == [0, 1, 4, 5, 6, 8, 9, 10, 4, 5, 10]


def test_arguments_that_do_not_fit_the_method_fail_when_it_is_built(no_clip):
    cases = [
        ({"method": "md5"}, "method must be one of 'clip', 'exact', 'phash', 'dhash', 'whash', 'ahash', got 'md5'"),
        ({"method": "phash", "hamming_distance": -1}, r"hamming_distance must be an int in \[0, 64\]"),
        ({"method": "phash", "hamming_distance": 65}, r"hamming_distance must be an int in \[0, 64\]"),
        ({"method": "phash", "hamming_distance": 2.5}, "hamming_distance must be an int"),
        ({"method": "phash", "similarity_threshold": 0.9}, "similarity_threshold .* is for method='clip'; "
                                                           "method='phash' takes hamming_distance"),
        ({"method": "exact", "similarity_threshold": None}, "similarity_threshold .* is for method='clip'"),
        ({"method": "phash", "clip_serving": "openai/clip"}, "clip_serving is for method='clip'"),
        ({"hamming_distance": 4}, "hamming_distance is for the hash methods .* not method='clip'"),
        ({"method": "exact", "hamming_distance": 4}, "not method='exact'"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            ImageDeduplicator(**arguments)


# --------------------------------------------------------------------------- the figure

# Near copies, as a crawl or a re-upload makes them: the same pixels in another file, a
# downscale, a JPEG re-encode, a slight crop (1-2% off each side), and all three at once.
KINDS = ("lossless", "resized", "jpeg", "cropped", "all three")
FIGURE_SCENES = 120  # the first half get two near copies each, the second half none


def near_copy(image: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, str]:
    """A near copy of `image` and the format to save it in."""
    if kind == "lossless":
        return image, "BMP"
    width, height = image.size
    if kind in ("cropped", "all three"):
        sides = [rng.randint(1, round(0.02 * width)) for _ in range(4)]
        image = image.crop((sides[0], sides[1], width - sides[2], height - sides[3]))
    if kind in ("resized", "all three"):
        scale = rng.uniform(0.5, 0.9)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    if kind in ("jpeg", "all three"):
        return jpeg(image, rng.randint(30, 90)), "JPEG"
    return image, "PNG"


def write_figure_set(folder: Path) -> tuple[list[dict], dict[int, str]]:
    """Shuffled rows of distinct scenes and their near copies; a row is a duplicate when an
    earlier row shows the same scene (an original after one of its copies is one). Returns the
    rows and, per duplicate row id, its kind."""
    world, rng = ShapesWorld(image_size=128), random.Random(20)
    folder.mkdir(parents=True)
    rows = []
    for index in range(FIGURE_SCENES):
        scene = world.scene(index, seed=20)
        scene.save(folder / f"{index}.png")
        rows.append({"scene": index, "kind": "original", "images": [f"pics/{index}.png"]})
        kinds = (KINDS[index % 5], KINDS[(index + 2) % 5]) if index < FIGURE_SCENES // 2 else ()
        for number, kind in enumerate(kinds):
            copy, image_format = near_copy(scene, kind, rng)
            name = f"{index}-{number}.{image_format.lower()}"
            copy.save(folder / name, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
            rows.append({"scene": index, "kind": kind, "images": [f"pics/{name}"]})
    rng.shuffle(rows)
    seen, duplicates = set(), {}
    for row_id, row in enumerate(rows):
        row["id"] = row_id
        if row["scene"] in seen:
            duplicates[row_id] = row["kind"]
        seen.add(row["scene"])
    return rows, duplicates


def precision_recall(dropped: set[int], duplicates: dict[int, str]) -> tuple[float, float]:
    right = len(dropped & set(duplicates))
    return right / max(1, len(dropped)), right / len(duplicates)


def distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_phash_finds_near_duplicates_that_exact_hashing_misses(tmp_path, capsys):
    rows, duplicates = write_figure_set(tmp_path / "data" / "pics")
    figures = {}
    for name, op in (("phash", ImageDeduplicator(method="phash", keep_dropped=True)),
                     ("exact", ImageDeduplicator(method="exact", keep_dropped=True))):
        summary, kept, dropped = run(tmp_path, rows, op, cache=name)
        assert len(kept) + len(dropped) == len(rows) and summary.errors == 0
        figures[name] = precision_recall({row["id"] for row in dropped}, duplicates)
        missed = Counter(duplicates[i] for i in set(duplicates) - {row["id"] for row in dropped})
        print(f"{name}: precision {figures[name][0]:.3f}, recall {figures[name][1]:.3f} "
              f"({len(dropped)} rows dropped; {len(duplicates)} duplicates of {len(rows)} rows; "
              f"missed, by kind of the later row: {dict(sorted(missed.items()))})")
    # The distances behind the figure: each copy to its original, and between distinct scenes.
    hashes = {row["id"]: perceptual_hash(Image.open(tmp_path / "data" / row["images"][0]).convert("RGB"))
              for row in rows}
    originals = {row["scene"]: hashes[row["id"]] for row in rows if row["kind"] == "original"}
    copies = Counter(distance(hashes[row["id"]], originals[row["scene"]]) for row in rows if row["kind"] != "original")
    distinct = Counter(distance(a, b) for a, b in itertools.combinations(originals.values(), 2))
    print(f"phash distance of each near copy to its original: {dict(sorted(copies.items()))}")
    print(f"phash distance between distinct scenes (lowest): {dict(sorted(distinct.items())[:6])} "
          f"of {sum(distinct.values())} pairs")
    with capsys.disabled():
        print(f"\nphash (hamming_distance={DEFAULT_HAMMING_DISTANCE}): precision {figures['phash'][0]:.3f}, "
              f"recall {figures['phash'][1]:.3f}; exact: precision {figures['exact'][0]:.3f}, "
              f"recall {figures['exact'][1]:.3f}")
    assert figures["phash"][0] >= 0.95 and figures["phash"][1] >= 0.95
    assert figures["exact"][0] == 1.0 and figures["exact"][1] < 0.5  # lossless copies only: 1 in 5
