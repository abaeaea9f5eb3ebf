"""ImageDeduplicator's final pass through an index gives the verdicts of the scan it replaced
(every row against every kept row): exactly for hashes, on random rows with planted near and
same-pixel copies; for CLIP embeddings exactly with the flat index and with recall >= 0.995
with the float16 inverted file. The planted image sets are in test_perceptual_dedup.py,
test_quality_operators.py and the golden files."""

import base64
import hashlib

import numpy as np
import pytest

from dataflowmm.operators import image_deduplicator as dedup_module
from dataflowmm.operators.dedup_index import KeptFlatIndex, default_index, slices_narrow
from dataflowmm.operators.image_deduplicator import ImageDeduplicator, _Fingerprints


def random_fingerprints(method: str, rows: int, seed: int = 0, two_images: float = 0.05) -> list[dict]:
    """Fingerprints of random rows; 10% near copies of a random earlier row (hashes: 0-14 bits
    flipped; embeddings: cosine 0.93-1.0 to it), 2% same-pixel copies, some rows of two images."""
    rng = np.random.default_rng(seed)
    out = []
    for row in range(rows):
        count = 2 if rng.random() < two_images else 1
        earlier = [i for i in rng.integers(0, row, 3) if len(out[i]["hash"]) == count] if row else []
        kind = rng.random()
        if earlier and kind < 0.02:
            out.append(dict(out[earlier[0]]))
            continue
        pixels = [hashlib.sha256(f"{row}-{k}".encode()).hexdigest() for k in range(count)]
        if method == "clip":
            vectors = rng.standard_normal((count, 512)).astype(np.float32)
            if earlier and kind < 0.12:
                original = np.frombuffer(base64.b64decode(out[earlier[0]]["embedding"]), "<f4").reshape(count, -1)
                cosine = rng.uniform(0.93, 1.0)
                vectors = cosine * original + np.sqrt(1 - cosine**2) * vectors / np.sqrt(512)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            out.append({"hash": pixels, "embedding": base64.b64encode(vectors.astype("<f4").tobytes()).decode()})
            continue
        codes = rng.integers(0, 256, (count, 8), dtype=np.uint8)
        if earlier and kind < 0.12:
            codes = np.frombuffer(bytes.fromhex("".join(out[earlier[0]]["perceptual"])), np.uint8).reshape(count, 8)
            bits = np.unpackbits(codes, axis=1)
            for image in range(count):
                bits[image, rng.choice(64, rng.integers(0, 15), replace=False)] ^= 1
            codes = np.packbits(bits, axis=1)
        out.append({"hash": pixels, "perceptual": [code.tobytes().hex() for code in codes]})
    return out


def collected(op: ImageDeduplicator, fingerprints: list[dict]) -> _Fingerprints:
    collection = _Fingerprints(op.measure())
    for position, fingerprint in enumerate(fingerprints):
        collection.add(position, fingerprint)
    return collection


def clip_deduplicator(threshold: float = 0.95) -> ImageDeduplicator:
    op = ImageDeduplicator("unused/clip-folder", similarity_threshold=threshold)
    op.serving = None  # the final pass loads no model
    return op


def test_hash_index_gives_the_scans_verdicts_on_20000_random_rows():
    fingerprints = random_fingerprints("phash", 20_000)
    scanned = ImageDeduplicator(method="phash").find_repeats(collected(ImageDeduplicator(method="phash"),
                                                                       fingerprints), scan=True)
    assert 1500 < len(scanned) < 2500  # near copies within 10 bits, same pixels, some chance pairs
    assert any("exact duplicate" in reason for reason in scanned.values())
    for method in ("phash", "dhash", "whash", "ahash"):
        op = ImageDeduplicator(method=method)
        found = op.find_repeats(collected(op, fingerprints))
        assert found == {row: reason.replace("phash", method) for row, reason in scanned.items()}, method


def test_exact_method_gives_the_scans_verdicts():
    fingerprints = [{"hash": row["hash"]} for row in random_fingerprints("phash", 5_000)]
    op = ImageDeduplicator(method="exact")
    found = op.find_repeats(collected(op, fingerprints))
    assert found == op.find_repeats(collected(op, fingerprints), scan=True)
    assert found and all(reason.startswith("exact duplicate of row ") for reason in found.values())


@pytest.mark.parametrize("distance", [0, 3, 40])
def test_other_hamming_distances_give_the_scans_verdicts(distance):
    assert slices_narrow(distance) == (distance < 40)  # 40: one flat index of the kept hashes
    fingerprints = random_fingerprints("phash", 3_000, seed=distance)
    op = ImageDeduplicator(method="phash", hamming_distance=distance)
    assert op.find_repeats(collected(op, fingerprints)) == op.find_repeats(collected(op, fingerprints), scan=True)


def test_clip_flat_index_gives_the_scans_verdicts_and_cosines():
    fingerprints = random_fingerprints("clip", 4_000)
    op = clip_deduplicator()
    found = op.find_repeats(collected(op, fingerprints))
    assert len(found) > 200 and found == op.find_repeats(collected(op, fingerprints), scan=True)


def test_clip_inverted_file_drops_995_per_mille_of_what_exact_search_drops(monkeypatch):
    fingerprints = random_fingerprints("clip", 20_000, two_images=0.0)
    op = clip_deduplicator()
    exact = op.find_repeats(collected(op, fingerprints))  # float32, flat: the scan's verdicts
    monkeypatch.setattr(dedup_module, "EXACT_MAX_VECTORS", 0)  # float16 from the first row
    compact = collected(op, fingerprints)
    assert compact.groups()[0].vectors().dtype == np.float16
    approximate = op.find_repeats(compact)
    assert len(set(exact) & set(approximate)) >= 0.995 * len(exact)
    assert len(set(approximate) - set(exact)) <= 0.005 * len(exact)


def test_the_search_is_one_replaceable_object():
    class EveryKeptRow:  # the simplest NearIndex: every kept row is a candidate
        def __init__(self, measure, vectors):
            self.kept = []

        def prepare(self, rows):
            pass

        def candidates(self, row):
            return self.kept

        def keep(self, row):
            self.kept = [*self.kept, row]

    fingerprints = random_fingerprints("phash", 1_000)
    op = ImageDeduplicator(method="phash")
    indexed = op.find_repeats(collected(op, fingerprints))
    op.near_index = EveryKeptRow
    assert op.find_repeats(collected(op, fingerprints)) == indexed
    assert isinstance(default_index(collected(clip_deduplicator(), random_fingerprints("clip", 10)).measure,
                                    np.zeros((10, 1, 512), np.float32)), KeptFlatIndex)
