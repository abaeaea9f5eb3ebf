"""ImageCaptioner: Data-Juicer's counts and formats, our batching, seeding and resume."""

import json

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import ImageCaptioner
from dataflowmm.operators.sample_format import most_similar_by_simhash, simhash64, word_bigrams
from dataflowmm.serving import LocalCaptionServing

IMG, EOC = "<__dj__image>", "<|__dj__eoc|>"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class ScriptedCaptions:
    """A caption serving whose candidates are scripted from the image's colour."""

    def __init__(self, candidates=None, fail_after_calls=None, batch_size=8):
        self.candidates = candidates or (lambda color, n: [f"{color} thing {i}" for i in range(n)])
        self.calls, self.fail_after, self.batch_size = [], fail_after_calls, batch_size

    def caption(self, images, prompts=None, seeds=None, caption_num=1):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("serving died")
        self.calls.append({"n": len(images), "prompts": list(prompts), "seeds": list(seeds)})
        names = {value: name for name, value in COLORS.items()}
        return [self.candidates(names[image.getpixel((0, 0))], caption_num) for image in images]

    def config(self):
        return {"scripted": True}


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "data" / "pics"
    folder.mkdir(parents=True)
    for name, color in COLORS.items():
        Image.new("RGB", (24, 16), color).save(folder / f"{name}.png")
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    return folder


def write_rows(tmp_path, rows):
    entry = tmp_path / "data" / "rows.jsonl"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return entry


def caption(tmp_path, rows, captioner, cache="cache", **run_kwargs):
    storage = FileStorage(write_rows(tmp_path, rows), cache_path=tmp_path / cache)
    summary = captioner.run(storage.step(), **run_kwargs)
    return summary, [json.loads(line) for line in open(summary.output_path)]


TWO_SAMPLES = [
    {"images": ["pics/red.png"], "text": f"{IMG} a red square {EOC}"},
    {"images": ["pics/green.png"], "text": "a green square"},
]


@pytest.fixture(scope="module")
def blip(tiny_model):
    return LocalCaptionServing(str(tiny_model("tiny-blip")), max_new_tokens=6, batch_size=4)


@pytest.mark.parametrize("mode, caption_num, kept, not_kept", [
    ("random_any", 1, 4, 2),
    ("random_any", 4, 4, 2),
    ("all", 4, 10, 8),
    ("similar_one_simhash", 4, 4, 2),
])
def test_data_juicer_output_counts(tmp_path, pictures, blip, mode, caption_num, kept, not_kept):
    texts = [sample["text"] for sample in TWO_SAMPLES]
    for keep, expected in ((True, kept), (False, not_kept)):
        op = ImageCaptioner(blip, caption_num=caption_num, keep_candidate_mode=mode, keep_original_sample=keep)
        summary, rows = caption(tmp_path, TWO_SAMPLES, op, cache=f"cache-{keep}")
        assert len(rows) == summary.rows_out == expected and summary.errors == 0
        originals = [row for row in rows if row["text"] in texts]
        generated = [row for row in rows if row["text"] not in texts]
        assert len(originals) == (2 if keep else 0)
        assert len(generated) == expected - len(originals)
        assert all(isinstance(row["text"], str) and row["text"].strip() for row in generated)
        per_sample = len(generated) // 2
        if keep:  # originals come first, each followed by its own generated rows
            assert [row["text"] for row in rows[::per_sample + 1]] == texts
        sources = [row["images"] for row in rows if row["text"] not in texts]
        assert sources == [["../data/pics/red.png"]] * per_sample + [["../data/pics/green.png"]] * per_sample


def test_generated_rows_copy_fields_and_originals_lead(tmp_path, pictures):
    rows_in = [{"id": 7, "meta": {"a": 1}, "images": ["pics/red.png"], "text": "plain text"}]
    _, rows = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), caption_num=2,
                                                        keep_candidate_mode="all"))
    assert [row["text"] for row in rows] == ["plain text", "red thing 0", "red thing 1"]
    assert all(row["id"] == 7 and row["meta"] == {"a": 1} for row in rows)
    assert rows[1]["images"] == rows[0]["images"] == ["../data/pics/red.png"]


def test_each_caption_goes_after_its_own_image_token(tmp_path, pictures):
    rows_in = [{"images": ["pics/red.png", "pics/green.png", "pics/blue.png"],
                "text": f"{IMG} first {IMG} second words {EOC} then {IMG} third {EOC}"}]
    _, rows = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), keep_original_sample=False))
    assert rows[0]["text"] == (f"{IMG} red thing 0 {IMG} green thing 0 {EOC} "
                               f"{IMG} blue thing 0 {EOC}")


def test_custom_special_tokens(tmp_path, pictures):
    rows_in = [{"images": ["pics/red.png", "pics/green.png"], "text": "<img> a <img> b [EOC]"}]
    op = ImageCaptioner(ScriptedCaptions(), keep_original_sample=False, image_token="<img>", eoc_token="[EOC]")
    _, rows = caption(tmp_path, rows_in, op)
    assert rows[0]["text"] == "<img> red thing 0 <img> green thing 0 [EOC]"


def test_plain_rows_get_the_caption_as_text(tmp_path, pictures):
    rows_in = [{"images": ["pics/blue.png"], "text": "whatever"}, {"images": "pics/red.png"}]
    _, rows = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), keep_original_sample=False),
                      output_text_key="caption")
    assert [row["caption"] for row in rows] == ["blue thing 0", "red thing 0"]
    assert rows[0]["text"] == "whatever"


def test_images_carried_in_rows_as_base64_are_captioned_and_kept_verbatim(tmp_path, pictures):
    from dataflowmm.io.images import image_to_str

    red = image_to_str(Image.open(pictures / "red.png"))  # what images_in_rows=True writes
    green_uri = "data:image/png;base64," + image_to_str(Image.open(pictures / "green.png"))
    rows_in = [{"images": [red, "pics/blue.png"], "text": "two"}, {"images": green_uri, "text": "one"}]
    _, rows = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), keep_original_sample=False),
                      output_text_key="caption")
    assert [row["caption"] for row in rows] == ["red thing 0 blue thing 0", "green thing 0"]
    assert rows[0]["images"] == [red, "../data/pics/blue.png"] and rows[1]["images"] == green_uri
    assert all(row["error"] is None for row in rows)


def test_simhash_helpers_on_hand_made_candidates():
    assert word_bigrams("A Red  circle") == ["a red", "red circle"]
    assert simhash64("one") == 0 and simhash64("a red circle") == simhash64("A  RED circle")
    reference = "a red circle on a pale background"
    candidates = ["completely unrelated words about boats", "a red circle on a pale background today",
                  "a red circle on a pale background"]
    assert most_similar_by_simhash(reference, candidates) == 2
    assert most_similar_by_simhash(reference, ["same text here", "same text here"]) == 0  # tie: first


def test_similar_one_simhash_keeps_the_candidate_closest_to_the_original(tmp_path, pictures):
    scripted = ScriptedCaptions(lambda color, n: ["boats sail across the open sea at dawn",
                                                  "a small red circle on a pale background",
                                                  "trees in a forest under heavy snow"][:n])
    rows_in = [{"images": ["pics/red.png"], "text": f"{IMG} a small red circle on a pale background {EOC}"}]
    op = ImageCaptioner(scripted, caption_num=3, keep_candidate_mode="similar_one_simhash",
                        keep_original_sample=False)
    _, rows = caption(tmp_path, rows_in, op)
    assert rows[0]["text"] == f"{IMG} a small red circle on a pale background {EOC}"


def test_prompt_key_wins_with_a_warning(tmp_path, pictures):
    scripted = ScriptedCaptions()
    with pytest.warns(UserWarning, match="prompt_key"):
        op = ImageCaptioner(scripted, prompt="global prompt", prompt_key="ask")
    rows_in = [{"images": ["pics/red.png"], "ask": "row prompt"},
               {"images": ["pics/green.png"], "ask": 5},
               {"images": ["pics/blue.png"]}]
    caption(tmp_path, rows_in, op)
    assert scripted.calls[0]["prompts"] == ["row prompt", "global prompt", "global prompt"]


def test_all_images_of_a_batch_go_in_one_call(tmp_path, pictures):
    scripted = ScriptedCaptions(batch_size=4)
    rows_in = [{"images": ["pics/red.png", "pics/green.png"]}, {"images": ["pics/blue.png"]}] * 3
    caption(tmp_path, rows_in, ImageCaptioner(scripted))
    assert [call["n"] for call in scripted.calls] == [6, 3]  # rows 0-3, then rows 4-5


def test_unreadable_rows_are_kept_with_an_error(tmp_path, pictures):
    rows_in = [{"images": ["pics/red.png"]}, {"images": ["pics/missing.png"]}, {"images": ["pics/corrupt.png"]},
               {"images": ["pics/red.png"], "text": f"{IMG} {IMG} two tokens {EOC}"}, {"images": 3}]
    for keep in (True, False):
        summary, rows = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), keep_original_sample=keep),
                                cache=f"cache-{keep}")
        assert summary.errors == 4 and len(rows) == (6 if keep else 5)
        errors = [row["error"] for row in rows if row["error"]]
        assert "image not found" in errors[0] and "missing.png" in errors[0]
        assert "cannot read image" in errors[1] and "corrupt.png" in errors[1]
        assert "2 image tokens but key 'images' has 1 images" in errors[2]
        assert "key 'images'" in errors[3]


def test_rows_without_images_pass_through_only_when_originals_are_kept(tmp_path, pictures):
    rows_in = [{"images": [], "text": "no image"}, {"text": "no key"}, {"images": ["pics/red.png"]}]
    _, kept = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions()), cache="a")
    _, dropped = caption(tmp_path, rows_in, ImageCaptioner(ScriptedCaptions(), keep_original_sample=False), cache="b")
    assert [row.get("text") for row in kept] == ["no image", "no key", None, "red thing 0"]
    assert [row["text"] for row in dropped] == ["red thing 0"]


def test_sampled_captions_do_not_depend_on_batch_size(tmp_path, pictures, tiny_model):
    rows_in = [{"images": [f"pics/{c}.png"]} for c in ("red", "green", "blue", "red", "green")]
    outputs = []
    for batch in (1, 4):
        op = ImageCaptioner(str(tiny_model("tiny-blip")), caption_num=3, keep_candidate_mode="all",
                            batch_size=batch, seed=11)
        summary, rows = caption(tmp_path, rows_in, op, cache=f"cache-{batch}")
        outputs.append([row.get("text") for row in rows])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 5 * 4


def test_crash_then_resume_equals_uninterrupted(tmp_path, pictures, blip):
    rows_in = [{"images": [f"pics/{c}.png"], "text": f"{IMG} {c} {EOC}"} for c in ("red", "green", "blue") * 3]

    class Flaky:
        def __init__(self, inner, fail_after):
            self.inner, self.calls, self.fail_after = inner, 0, fail_after
            self.batch_size = 2

        def caption(self, *args, **kwargs):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("killed")
            self.calls += 1
            return self.inner.caption(*args, **kwargs)

        def config(self):
            return self.inner.config()

    def captioner(fail_after=None):
        return ImageCaptioner(Flaky(blip, fail_after), caption_num=2, keep_candidate_mode="random_any",
                              save_interval=2)

    clean, clean_rows = caption(tmp_path, rows_in, captioner(), cache="clean")
    with pytest.raises(RuntimeError, match="killed"):
        caption(tmp_path, rows_in, captioner(fail_after=3), cache="resumed")
    resumed_op = captioner()
    resumed, resumed_rows = caption(tmp_path, rows_in, resumed_op, cache="resumed")
    assert resumed.chunks_resumed == 3 and resumed_op.serving.calls == 2
    assert resumed_rows == clean_rows and len(clean_rows) == 18


def test_bad_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="keep_candidate_mode"):
        ImageCaptioner(ScriptedCaptions(), keep_candidate_mode="best")
    with pytest.raises(ValueError, match="caption_num"):
        ImageCaptioner(ScriptedCaptions(), caption_num=0)


def test_blip2_and_vision_encoder_decoder_through_the_operator(tmp_path, pictures, tiny_model):
    for name in ("tiny-blip2", "tiny-vision-encoder-decoder"):
        op = ImageCaptioner(str(tiny_model(name)), keep_original_sample=False, prompt=None)
        summary, rows = caption(tmp_path, TWO_SAMPLES, op, cache=name)
        assert summary.errors == 0 and len(rows) == 2
        assert rows[0]["text"].startswith(IMG) and rows[0]["text"].endswith(EOC)
