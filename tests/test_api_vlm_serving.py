"""APIVLMServing against the loopback chat server, which answers from the pixels it receives:
answers belong to their own image and question under concurrency and retries, misbehaviour
ends as the rules say, reruns send requests only for the rows that failed transiently, and
the key stays out of every file."""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("openai")

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI, request_key  # noqa: E402
from dataflowmm.kit.shapes import ShapesWorld, write_shapes_dataset  # noqa: E402
from dataflowmm.operators import PromptedVQAGenerator  # noqa: E402
from dataflowmm.serving import APIVLMServing, GenerationFailed, VLMPrompt  # noqa: E402

KEY = "sk-test-vlm-4b1d-never-to-be-seen"
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is shown?",
             "background": "What colour is the background?"}


@pytest.fixture
def api():
    with LoopbackChatAPI(api_key=KEY, hang_seconds=3) as server:
        yield server


def serving(api, **kwargs) -> APIVLMServing:
    options = {"base_url": api.base_url, "api_key": KEY, "timeout": 5, "max_retries": 1, **kwargs}
    return APIVLMServing("loopback-vlm", **options)


def questions_dataset(folder: Path, count: int, markers: dict[int, str] | None = None) -> tuple[Path, list[dict]]:
    """`count` held-out shapes images, row i asking about attribute i % 3; `markers` prefix some questions."""
    entry = write_shapes_dataset(folder, count, seed=1)
    rows = [json.loads(line) for line in entry.read_text().splitlines()]
    for index, row in enumerate(rows):
        row["asks"] = list(QUESTIONS)[index % 3]
        row["question"] = (markers or {}).get(index, "") + QUESTIONS[row["asks"]]
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return entry, rows


def answer_rows(entry: Path, cache: Path, vqa: PromptedVQAGenerator, **run_kwargs):
    summary = vqa.run(FileStorage(entry, cache_path=cache).step(), input_prompt_key="question", **run_kwargs)
    return summary, [json.loads(line) for line in open(summary.output_path, encoding="utf-8")]


def test_answers_match_the_pixel_truth_of_their_own_image(tmp_path, api):
    entry, truth = questions_dataset(tmp_path / "data", 96)
    api.latency = 0.01  # requests overlap
    vqa = PromptedVQAGenerator(serving(api, max_concurrency=16, batch_size=32, timeout=5))
    summary, rows = answer_rows(entry, tmp_path / "cache", vqa)
    right = sum(row["answer"] == row[row["asks"]] for row in rows)
    assert summary.errors == 0 and right / len(rows) >= 0.99, [(r["answer"], r[r["asks"]]) for r in rows]
    assert [row["question"] for row in rows] == [row["question"] for row in truth]  # order kept
    assert api.total_requests == 96 and set(api.requests.values()) == {1}
    assert api.max_in_flight > 1  # concurrent


def test_fault_rows_end_as_errors_then_right_answers_after_a_rerun(tmp_path, api):
    markers = {1: "[500x2] ", 4: "[hang-twice] ", 7: "[bad-json-once] ", 10: "[429] ", 13: "[refuse] ",
               16: "[truncate] ", 19: "[refuse-answer] "}
    entry, truth = questions_dataset(tmp_path / "data", 24, markers)
    vqa = PromptedVQAGenerator(serving(api, max_retries=1, timeout=1.0, batch_size=8), save_interval=8)
    first, rows = answer_rows(entry, tmp_path / "cache", vqa)
    errors = {index: row["error"] for index, row in enumerate(rows) if row["error"]}
    assert sorted(errors) == [1, 4, 7, 13, 16, 19]  # [429] is retried within the run
    assert errors[1] == "PromptedVQAGenerator: HTTP 500 (after 1 retries): Error code: 500 - internal error"
    assert errors[4] == "PromptedVQAGenerator: request timed out (after 1 retries)"
    assert errors[7].startswith("PromptedVQAGenerator: the server's answer is not valid JSON")
    assert "content policy (content_filter)" in errors[13] and "I'm sorry" in errors[19]
    assert "cut off at max_tokens=256 (finish_reason=length" in errors[16]
    assert first.errors == 6
    assert api.wait_for_requests(24 + 1 + 1 + 1) == 27  # 500x2 and hang-twice tried twice, [429] retried
    counts_after_first = dict(api.requests)

    second, rows = answer_rows(entry, tmp_path / "cache", vqa)
    assert second.rows_retried == 3 and second.errors == 3  # the transient ones: 500, time-out, bad JSON
    for index in (1, 4, 7):
        assert rows[index]["error"] is None and rows[index]["answer"] == rows[index][truth[index]["asks"]]
    assert sorted(index for index, row in enumerate(rows) if row["error"]) == [13, 16, 19]
    sent_again = {key: count - counts_after_first.get(key, 0) for key, count in api.requests.items()
                  if count != counts_after_first.get(key, 0)}
    assert sorted(sent_again.values()) == [1, 1, 1] and all(key.split(" ", 1)[0] in
                                                            ("[500x2]", "[hang-twice]", "[bad-json-once]")
                                                            for key in sent_again)
    right = sum(row["answer"] == row[truth[index]["asks"]] for index, row in enumerate(rows) if not row["error"])
    assert right == 21

    third, _ = answer_rows(entry, tmp_path / "cache", vqa)
    assert third.reused and api.total_requests == 30  # nothing sent: only refusals and cut-offs remain
    forced, rows = answer_rows(entry, tmp_path / "cache", vqa, retry_errors=True)
    assert forced.rows_retried == 3 and api.total_requests == 33


def test_every_request_carries_what_the_serving_was_told(api):
    image = ShapesWorld().sample(0, seed=1).image
    big = image.resize((96, 64))
    answers = serving(api, system_prompt="Answer in one word.", image_detail="low", max_image_side=48,
                      temperature=0.3, top_p=0.9, max_tokens=20, extra_body={"top_k": 5}).generate(
        [VLMPrompt((big, image), "What shape is shown?"), VLMPrompt((), "hi", system="Own system.")], seeds=[11, 12])
    assert answers[1] == "I see no image."
    first, second = sorted(api.bodies, key=lambda body: len(json.dumps(body)), reverse=True)
    assert first["messages"][0] == {"role": "system", "content": "Answer in one word."}
    parts = first["messages"][1]["content"]
    assert [part["type"] for part in parts] == ["image_url", "image_url", "text"] and parts[2]["text"] == \
        "What shape is shown?"
    assert parts[0]["image_url"]["detail"] == "low" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))
    assert sent.size == (48, 32)  # downscaled: the longer side to max_image_side, aspect kept
    assert Image.open(io.BytesIO(base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1]))).size == (32, 32)
    assert (first["seed"], first["temperature"], first["top_p"], first["max_tokens"], first["top_k"]) == \
        (11, 0.3, 0.9, 20, 5)
    assert second["messages"] == [{"role": "system", "content": "Own system."}, {"role": "user", "content": "hi"}]
    jpeg = serving(api, image_format="jpeg", seed_parameter=None).request(VLMPrompt((image,), "q"))
    assert jpeg["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert "extra_body" not in jpeg


def test_retry_after_is_honoured_and_concurrency_bounded(api):
    image = ShapesWorld().sample(0, seed=1).image
    [answer] = serving(api, timeout=5).generate([VLMPrompt((image,), "[429-wait] What shape is shown?")])
    assert answer == ShapesWorld().sample(0, seed=1).attributes["shape"]
    first, second = api.arrivals[request_key("[429-wait] What shape is shown?", [image])]
    assert second - first >= 1.15  # the server's 1.2 s, not the client's 0.5 s first backoff
    api.latency = 0.05
    prompts = [VLMPrompt((ShapesWorld().sample(i, seed=1).image,), "What colour is the shape?") for i in range(12)]
    answers = serving(api, max_concurrency=3, timeout=5).generate(prompts)
    assert all(isinstance(answer, str) for answer in answers) and 2 <= api.max_in_flight <= 3


def test_the_key_never_appears_in_files_logs_or_errors(tmp_path, api, caplog, monkeypatch):
    monkeypatch.setenv("DATAFLOWMM_TEST_VLM_KEY", KEY)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    entry, _ = questions_dataset(tmp_path / "data", 6, {1: "[echo-auth] ", 2: "[500] "})
    the_serving = APIVLMServing("loopback-vlm", base_url=api.base_url, timeout=5, max_retries=1,
                                api_key_env="DATAFLOWMM_TEST_VLM_KEY")
    _, rows = answer_rows(entry, tmp_path / "cache", PromptedVQAGenerator(the_serving))
    assert rows[0]["error"] is None
    assert rows[1]["error"] == "PromptedVQAGenerator: HTTP 401: Error code: 401 - key not accepted: Bearer ***"
    written = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert any(path.name.endswith(".manifest.json") for path in written)
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text and KEY not in repr(the_serving) and KEY not in json.dumps(the_serving.config())
    travelled = pickle.loads(pickle.dumps(the_serving))  # to Ray actors: without its client, working
    assert not travelled.loaded and travelled.generate([VLMPrompt((), "again")]) == ["I see no image."]


def test_arguments_are_checked_before_anything_is_sent_and_config_is_what_changes_answers(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        APIVLMServing("qwen")
    for kwargs, message in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                            ({"top_p": 2}, "top_p"), ({"image_detail": "ultra"}, "image_detail"),
                            ({"max_image_side": 0}, "max_image_side"), ({"image_format": "gif"}, "image_format"),
                            ({"max_concurrency": 0}, "max_concurrency"), ({"timeout": 0}, "timeout")]:
        with pytest.raises(ValueError, match=message):
            APIVLMServing("qwen", api_key="k", **kwargs)
    base = APIVLMServing("qwen", api_key="k").config()
    assert APIVLMServing("qwen", api_key="other", max_concurrency=64, max_retries=0, timeout=5,
                         batch_size=3).config() == base
    for changed in ({"max_tokens": 64}, {"system_prompt": "Be brief."}, {"max_image_side": 512},
                    {"temperature": 0.0}, {"extra_body": {"top_k": 1}}):
        assert APIVLMServing("qwen", api_key="k", **changed).config() != base
    assert not APIVLMServing("qwen", api_key="k", base_url="http://127.0.0.1:9/v1").loaded
    with pytest.raises(TypeError, match="VLMPrompt"):
        APIVLMServing("qwen", api_key="k").generate(["a question"])


def test_a_connection_refused_is_a_transient_row_error():
    unreachable = APIVLMServing("qwen", api_key="k", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=1)
    [failure] = unreachable.generate([VLMPrompt((), "anyone there?")])
    assert isinstance(failure, GenerationFailed) and failure.transient
    assert str(failure).startswith("connection failed")


def test_image_files_go_as_their_own_bytes_only_when_nothing_would_change_them(tmp_path, api):
    image = ShapesWorld().sample(2, seed=1).image
    image.save(tmp_path / "rgb.png")
    image.convert("RGBA").save(tmp_path / "rgba.png")
    image.save(tmp_path / "photo.jpg", quality=90)
    image.resize((64, 64)).save(tmp_path / "large.png")
    (tmp_path / "secrets.txt").write_text("aws_secret_access_key = abc")
    truncated = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])

    def sent(name, **options):
        part = serving(api, **options).request(VLMPrompt((str(tmp_path / name),), "q"))["messages"][0]["content"][0]
        return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])

    assert sent("rgb.png") == (tmp_path / "rgb.png").read_bytes()  # passed on unchanged
    assert Image.open(io.BytesIO(sent("rgba.png"))).mode == "RGB"  # decoded and converted, as a PIL image is
    assert Image.open(io.BytesIO(sent("photo.jpg"))).format == "PNG"
    assert sent("photo.jpg", image_format="jpeg") == (tmp_path / "photo.jpg").read_bytes()
    assert Image.open(io.BytesIO(sent("large.png", max_image_side=32))).size == (32, 32)
    answers = serving(api).generate([VLMPrompt((str(tmp_path / name),), "What colour is the background?")
                                     for name in ("secrets.txt", "truncated.png", "rgb.png")])
    assert str(answers[0]).startswith(f"cannot read image {tmp_path / 'secrets.txt'}: not an image (text)")
    # A truncated PNG's header is fine: it goes on unchanged, and the server that decodes it refuses it.
    assert isinstance(answers[1], GenerationFailed) and not answers[1].transient and "HTTP 400" in str(answers[1])
    assert answers[2] == ShapesWorld().sample(2, seed=1).attributes["background"]
    assert not any("aws_secret" in json.dumps(body) for body in api.bodies)


def test_the_ray_runner_writes_what_the_local_runner_writes(tmp_path, api, ray_cluster):
    from dataflowmm.execution.ray_runner import RayRunner

    entry, _ = questions_dataset(tmp_path / "data", 12, {3: "[refuse] ", 5: "[500] ", 7: "[429] "})
    vqa = PromptedVQAGenerator(serving(api, batch_size=4), save_interval=4)
    local = vqa.run(FileStorage(entry, cache_path=tmp_path / "local").step(), input_prompt_key="question")
    remote = vqa.run(FileStorage(entry, cache_path=tmp_path / "ray", runner=RayRunner(replicas=2)).step(),
                     input_prompt_key="question")
    assert Path(remote.output_path).read_bytes() == Path(local.output_path).read_bytes()
    assert remote.errors == local.errors == 2  # the refusal and the 500s; the 429 is retried
