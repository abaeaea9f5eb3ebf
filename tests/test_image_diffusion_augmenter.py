"""ImageDiffusionAugmenter end to end on tiny models (tiny-sd, tiny-blip, tiny-clip) through FileStorage."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import RowError
from dataflowmm.operators.image_diffusion_augmenter import ImageDiffusionAugmenter
from dataflowmm.operators.sample_format import SpecialTokens
from dataflowmm.seeds import derive_seed, row_identity
from dataflowmm.serving import ClipServing, LocalCaptionServing, LocalImageGenServing

SOURCE_SIZE = (40, 24)  # not square: the resize back to the source size is visible
FAST = dict(image_size=32, save_interval=50)


class RecordingDiffusion(LocalImageGenServing):
    """Records every generate call; can crash after N calls or flag chosen outputs as unsafe."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self):
        self.calls = []
        self.fail_after = None
        self.flag = set()

    def generate(self, prompts, seeds, images=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append({"prompts": list(prompts), "seeds": list(seeds),
                           "sizes": [image.size for image in images]})
        outputs = super().generate(prompts, seeds, images)
        return [[None] if index in self.flag else images for index, images in enumerate(outputs)]


class RecordingCaptioner(LocalCaptionServing):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def caption(self, images, prompts=None, seeds=None, caption_num=None):
        self.calls.append({"count": len(images), "prompts": prompts, "seeds": seeds})
        return super().caption(images, prompts, seeds, caption_num)


@pytest.fixture(scope="module")
def shared_sd(tiny_model):
    return RecordingDiffusion(tiny_model("tiny-sd"), task="image2image", batch_size=4,
                              num_inference_steps=2, torch_dtype="fp32")


@pytest.fixture
def sd(shared_sd):
    shared_sd.reset()
    yield shared_sd
    shared_sd.reset()


@pytest.fixture(scope="module")
def clip(tiny_model):
    return ClipServing(tiny_model("tiny-clip"), torch_dtype="fp32")


def make_image(path, seed=0, size=SOURCE_SIZE):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def augment(entry, cache, augmenter, **run_kwargs):
    summary = augmenter.run(FileStorage(entry, cache_path=cache).step(), **run_kwargs)
    return summary, read_jsonl(summary.output_path)


def image_bytes(cache, rows, key="images"):
    return [(Path(cache) / path).read_bytes() for row in rows for path in row.get(key) or []]


# ----------------------------------------------------------------------- counts and captions
def test_aug_num_3_keeps_original_and_three_distinct_generated_rows(tmp_path, tiny_model):
    row = {"images": [make_image(tmp_path / "a.png")], "text": "<__dj__image> a cat",
           "caption": " <__dj__image>a red cat<|__dj__eoc|> ", "id": 7}
    entry = write_jsonl(tmp_path / "in.jsonl", [row])
    augmenter = ImageDiffusionAugmenter(str(tiny_model("tiny-sd")), aug_num=3, caption_key="caption",
                                        num_inference_steps=2, batch_size=4, **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert len(rows) == 4 and summary.images_written == 3 and summary.errors == 0
    assert rows[0]["images"] == ["../a.png"] and rows[0]["error"] is None  # the original, first
    generated = rows[1:]
    for out in generated:
        assert {**out, "images": None} == {**row, "images": None, "error": None}
        assert len(out["images"]) == 1 and out["images"][0].endswith(".png")
        with Image.open(tmp_path / "cache" / out["images"][0]) as image:
            assert image.format == "PNG" and image.size == SOURCE_SIZE
    assert len({out["images"][0] for out in generated}) == 3
    assert len(set(image_bytes(tmp_path / "cache", generated))) == 3


def test_caption_list_two_images_aug_num_2_without_originals(tmp_path, sd):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": names, "caps": ["a dog", "<__dj__image> a tree"]}])
    augmenter = ImageDiffusionAugmenter(sd, aug_num=2, keep_original_sample=False, caption_key="caps", **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert len(rows) == 2 and all(len(r["images"]) == 2 for r in rows)
    assert summary.images_written == 4
    # one generate call for the whole batch: 2 images x 2 candidates, each its own prompt and seed
    assert len(sd.calls) == 1
    call = sd.calls[0]
    assert call["prompts"] == ["a dog", "a dog", "a tree", "a tree"]
    assert len(set(call["seeds"])) == 4 and call["sizes"] == [(32, 32)] * 4
    row_id = row_identity(read_jsonl(entry)[0], 0)
    assert call["seeds"] == [derive_seed(0, row_id, i, c) for i in range(2) for c in range(2)]
    # generated row k takes candidate k of every image
    assert [Path(p).name for p in rows[1]["images"]] == [f"{row_id}_0_1.png", f"{row_id}_1_1.png"]


def test_string_caption_applies_to_every_image_and_single_path_is_a_list(tmp_path, sd):
    rows_in = [{"images": [make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png", 1)],
                "caption": "a boat"},
               {"images": make_image(tmp_path / "c.png", 2), "caption": "a car"}]
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    augmenter = ImageDiffusionAugmenter(sd, caption_key="caption", **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert [len(r["images"]) if isinstance(r["images"], list) else r["images"] for r in rows] == [2, 2, "../c.png", 1]
    assert sd.calls[0]["prompts"] == ["a boat", "a boat", "a car"]
    assert summary.images_written == 3


def test_captions_come_from_the_caption_serving_when_no_caption_key(tmp_path, sd, tiny_model):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": names[:2]}, {"images": [names[2]]}])
    captioner = RecordingCaptioner(tiny_model("tiny-blip"), max_new_tokens=6)
    augmenter = ImageDiffusionAugmenter(sd, hf_img2seq=captioner, aug_num=2, **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert len(rows) == 2 * 3 and summary.errors == 0 and summary.images_written == 6
    assert len(captioner.calls) == 1  # every image of the batch in one call
    call = captioner.calls[0]
    assert call["count"] == 3 and call["prompts"] == "A photo of a "
    ids = [row_identity(r, i) for i, r in enumerate(read_jsonl(entry))]
    assert call["seeds"] == [derive_seed(0, ids[0], 0, "caption"), derive_seed(0, ids[0], 1, "caption"),
                             derive_seed(0, ids[1], 0, "caption")]
    prompts = sd.calls[0]["prompts"]
    assert len(prompts) == 6 and all(p.startswith("A photo of a ") for p in prompts)
    assert augmenter.params()["servings"]["captioner"]["model"] == str(tiny_model("tiny-blip"))


def test_remove_special_tokens():
    assert SpecialTokens().remove("<__dj__image>\n a cat <|__dj__eoc|>") == "a cat"


# ----------------------------------------------------------------------------- bad rows
def test_bad_rows_are_kept_once_with_their_error(tmp_path, sd):
    good = make_image(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows_in = [
        {"images": [good, good], "caps": ["only one"]},       # caption count mismatch
        {"images": [good], "caps": ["fine"]},
        {"images": ["missing.png"], "caps": "x"},            # missing file
        {"images": ["corrupt.png"], "caps": "x"},            # corrupt file
        {"images": [good]},                                  # caption field missing
        {"images": [good], "caps": 3},                       # caption of the wrong type
    ]
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    augmenter = ImageDiffusionAugmenter(sd, aug_num=2, caption_key="caps", **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert summary.errors == 5 and summary.images_written == 2
    assert len(rows) == 5 + 3
    errors = [r["error"] for r in rows]
    assert "1 captions for 2 images" in errors[0]
    assert errors[1:4] == [None, None, None] and len(rows[2]["images"]) == 1
    assert "image not found" in errors[4] and "missing.png" in errors[4]
    assert "cannot read image" in errors[5]
    assert "'caps': missing" in errors[6]
    assert "expected a string or a list" in errors[7]
    assert rows[0]["images"] == ["../good.png", "../good.png"]  # the original row, as it was


def test_strict_raises_on_the_first_bad_row(tmp_path, sd):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": ["missing.png"], "caps": "x"}])
    augmenter = ImageDiffusionAugmenter(sd, caption_key="caps", strict=True, **FAST)
    with pytest.raises(RowError, match=r"in\.jsonl: row 0: image not found"):
        augment(entry, tmp_path / "cache", augmenter)
    assert sd.calls == []  # failed before any generation


def test_safety_flag_records_an_error(tmp_path, sd):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [n], "caps": "a"} for n in names])
    sd.flag = {1}  # the second image of the call comes back flagged after every retry
    augmenter = ImageDiffusionAugmenter(sd, caption_key="caps", **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert summary.errors == 1 and summary.images_written == 1
    assert len(rows) == 2 + 1
    assert rows[2]["error"] and "safety checker" in rows[2]["error"] and rows[2]["images"] == ["../1.png"]


@pytest.mark.parametrize("keep", [True, False])
def test_rows_without_images_pass_through_or_are_dropped(tmp_path, sd, keep):
    rows_in = [{"images": [], "caps": "a"}, {"images": None, "caps": "b"}, {"caps": "c"},
               {"images": [make_image(tmp_path / "a.png")], "caps": "d"}]
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    augmenter = ImageDiffusionAugmenter(sd, caption_key="caps", keep_original_sample=keep, **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert summary.errors == 0
    if keep:
        assert [r["caps"] for r in rows] == ["a", "b", "c", "d", "d"]
        assert rows[0]["images"] == [] and rows[1]["images"] is None and "images" not in rows[2]
    else:
        assert [r["caps"] for r in rows] == ["d"]


def test_output_key_keeps_the_source_images(tmp_path, sd):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [make_image(tmp_path / "a.png")], "t": "a"}])
    augmenter = ImageDiffusionAugmenter(sd, caption_key="t", **FAST)
    _, rows = augment(entry, tmp_path / "cache", augmenter, output_image_key="augmented")
    assert rows[0]["images"] == rows[1]["images"] == ["../a.png"]
    assert "augmented" not in rows[0] and len(rows[1]["augmented"]) == 1


# ------------------------------------------------------------------------ candidate modes
def test_random_any_keeps_seeded_picks(tmp_path, sd):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [make_image(tmp_path / "a.png")], "t": "a"}])
    augmenter = ImageDiffusionAugmenter(sd, caption_key="t", aug_num=2, candidate_num=3,
                                        keep_candidate_mode="random_any", keep_original_sample=False, **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert len(rows) == 2 and summary.images_written == 2
    assert len(sd.calls[0]["prompts"]) == 3
    row_id = row_identity(read_jsonl(entry)[0], 0)
    picks = sorted(random.Random(derive_seed(0, row_id, 0, "pick")).sample(range(3), 2))
    assert [Path(r["images"][0]).name for r in rows] == [f"{row_id}_0_{c}.png" for c in picks]


def test_similar_one_keeps_aug_num_candidates(tmp_path, sd, clip):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": names, "t": "a"}])
    augmenter = ImageDiffusionAugmenter(sd, caption_key="t", aug_num=2, keep_candidate_mode="similar_one",
                                        hf_clip=clip, **FAST)
    summary, rows = augment(entry, tmp_path / "cache", augmenter)
    assert len(rows) == 3 and summary.images_written == 4
    assert len(sd.calls[0]["prompts"]) == 2 * 4  # candidate_num defaults to 2 * aug_num
    for image_index in range(2):
        kept = [int(Path(r["images"][image_index]).stem.split("_")[-1]) for r in rows[1:]]
        assert kept == sorted(kept) and len(set(kept)) == 2 and all(0 <= c < 4 for c in kept)


class ScriptedSimilarity(ClipServing):
    """CLIP whose image-image similarities are given, in the order the pairs are asked for."""

    def __init__(self, folder, scores):
        super().__init__(folder)
        self.scores, self.calls = list(scores), []

    def image_image_similarity(self, candidates, sources):
        self.calls.append((len(candidates), len(sources)))
        return torch.tensor(self.scores[: len(candidates)])


def test_similar_one_keeps_the_most_similar_candidates_of_each_image(tmp_path, sd, tiny_model):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": names, "t": "a"}])
    # image 0's four candidates, then image 1's: keep {1, 3} of image 0 and {0, 2} of image 1
    clip = ScriptedSimilarity(tiny_model("tiny-clip"), [0.1, 0.9, 0.3, 0.8, 0.7, 0.2, 0.6, 0.1])
    augmenter = ImageDiffusionAugmenter(sd, caption_key="t", aug_num=2, keep_candidate_mode="similar_one",
                                        hf_clip=clip, keep_original_sample=False, **FAST)
    _, rows = augment(entry, tmp_path / "cache", augmenter)
    kept = [[int(Path(path).stem.split("_")[-1]) for path in row["images"]] for row in rows]
    assert kept == [[1, 0], [3, 2]]  # row k holds the k-th kept candidate of each image
    assert [count for count, _ in clip.calls] == [8]  # every candidate of the batch in one call


# ----------------------------------------------------------------------- files and resuming
def test_save_dir_precedence(tmp_path, sd, monkeypatch):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [make_image(tmp_path / "a.png")], "t": "a"}])

    def folder_used(name, **kwargs):
        augmenter = ImageDiffusionAugmenter(sd, caption_key="t", **FAST, **kwargs)
        _, rows = augment(entry, tmp_path / name, augmenter, output_image_key="out")
        return (tmp_path / name / rows[1]["out"][0]).resolve().parent

    monkeypatch.delenv("DATAFLOWMM_PRODUCED_DATA_DIR", raising=False)
    monkeypatch.delenv("DJ_PRODUCED_DATA_DIR", raising=False)
    assert folder_used("c1") == (tmp_path / "c1" / "dataflow_cache_step_step1_images").resolve()
    monkeypatch.setenv("DJ_PRODUCED_DATA_DIR", str(tmp_path / "dj"))
    assert folder_used("c2") == (tmp_path / "dj").resolve()
    monkeypatch.setenv("DATAFLOWMM_PRODUCED_DATA_DIR", str(tmp_path / "ours"))
    assert folder_used("c3") == (tmp_path / "ours").resolve()
    assert folder_used("c4", save_dir=tmp_path / "explicit") == (tmp_path / "explicit").resolve()


def test_rerun_rewrites_the_same_files(tmp_path, sd):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [make_image(tmp_path / "a.png")], "t": "a"}])
    save_dir = tmp_path / "generated"

    def run(cache):
        augmenter = ImageDiffusionAugmenter(sd, caption_key="t", aug_num=2, save_dir=save_dir, **FAST)
        return augment(entry, tmp_path / cache, augmenter)

    first_summary, _ = run("first")
    files = sorted(p.name for p in save_dir.iterdir())
    contents = [(save_dir / name).read_bytes() for name in files]
    second_summary, _ = run("second")  # another cache: the step is recomputed, not reused
    assert not second_summary.reused and second_summary.images_written == 2
    assert sorted(p.name for p in save_dir.iterdir()) == files and len(files) == 2
    assert [(save_dir / name).read_bytes() for name in files] == contents


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, tiny_model):
    names = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": [n], "t": f"thing {i}"} for i, n in enumerate(names)])
    serving = RecordingDiffusion(tiny_model("tiny-sd"), task="image2image", batch_size=1,
                                 num_inference_steps=2, torch_dtype="fp32")

    def run(cache):
        augmenter = ImageDiffusionAugmenter(serving, caption_key="t", aug_num=2, **{**FAST, "save_interval": 1})
        return augment(entry, tmp_path / cache, augmenter)

    _, reference = run("reference")
    serving.reset()
    serving.fail_after = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("resumed")
    serving.fail_after = None
    summary, resumed = run("resumed")
    assert summary.chunks_resumed == 2 and len(serving.calls) == 2 + 2
    assert resumed == reference and len(reference) == 4 * 3
    assert image_bytes(tmp_path / "resumed", resumed) == image_bytes(tmp_path / "reference", reference)


# ------------------------------------------------------------------------- construction
@pytest.mark.parametrize("kwargs, match", [
    ({"strength": 1.5}, "strength"),
    ({"strength": -0.1}, "strength"),
    ({"aug_num": 0}, "aug_num"),
    ({"aug_num": 1.5}, "aug_num"),
    ({"keep_candidate_mode": "similar_one_simhash"}, "keep_candidate_mode"),
    ({"keep_candidate_mode": "random_any", "aug_num": 3, "candidate_num": 2}, "candidate_num"),
    ({"image_size": 0}, "image_size"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDiffusionAugmenter("some/model", caption_key="t", **kwargs)


def test_constructor_rejects_a_text2image_serving(tiny_model):
    with pytest.raises(ValueError, match="image2image"):
        ImageDiffusionAugmenter(LocalImageGenServing(tiny_model("tiny-sd")), caption_key="t")


def test_servings_are_built_lazily_with_the_recipe_settings(tiny_model):
    augmenter = ImageDiffusionAugmenter(
        str(tiny_model("tiny-sd")), strength=0.5, guidance_scale=3.0, num_inference_steps=7,
        batch_size=3, hf_img2seq=str(tiny_model("tiny-blip")), keep_candidate_mode="similar_one",
        hf_clip=str(tiny_model("tiny-clip")), aug_num=2)
    assert augmenter.diffusion.task == "image2image" and augmenter.diffusion.batch_size == 3
    assert (augmenter.diffusion.strength, augmenter.diffusion.guidance_scale,
            augmenter.diffusion.num_inference_steps) == (0.5, 3.0, 7)
    assert augmenter.candidate_num == 4 and augmenter.input_batch_size == 3
    assert not augmenter.diffusion.loaded and not augmenter.clip.loaded
    assert not augmenter.captioner.loaded
    default = ImageDiffusionAugmenter(caption_key="t")  # Data-Juicer's defaults, nothing loaded
    assert default.diffusion.model == "CompVis/stable-diffusion-v1-4" and default.captioner is None
    assert default.clip is None and default.candidate_num == 1 and default.image_size == 512
    params = default.params()
    json.dumps(params)
    assert params["servings"]["diffusion"]["strength"] == 0.8 and params["servings"]["diffusion"]["guidance_scale"] == 7.5
