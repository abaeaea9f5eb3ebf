"""Quality operators: scores, filters that drop rows (counted, optionally kept aside),
deduplication over the whole step; on scripted servings, on both runners, with resume."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.execution import LocalRunner
from dataflowmm.operators import (
    ClipScoreEvaluator,
    ClipScoreFilter,
    ImageDeduplicator,
    ImageTextMatchingFilter,
)

IMG, EOC = "<__dj__image>", "<|__dj__eoc|>"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class ScriptedScores:
    """A CLIP-like serving: a pair scores 0.9 when the text names the image's colour, else 0.2;
    embeddings are the colour one-hot plus a little of the top-left pixel's brightness."""

    def __init__(self, batch_size=4):
        self.batch_size, self.calls = batch_size, []

    @staticmethod
    def colour(image):
        return {value: name for name, value in COLOURS.items()}.get(image.getpixel((0, 0)), "other")

    def image_text_similarity(self, images, texts):
        self.calls.append(len(images))
        return torch.tensor([0.9 if self.colour(i) in t else 0.2 for i, t in zip(images, texts, strict=True)])

    def score(self, images, texts):  # the image-text matching serving's method
        return self.image_text_similarity(images, texts).tolist()

    def embed_images(self, images):
        self.calls.append(len(images))
        names = list(COLOURS)
        vectors = torch.zeros(len(images), 4)
        for row, image in enumerate(images):
            name = self.colour(image)
            vectors[row, names.index(name) if name in names else 3] = 1.0
            vectors[row, 3] += image.getpixel((image.width - 1, image.height - 1))[0] / 2550
        return torch.nn.functional.normalize(vectors, dim=-1)

    def config(self):
        return {"scripted": True}


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "data" / "pics"
    folder.mkdir(parents=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(folder / f"{name}.png")
    (folder / "corrupt.png").write_bytes(b"not a png")
    return folder


def run(tmp_path, rows, operator, cache="cache", runner=None, **keys):
    entry = tmp_path / "data" / "rows.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    storage = FileStorage(entry, cache_path=tmp_path / cache, runner=runner or LocalRunner())
    summary = operator.run(storage.step(), **keys)
    return summary, [json.loads(line) for line in open(summary.output_path)]


ROWS = [
    {"id": 0, "images": ["pics/red.png"], "text": "a red square"},
    {"id": 1, "images": ["pics/green.png"], "text": "a blue square"},           # wrong colour
    {"id": 2, "images": [], "text": "no images"},                                # kept, as Data-Juicer
    {"id": 3, "images": ["pics/red.png", "pics/blue.png"], "text": "red"},       # one of two right
    {"id": 4, "images": ["pics/corrupt.png"], "text": "a red square"},           # error, kept
    {"id": 5, "images": ["pics/red.png", "pics/green.png"], "text": f"{IMG} red {EOC} {IMG} red {EOC}"},
]


def test_evaluator_scores_each_image_with_its_text(tmp_path, pictures):
    serving = ScriptedScores()
    summary, rows = run(tmp_path, ROWS, ClipScoreEvaluator(serving), output_score_key="score")
    assert [row["score"] for row in rows] == [[0.9], [0.2], [], [0.9, 0.2], None, [0.9, 0.2]]
    assert summary.rows_out == 6 and summary.errors == 1 and summary.rows_dropped == 0
    assert "corrupt.png" in rows[4]["error"] and rows[4]["error"].startswith("ClipScoreEvaluator: key 'images'")
    assert rows[0]["images"] == ["../data/pics/red.png"]  # relative to the output file
    assert serving.calls == [4, 2]  # one serving call per batch of 4 rows (pairs scored)


@pytest.mark.parametrize("any_or_all, kept_ids", [("any", [0, 2, 3, 4, 5]), ("all", [0, 2, 4])])
def test_filter_keeps_rows_in_range_and_counts_the_dropped(tmp_path, pictures, any_or_all, kept_ids):
    op = ClipScoreFilter(ScriptedScores(), min_score=0.5, any_or_all=any_or_all)
    summary, rows = run(tmp_path, ROWS, op)
    assert [row["id"] for row in rows] == kept_ids
    assert all(DROPPED_KEY not in row for row in rows)
    assert summary.rows_in == 6 and summary.rows_out == len(kept_ids)
    assert summary.rows_dropped == 6 - len(kept_ids) and summary.errors == 1
    assert f"{len(kept_ids)} rows out, {6 - len(kept_ids)} rows dropped" in summary.line()
    assert not Path(summary.output_path.replace(".jsonl", ".dropped.jsonl")).exists()
    manifest = json.loads(Path(summary.output_path.replace(".jsonl", ".manifest.json")).read_text())
    assert manifest["rows"] == len(kept_ids) and manifest["rows_dropped"] == 6 - len(kept_ids)


def test_reduce_mode_and_max_score_follow_data_juicer(tmp_path, pictures):
    # Row 5 is one chunk of two images (red: 0.9, green: 0.2) with the text "red".
    row = {"images": ["pics/red.png", "pics/green.png"], "text": f"{IMG}{IMG} red {EOC}"}
    for mode, kept in (("avg", True), ("max", True), ("min", False)):
        _, rows = run(tmp_path, [row], ClipScoreFilter(ScriptedScores(), min_score=0.5, reduce_mode=mode),
                      cache=f"cache-{mode}")
        assert bool(rows) is kept, mode
    _, rows = run(tmp_path, ROWS[:2], ClipScoreFilter(ScriptedScores(), min_score=0.0, max_score=0.5),
                  cache="cache-max")
    assert [r["id"] for r in rows] == [1]  # only the mismatched pair scores below 0.5


def test_dropped_rows_can_be_kept_aside_with_the_reason(tmp_path, pictures):
    op = ImageTextMatchingFilter(ScriptedScores(), min_score=0.5, keep_dropped=True)
    summary, rows = run(tmp_path, ROWS, op, output_score_key="itm")
    side = Path(summary.output_path.replace(".jsonl", ".dropped.jsonl"))
    dropped = [json.loads(line) for line in side.read_text().splitlines()]
    assert [row["id"] for row in dropped] == [1]
    assert dropped[0][DROPPED_KEY] == "ImageTextMatchingFilter: score 0.2000 outside [0.5, 1.0] (any)"
    assert dropped[0]["itm"] == [0.2] and dropped[0]["images"] == ["../data/pics/green.png"]
    assert [row["itm"] for row in rows if row["id"] == 0] == [[0.9]]
    assert f"(kept in {side})" in summary.line()


def test_a_deleted_side_file_of_dropped_rows_makes_the_step_run_again(tmp_path, pictures, capsys):
    scores = ScriptedScores()
    summary, _ = run(tmp_path, ROWS, ImageTextMatchingFilter(scores, min_score=0.5, keep_dropped=True))
    side = Path(summary.dropped_path)
    side.unlink()
    calls = len(scores.calls)
    again, _ = run(tmp_path, ROWS, ImageTextMatchingFilter(scores, min_score=0.5, keep_dropped=True))
    assert not again.reused and len(scores.calls) > calls
    assert "the dropped rows file" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in side.read_text().splitlines()] == [1]
    third, _ = run(tmp_path, ROWS, ImageTextMatchingFilter(scores, min_score=0.5, keep_dropped=True))
    assert third.reused


def test_filter_arguments_fail_fast():
    with pytest.raises(ValueError, match="any_or_all"):
        ClipScoreFilter(ScriptedScores(), any_or_all="most")
    with pytest.raises(ValueError, match="reduce_mode"):
        ClipScoreFilter(ScriptedScores(), reduce_mode="median")
    with pytest.raises(ValueError, match="min_score"):
        ClipScoreFilter(ScriptedScores(), min_score=0.8, max_score=0.2)
    with pytest.raises(ValueError, match="itm_serving .* has no score"):
        ImageTextMatchingFilter(object())


def test_filter_resumes_after_a_crash_without_duplicating_rows(tmp_path, pictures):
    class Dying(ScriptedScores):
        def image_text_similarity(self, images, texts):
            if len(self.calls) == 2:
                raise RuntimeError("killed")
            return super().image_text_similarity(images, texts)

    rows = [{"id": i, "images": ["pics/red.png" if i % 3 else "pics/green.png"], "text": "red"}
            for i in range(20)]
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, rows, ClipScoreFilter(Dying(), min_score=0.5, save_interval=4, keep_dropped=True))
    summary, resumed = run(tmp_path, rows, ClipScoreFilter(ScriptedScores(), min_score=0.5, save_interval=4,
                                                           keep_dropped=True))
    assert summary.chunks_resumed == 2
    _, fresh = run(tmp_path, rows, ClipScoreFilter(ScriptedScores(), min_score=0.5, save_interval=4,
                                                   keep_dropped=True), cache="fresh")
    assert resumed == fresh and [r["id"] for r in resumed] == [i for i in range(20) if i % 3]
    side = Path(summary.output_path.replace(".jsonl", ".dropped.jsonl")).read_text().splitlines()
    assert [json.loads(line)["id"] for line in side] == [0, 3, 6, 9, 12, 15, 18]


def test_a_finished_filter_step_is_reused(tmp_path, pictures):
    run(tmp_path, ROWS, ClipScoreFilter(ScriptedScores(), min_score=0.5))
    serving = ScriptedScores()
    summary, rows = run(tmp_path, ROWS, ClipScoreFilter(serving, min_score=0.5))
    assert summary.reused and serving.calls == [] and summary.rows_dropped == 1 and len(rows) == 5


# --------------------------------------------------------------------------- deduplication


@pytest.fixture
def near_copies(pictures):
    # Same colour, a different bottom-right pixel: a near duplicate for the scripted embedding.
    image = Image.new("RGB", (16, 16), COLOURS["red"])
    image.putpixel((15, 15), (255, 30, 30))
    image.save(pictures / "red-near.png")
    Image.new("RGB", (16, 16), COLOURS["red"]).save(pictures / "red-again.png")  # same pixels
    return pictures


DEDUP_ROWS = [
    {"id": 0, "images": ["pics/red.png"]},
    {"id": 1, "images": ["pics/green.png"]},
    {"id": 2, "images": ["pics/red-again.png"]},        # exact duplicate of 0
    {"id": 3, "images": ["pics/red-near.png"]},         # near duplicate of 0
    {"id": 4, "images": []},                             # no images: kept
    {"id": 5, "images": ["pics/corrupt.png"]},          # error: kept
    {"id": 6, "images": ["pics/blue.png", "pics/red.png"]},
    {"id": 7, "images": ["pics/blue.png", "pics/red-near.png"]},  # near duplicate of 6
    {"id": 8, "images": ["pics/red.png", "pics/blue.png"]},       # other order: distinct
]


def test_deduplicator_keeps_the_first_of_each_group(tmp_path, near_copies):
    op = ImageDeduplicator(ScriptedScores(), similarity_threshold=0.99, keep_dropped=True, save_interval=2)
    summary, rows = run(tmp_path, DEDUP_ROWS, op)
    assert [row["id"] for row in rows] == [0, 1, 4, 5, 6, 8]
    assert summary.rows_dropped == 3 and summary.errors == 1
    assert all(set(row) <= {"id", "images", "error"} for row in rows)  # no temporary column left
    side = Path(summary.output_path.replace(".jsonl", ".dropped.jsonl")).read_text().splitlines()
    reasons = {json.loads(line)["id"]: json.loads(line)[DROPPED_KEY] for line in side}
    assert reasons[2] == "ImageDeduplicator: exact duplicate of row 0"
    assert reasons[3].startswith("ImageDeduplicator: near duplicate of row 0 (cosine 0.99")
    assert reasons[7].startswith("ImageDeduplicator: near duplicate of row 6")


def test_exact_only_deduplication_loads_no_model(tmp_path, near_copies):
    op = ImageDeduplicator("no/such-model", similarity_threshold=None)
    assert op.serving is None
    _, rows = run(tmp_path, DEDUP_ROWS, op)
    assert [row["id"] for row in rows] == [0, 1, 3, 4, 5, 6, 7, 8]


def test_deduplicator_resumes_to_the_same_output(tmp_path, near_copies):
    class Dying(ScriptedScores):
        def embed_images(self, images):
            if len(self.calls) == 2:
                raise RuntimeError("killed")
            return super().embed_images(images)

    rows = DEDUP_ROWS * 3
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, rows, ImageDeduplicator(Dying(batch_size=2), similarity_threshold=0.99, save_interval=2))
    summary, resumed = run(tmp_path, rows, ImageDeduplicator(ScriptedScores(batch_size=2),
                                                             similarity_threshold=0.99, save_interval=2))
    assert summary.chunks_resumed == 3  # chunk 2 (no image, unreadable) needs no serving call
    _, fresh = run(tmp_path, rows, ImageDeduplicator(ScriptedScores(batch_size=2), similarity_threshold=0.99),
                   cache="fresh")
    assert resumed == fresh
    # Later repeats of the rows without images and of the failed row are kept.
    assert [row["id"] for row in resumed] == [0, 1, 4, 5, 6, 8, 4, 5, 4, 5]


def test_filter_and_deduplicator_on_ray_match_local(tmp_path, near_copies, ray_cluster):
    from dataflowmm.execution.ray_runner import RayRunner

    for name, make in (("filter", lambda: ClipScoreFilter(ScriptedScores(), min_score=0.5, save_interval=4,
                                                         keep_dropped=True)),
                       ("dedup", lambda: ImageDeduplicator(ScriptedScores(), similarity_threshold=0.99,
                                                           save_interval=4, keep_dropped=True)),
                       ("phash", lambda: ImageDeduplicator(method="phash", batch_size=2, save_interval=4,
                                                           keep_dropped=True))):
        rows = (ROWS if name == "filter" else DEDUP_ROWS) * 2
        local, local_rows = run(tmp_path, rows, make(), cache=f"{name}-local")
        on_ray, ray_rows = run(tmp_path, rows, make(), cache=f"{name}-ray", runner=RayRunner(replicas=2))
        assert ray_rows == local_rows and on_ray.rows_dropped == local.rows_dropped > 0
        side = [Path(s.output_path.replace(".jsonl", ".dropped.jsonl")).read_text() for s in (local, on_ray)]
        assert side[0] == side[1]


def test_matching_filter_on_a_tiny_blip_itm_model(tmp_path, pictures, tiny_model):
    from transformers import AutoProcessor, BlipConfig, BlipForImageTextRetrieval

    from dataflowmm.serving import ImageTextMatchingServing

    folder = tiny_model("tiny-blip")
    torch.manual_seed(0)
    BlipForImageTextRetrieval(BlipConfig.from_pretrained(folder)).save_pretrained(tmp_path / "itm")
    AutoProcessor.from_pretrained(folder).save_pretrained(tmp_path / "itm")
    serving = ImageTextMatchingServing(tmp_path / "itm", device="cpu", batch_size=2)
    summary, rows = run(tmp_path, ROWS, ImageTextMatchingFilter(serving, min_score=0.0, max_score=1.0),
                        output_score_key="itm")
    # Random weights: every probability is in [0, 1], so every row is kept, with its scores.
    assert summary.rows_dropped == 0 and len(rows) == 6 and summary.errors == 1
    assert all(0.0 <= score <= 1.0 for row in rows if row["itm"] for score in row["itm"])
    assert [len(row["itm"]) for row in rows if row["error"] is None] == [1, 1, 0, 2, 2]
