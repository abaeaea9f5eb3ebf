"""APIImageGenServing against a loopback OpenAI-compatible images server that misbehaves on
purpose: retries, refusals, time-outs, malformed bodies, bounded concurrency, the key kept
out of every file and log, and resumed runs that re-request nothing finished."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

pytest.importorskip("openai")

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.kit.loopback_images_api import LoopbackImagesAPI, loopback_image  # noqa: E402
from dataflowmm.operators import ImageGeneration  # noqa: E402
from dataflowmm.serving.api_image_gen import APIImageGenServing, GenerationFailed  # noqa: E402

KEY = "sk-test-7f3a9c-never-to-be-seen"


@pytest.fixture
def api():
    with LoopbackImagesAPI(api_key=KEY, hang_seconds=3) as server:
        yield server


def serving(api, **kwargs) -> APIImageGenServing:
    options = {"base_url": api.base_url, "api_key": KEY, "timeout": 0.3, "max_retries": 2, **kwargs}
    return APIImageGenServing("loopback-image", **options)


def run_prompts(tmp_path, task, prompts, cache="cache"):
    entry = tmp_path / "prompts.jsonl"
    entry.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    summary = task.run(FileStorage(entry, cache_path=tmp_path / cache).step())
    return summary, [json.loads(line) for line in Path(summary.output_path).read_text().splitlines()]


def test_every_misbehaviour_ends_as_the_rules_say(tmp_path, api):
    prompts = ["fine", "a [429]", "b [500x2]", "c [hang-once]", "d [500]", "e [hang]", "f [bad-b64]", "g [refuse]"]
    summary, rows = run_prompts(tmp_path, ImageGeneration(serving(api, batch_size=8, max_concurrency=8)), prompts)
    errors = {row["prompt"]: row["error"] for row in rows}
    assert [errors[p] for p in prompts[:4]] == [None] * 4  # retried until answered
    assert errors["d [500]"] == "ImageGeneration: HTTP 500 (after 2 retries): Error code: 500 - internal error"
    assert errors["e [hang]"] == "ImageGeneration: request timed out (after 2 retries)"
    assert errors["f [bad-b64]"].startswith("ImageGeneration: malformed base64 image in the response")
    assert "content policy (content_policy_violation)" in errors["g [refuse]"]
    expected = {"fine": 1, "a [429]": 2, "b [500x2]": 3, "c [hang-once]": 2, "d [500]": 3,
                "e [hang]": 3, "f [bad-b64]": 1, "g [refuse]": 1}
    assert api.wait_for_requests(sum(expected.values())) == sum(expected.values())
    assert dict(api.requests) == expected
    assert len(rows) == len(prompts) and summary.errors == 4 and summary.images_written == 4
    fine = rows[0]
    assert fine["model_name"] == "loopback-image"
    image = (Path(summary.output_path).parent / fine["image"])
    assert list(image.read_bytes()[:4]) == [0x89, ord("P"), ord("N"), ord("G")]


def test_retry_after_is_honoured(api):
    result = serving(api, timeout=5).generate(["slow down [429-wait]"], [0])
    assert not isinstance(result[0], GenerationFailed)
    first, second = api.arrivals["slow down [429-wait]"]
    assert second - first >= 1.15  # the server's 1.2 s, not the client's 0.5 s first backoff


def test_requests_are_concurrent_but_bounded(api):
    api.latency = 0.05
    results = serving(api, max_concurrency=3, timeout=5).generate([f"p{i}" for i in range(12)], list(range(12)))
    assert all(isinstance(images, list) and len(images) == 1 for images in results)
    assert 2 <= api.max_in_flight <= 3


def test_images_come_in_input_order_by_b64_and_by_url(api):
    prompts = [f"prompt {i}" for i in range(5)]
    for response_format in ("b64_json", "url"):
        results = serving(api, response_format=response_format, n=2).generate(prompts, [0] * 5)
        assert [[image.tobytes() for image in images] for images in results] == \
               [[loopback_image(p, None, j).tobytes() for j in range(2)] for p in prompts]


def test_the_seed_is_sent_where_the_server_takes_one(tmp_path, api):
    task = ImageGeneration(serving(api, seed_parameter="seed"), num_generations=3)
    _, rows = run_prompts(tmp_path, task, ["one prompt"])
    seeds = [body["seed"] for body in api.bodies]
    assert len(set(seeds)) == 3 and len(rows) == 3
    assert api.requests["one prompt"] == 3


class DiesOnCall(APIImageGenServing):
    """Simulates a killed run: the third batch never reaches the server."""

    calls = 0

    def generate(self, prompts, seeds):
        type(self).calls += 1
        if type(self).calls == 3:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, seeds)


def test_a_resumed_run_does_not_request_finished_rows_again(tmp_path, api):
    prompts = [f"prompt {i}" for i in range(10)]
    options = {"base_url": api.base_url, "api_key": KEY, "batch_size": 2}
    with pytest.raises(KeyboardInterrupt):
        run_prompts(tmp_path, ImageGeneration(DiesOnCall("loopback-image", **options), save_interval=2), prompts)
    assert api.total_requests == 4
    # The same serving class (its name is in the step's fingerprint); its third call is past.
    summary, rows = run_prompts(tmp_path, ImageGeneration(DiesOnCall("loopback-image", **options),
                                                          save_interval=2), prompts)
    assert summary.chunks_resumed == 2
    assert dict(api.requests) == dict.fromkeys(prompts, 1)
    assert [row["prompt"] for row in rows] == prompts and all(row["error"] is None for row in rows)


def test_the_key_never_appears_in_files_logs_or_errors(tmp_path, api, caplog, monkeypatch):
    monkeypatch.setenv("DATAFLOWMM_TEST_IMAGES_KEY", KEY)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    the_serving = APIImageGenServing("loopback-image", base_url=api.base_url, timeout=0.3, max_retries=1,
                                     api_key_env="DATAFLOWMM_TEST_IMAGES_KEY")
    _, rows = run_prompts(tmp_path, ImageGeneration(the_serving), ["fine", "x [echo-auth]", "y [500]"])
    assert rows[0]["error"] is None
    assert rows[1]["error"] == "ImageGeneration: HTTP 401: Error code: 401 - key not accepted: Bearer ***"
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text and KEY not in repr(the_serving)
    assert KEY not in json.dumps(the_serving.config())
    assert pickle.loads(pickle.dumps(the_serving)).generate(["again"], [0])[0]  # travels (to Ray actors) working


def test_arguments_are_checked_before_anything_is_sent(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        APIImageGenServing("dall-e-3")
    for kwargs, message in [({"response_format": "png"}, "response_format"), ({"max_concurrency": 0}, "max_concurrency"),
                            ({"n": 0}, "n must"), ({"max_retries": -1}, "max_retries"), ({"timeout": 0}, "timeout")]:
        with pytest.raises(ValueError, match=message):
            APIImageGenServing("dall-e-3", api_key="k", **kwargs)
    unsent = APIImageGenServing("dall-e-3", api_key="k", base_url="http://127.0.0.1:9/v1")
    assert not unsent.loaded


def test_config_changes_with_what_changes_images_only():
    base = APIImageGenServing("dall-e-3", api_key="k").config()
    assert APIImageGenServing("dall-e-3", api_key="other", max_concurrency=64, max_retries=0).config() == base
    assert APIImageGenServing("dall-e-3", api_key="k", size="1024x1792").config() != base


def test_the_ray_runner_writes_what_the_local_runner_writes(tmp_path, api, ray_cluster):
    from dataflowmm.execution.ray_runner import RayRunner

    prompts = ["fine", "a [500x2]", "b [refuse]", "c", "d", "e"]
    task = ImageGeneration(serving(api, batch_size=2, timeout=5), num_generations=2, save_interval=2)
    _, local = run_prompts(tmp_path, task, prompts, cache="local")
    entry = tmp_path / "prompts.jsonl"
    summary = task.run(FileStorage(entry, cache_path=tmp_path / "ray", runner=RayRunner(replicas=2)).step())
    assert Path(summary.output_path).read_bytes() == (tmp_path / "local" / Path(summary.output_path).name).read_bytes()
    for row in local:
        if row["image"]:
            assert (tmp_path / "ray" / row["image"]).read_bytes() == (tmp_path / "local" / row["image"]).read_bytes()
    assert summary.errors == 2 and summary.images_written == 10
