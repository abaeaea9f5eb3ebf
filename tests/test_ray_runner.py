"""The Ray runner writes what the local runner writes: same bytes, same images, same errors,
resumable by either runner, and it survives a killed actor or a killed driver."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray")

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.contract import Input, Operator, Output, RowError, StepContext  # noqa: E402
from dataflowmm.execution import LocalRunner  # noqa: E402
from dataflowmm.execution.checkpoints import finished_chunks  # noqa: E402
from dataflowmm.execution.ray_runner import RayRunner  # noqa: E402
from dataflowmm.io.images import image_file_name, save_png  # noqa: E402
from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter, PromptedImageGenerator  # noqa: E402
from dataflowmm.seeds import derive_seed  # noqa: E402
from dataflowmm.serving import LocalCaptionServing, LocalImageGenServing  # noqa: E402

PARTIAL = "dataflow_cache_step_step1.partial"


class NoiseImages(Operator):
    """One seeded noise image per row; rows with empty text fail. Test hooks (not parameters):
    `die_marker` kills the worker process once, at row `die_at`; `block_marker` makes rows from
    `block_at` on wait while that file exists."""

    columns = [Input("text", "input_text_key", "text"),
               Output("images", "output_image_key", "images", images=True, empty=[])]
    default_input_batch_size = 2
    execution_arguments = frozenset({"die_marker", "die_at", "block_marker", "block_at"})

    def __init__(self, save_interval=3, strict=False, die_marker=None, die_at=None,
                 block_marker=None, block_at=None):
        self.die_marker, self.die_at = die_marker, die_at
        self.block_marker, self.block_at = block_marker, block_at

    def process_batch(self, rows, row_ids, context: StepContext):
        out = []
        for offset, (row, row_id) in enumerate(zip(rows, row_ids, strict=True)):
            index = int(row["text"].split()[-1]) if row["text"] else -1
            self._test_hooks(index)
            if not row["text"]:
                out.append(self.row_failed(row, "key 'text': empty", offset))
                continue
            pixels = np.random.default_rng(derive_seed(0, row_id)).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            path = save_png(Image.fromarray(pixels), context.save_dir / image_file_name(row_id, 0))
            out.append({**row, "images": [str(path)]})
        return out

    def _test_hooks(self, index):
        if self.die_marker and index == self.die_at and not os.path.exists(self.die_marker):
            Path(self.die_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        while self.block_marker and self.block_at is not None and index >= self.block_at \
                and os.path.exists(self.block_marker):
            time.sleep(0.05)


def entry_file(tmp_path, n=11, empty_at=(4,)):
    entry = tmp_path / "data" / "in.jsonl"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("".join(json.dumps({"text": "" if i in empty_at else f"row {i}"}) + "\n" for i in range(n)))
    return entry


def run_step(entry, cache, operator, runner):
    return operator.run(FileStorage(entry, cache_path=cache, runner=runner).step())


def same_outputs(cache_a, summary_a, cache_b, summary_b):
    text_a, text_b = Path(summary_a.output_path).read_bytes(), Path(summary_b.output_path).read_bytes()
    assert text_a == text_b
    for row in map(json.loads, text_a.splitlines()):
        for key in ("images", "generated"):
            for path in row.get(key) or []:
                if "_images/" in path:
                    assert (Path(cache_a) / path).read_bytes() == (Path(cache_b) / path).read_bytes()
    return [json.loads(line) for line in text_a.splitlines()]


def test_ray_writes_the_local_runner_bytes_with_errors_and_odd_chunks(tmp_path, ray_cluster):
    entry = entry_file(tmp_path)
    local = run_step(entry, tmp_path / "local", NoiseImages(), LocalRunner())
    on_ray = run_step(entry, tmp_path / "ray", NoiseImages(), RayRunner(replicas=2))
    rows = same_outputs(tmp_path / "local", local, tmp_path / "ray", on_ray)
    assert len(rows) == 11 and on_ray.errors == local.errors == 1
    assert on_ray.images_written == local.images_written == 10
    images = list((tmp_path / "ray" / "dataflow_cache_step_step1_images").iterdir())
    assert len(images) == 10 and not (tmp_path / "ray" / PARTIAL).exists()
    # the runner is not in the fingerprint: a step finished on Ray is reused locally
    assert run_step(entry, tmp_path / "ray", NoiseImages(), LocalRunner()).reused


def test_strict_on_ray_names_the_same_file_and_row(tmp_path, ray_cluster):
    entry = entry_file(tmp_path)
    with pytest.raises(RowError, match=r"in\.jsonl: row 4: key 'text': empty") as local_error:
        run_step(entry, tmp_path / "local", NoiseImages(strict=True), LocalRunner())
    with pytest.raises(RowError) as ray_error:
        run_step(entry, tmp_path / "ray", NoiseImages(strict=True), RayRunner(replicas=2))
    assert str(ray_error.value) == str(local_error.value).replace(str(tmp_path / "local"), str(tmp_path / "ray"))


def test_an_actor_killed_mid_step_changes_nothing(tmp_path, ray_cluster):
    entry = entry_file(tmp_path, n=14)
    local = run_step(entry, tmp_path / "local", NoiseImages(), LocalRunner())
    dying = NoiseImages(die_marker=str(tmp_path / "died"), die_at=7)
    on_ray = run_step(entry, tmp_path / "ray", dying, RayRunner(replicas=2))
    assert (tmp_path / "died").exists()  # an actor really was killed
    same_outputs(tmp_path / "local", local, tmp_path / "ray", on_ray)


CHILD = """
import sys
from dataflowmm import FileStorage
from dataflowmm.execution.ray_runner import RayRunner, connect
sys.path.insert(0, sys.argv[4])
from test_ray_runner import NoiseImages
address, entry, cache, _, marker = sys.argv[1:6]
connect(address)
NoiseImages(block_marker=marker, block_at=9).run(
    FileStorage(entry, cache_path=cache, runner=RayRunner(replicas=2)).step())
"""


@pytest.mark.parametrize("resume_with", ["ray", "local"])
def test_driver_killed_mid_step_resumes_with_either_runner(tmp_path, ray_cluster, resume_with):
    entry = entry_file(tmp_path, n=14)
    marker = tmp_path / "hold"
    marker.touch()  # rows from 9 on wait while it exists: the child is killed at a known point
    cache = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, ray_cluster, str(entry), str(cache),
                              str(Path(__file__).parent), str(marker)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while finished_chunks(cache / PARTIAL) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the child driver ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    marker.unlink()
    assert finished_chunks(cache / PARTIAL) == 2  # chunks of 4 rows: rows 0-7 done, row 9 held

    runner = RayRunner(replicas=2) if resume_with == "ray" else LocalRunner()
    resumed = run_step(entry, cache, NoiseImages(), runner)
    assert resumed.chunks_resumed == 2
    clean = run_step(entry, tmp_path / "clean", NoiseImages(), LocalRunner())
    rows = same_outputs(cache, resumed, tmp_path / "clean", clean)
    assert len(rows) == 14  # no duplicated rows
    images = {p.name for p in (cache / "dataflow_cache_step_step1_images").iterdir()}
    assert images == {Path(p).name for row in rows for p in row["images"]}  # no orphans, no temp files


def test_built_in_operators_on_ray_match_local(tmp_path, ray_cluster, tiny_model):
    pictures = tmp_path / "data" / "pics"
    pictures.mkdir(parents=True)
    for seed in range(3):
        pixels = np.random.default_rng(seed).integers(0, 255, (24, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pictures / f"{seed}.png")
    prompts = tmp_path / "data" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["a fox", "", "a cat", "a dog", "sun"]))
    images = tmp_path / "data" / "images.jsonl"
    images.write_text("".join(json.dumps(row) + "\n" for row in [
        {"images": ["pics/0.png"], "text": "zero", "caption": "first"},
        {"images": ["pics/missing.png"], "text": "gone", "caption": "x"},
        {"images": ["pics/1.png", "pics/2.png"], "text": "two", "caption": ["a", "b"]},
        {"images": ["pics/2.png"], "text": "three", "caption": "last"}]))
    sd, blip = str(tiny_model("tiny-sd")), str(tiny_model("tiny-blip"))

    def operators():
        return [
            (prompts, PromptedImageGenerator(LocalImageGenServing(sd, batch_size=2, num_inference_steps=2,
                                                                  height=32, width=32), save_interval=3),
             {"input_prompt_key": "prompt"}),
            (images, ImageCaptioner(LocalCaptionServing(blip, max_new_tokens=5, batch_size=2),
                                    caption_num=2, keep_candidate_mode="random_any", save_interval=3), {}),
            (images, ImageDiffusionAugmenter(LocalImageGenServing(sd, task="image2image", batch_size=2,
                                                                  num_inference_steps=2),
                                             caption_key="caption", aug_num=2, image_size=32, save_interval=3),
             {"output_image_key": "generated"}),
        ]

    # On CPU, torch's float results depend on the thread count: each of the 2 actors gets 1 of
    # the 2 cores, so the local run uses 1 thread too (on GPUs there is nothing to match).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        locals_ = [op.run(FileStorage(entry, cache_path=tmp_path / f"local{index}").step(), **kwargs)
                   for index, (entry, op, kwargs) in enumerate(operators())]
    finally:
        torch.set_num_threads(threads)
    for index, ((entry, ray_op, kwargs), local) in enumerate(zip(operators(), locals_, strict=True)):
        on_ray = ray_op.run(FileStorage(entry, cache_path=tmp_path / f"ray{index}",
                                        runner=RayRunner(replicas=2)).step(), **kwargs)
        same_outputs(tmp_path / f"local{index}", local, tmp_path / f"ray{index}", on_ray)
        assert local.errors == on_ray.errors == 1 and local.images_written == on_ray.images_written


class CountingServing:
    """A serving that counts its loads in the process it lives in."""

    loads_here = 0

    def __init__(self, name):
        self.name, self._loaded = name, False

    def config(self):
        return {"name": self.name}

    def load(self):
        if not self._loaded:
            CountingServing.loads_here += 1
            self._loaded = True

    def cleanup(self):
        self._loaded = False

    @property
    def loaded(self):
        return self._loaded


class WhereServed(Operator):
    """Writes which process served each row and how many loads that process has done."""

    columns = [Input("text", "input_text_key", "text"), Output("served", "output_key", "served")]
    default_input_batch_size = 1

    def __init__(self, serving, save_interval=1):
        self.serving = serving

    def process_batch(self, rows, row_ids, context):
        self.serving.load()
        return [{**row, "served": [os.getpid(), CountingServing.loads_here]} for row in rows]


def test_a_pipeline_starts_its_actors_once_and_reuses_their_loaded_servings(tmp_path, ray_cluster):
    from dataflowmm.execution.ray_actors import close_actor_pool

    close_actor_pool()
    entry = entry_file(tmp_path, n=6, empty_at=())
    storage = FileStorage(entry, cache_path=tmp_path / "pipeline", runner=RayRunner(replicas=2))

    def served(serving_name, other_runner=None):
        step = storage.step() if other_runner is None else \
            FileStorage(entry, cache_path=tmp_path / "other", runner=other_runner).step()
        summary = WhereServed(CountingServing(serving_name)).run(step)
        return [tuple(json.loads(line)["served"]) for line in Path(summary.output_path).read_text().splitlines()]

    first = served("a")
    assert len({pid for pid, _ in first}) == 2  # both actors worked
    # the next step (and another runner with the same placement) go to the same actors, whose
    # equal serving is already loaded: no new load
    assert set(served("a")) == set(first)
    assert set(served("a", RayRunner(replicas=2))) == set(first)
    # a serving with another configuration is loaded once more, in the same processes
    assert {(pid, loads - 1) for pid, loads in served("b")} == set(first)
    RayRunner().close()
    assert not {pid for pid, _ in served("a")} & {pid for pid, _ in first}  # closed: new actors


def test_clear_errors_without_ray_or_without_a_cluster(monkeypatch):
    import ray

    from dataflowmm.execution import ray_runner

    def refuse(*args, **kwargs):
        raise ConnectionError("could not connect to 10.0.0.9:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConnectionError, match=r"cannot reach the Ray cluster at 'auto'.*ray start --head"):
        ray_runner.connect("auto")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'dataflowmm\[ray\]'"):
        RayRunner()


def test_scaffold_script_runs_on_ray_with_the_same_output(tmp_path, ray_cluster):
    from dataflowmm.scaffold import load_pipeline_module, scaffold_root

    module = load_pipeline_module(scaffold_root() / "gpu_pipelines" / "text_to_image_generation_pipeline.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 actors on this 2-core machine
    try:
        local = module.main(["--tiny", "--cache-path", str(tmp_path / "local")])
    finally:
        torch.set_num_threads(threads)
    on_ray = module.main(["--tiny", "--cache-path", str(tmp_path / "ray"), "--runner", "ray", "--replicas", "2"])
    same_outputs(tmp_path / "local", local, tmp_path / "ray", on_ray)
    with pytest.raises(SystemExit, match="need --runner ray"):
        module.main(["--tiny", "--replicas", "2"])


def test_joining_a_cluster_never_passes_num_cpus_and_ships_credentials_not_local_paths(monkeypatch, tmp_path):
    import ray

    from dataflowmm.execution import ray_connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **options: calls.append((address, options)))
    for name, value in {"HF_TOKEN": "hf_secret_value", "AWS_SECRET_ACCESS_KEY": "aws_secret_value",
                        "HF_HOME": str(tmp_path), "RAY_ADDRESS": "10.0.0.9:6379"}.items():
        monkeypatch.setenv(name, value)
    ray_connect.connect(None, num_cpus=2, runtime_env={"pip": ["x"]})  # RAY_ADDRESS: Ray joins that one
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray_connect, "joins_existing_cluster", lambda address: address is not None)
    ray_connect.connect(None, num_cpus=2)
    (_, joined), (_, started) = calls
    assert "num_cpus" not in joined and started["num_cpus"] == 2
    assert joined["runtime_env"]["pip"] == ["x"] and "working_dir" not in joined["runtime_env"]
    env = joined["runtime_env"]["env_vars"]
    assert env["HF_TOKEN"] == "hf_secret_value" and env["AWS_SECRET_ACCESS_KEY"] == "aws_secret_value"
    assert "HF_HOME" not in env and started["runtime_env"]["env_vars"]["HF_HOME"] == str(tmp_path)


def test_an_authentication_failure_says_so_with_rays_instruction_and_no_secret(monkeypatch):
    import ray

    from dataflowmm.execution import ray_connect

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")

    def refuse(*args, **kwargs):
        raise ConnectionError("InvalidAuthToken: the token hf_secret_value is not this cluster's")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConnectionError) as error:
        ray_connect.connect("10.0.0.9:6379")
    message = str(error.value)
    assert "refused this driver's authentication token" in message and "RAY_AUTH_TOKEN" in message
    assert "hf_secret_value" not in message and "cannot reach" not in message
