"""Regions then difference captions on tiny random models: end to end, resumed after SIGKILL, on Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataflowmm import FileStorage
from dataflowmm.execution.checkpoints import finished_chunks
from dataflowmm.kit.difference_pairs import write_difference_pairs
from dataflowmm.operators import DifferenceCaptioner, ImageDifferenceRegions
from dataflowmm.serving import ClipServing, ImageTextMatchingServing, LocalVLMServing

PAIRS = 8
# Random tiny models give meaningless scores: open ranges keep every box (a cosine can be < 0).
OPEN_ITM, OPEN_SIMILARITY = {"min_score": 0.0, "max_score": 1.0}, {"min_score": -1.0, "max_score": 1.0}

CHILD = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_difference_pipeline import run_pipeline
run_pipeline(*sys.argv[2:5])
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def captioner(vlm, itm, clip, **kwargs):
    return DifferenceCaptioner(
        image_text_matching_filter_args=OPEN_ITM, text_pair_similarity_filter_args=OPEN_SIMILARITY,
        vlm_serving=LocalVLMServing(vlm, max_new_tokens=6, batch_size=8),
        itm_serving=ImageTextMatchingServing(itm), clip_serving=ClipServing(clip),
        input_batch_size=2, save_interval=2, save_marked_pairs=True, **kwargs)


def run_pipeline(models_dir, entry, cache, runner=None):
    models = Path(models_dir)
    storage = FileStorage(entry, cache_path=cache, runner=runner)
    ImageDifferenceRegions().run(storage.step())
    return captioner(models / "tiny-chat-vlm", models / "tiny-blip-itm", models / "tiny-clip").run(storage.step())


@pytest.fixture
def models(tiny_model):
    for name in ("tiny-chat-vlm", "tiny-blip-itm", "tiny-clip"):
        tiny_model(name)
    return Path(tiny_model("tiny-clip")).parent


@pytest.fixture
def pairs(tmp_path):
    return write_difference_pairs(tmp_path / "data", count=PAIRS)


def rows_of(summary):
    return [json.loads(line) for line in open(summary.output_path)]


def test_regions_then_captions_on_tiny_models(tmp_path, models, pairs):
    summary = run_pipeline(models, pairs, tmp_path / "cache")
    rows = rows_of(summary)
    assert len(rows) == PAIRS and summary.errors == 0
    for row in rows:
        boxes = row["bbox_tag"]
        assert len(boxes) == len(row["changed_boxes"])  # every proposed box survived the open ranges
        for key in ("region_caption1", "region_caption2", "bbox_difference_captions"):
            assert len(row[key]) == len(boxes) and all(isinstance(text, str) for text in row[key])
        for key in ("region_itm_scores1", "region_itm_scores2", "region_caption_similarities"):
            assert len(row[key]) == len(boxes) and all(isinstance(score, float) for score in row[key])
        for path in row["marked_pair_images"]:
            assert (tmp_path / "cache" / path).is_file()
    assert summary.images_written == sum(len(row["bbox_tag"]) for row in rows)
    # same seed, same output; another seed samples other answers
    again = run_pipeline(models, pairs, tmp_path / "again")
    assert Path(again.output_path).read_text() == Path(summary.output_path).read_text()


def test_sigkill_mid_step_then_resume_equals_uninterrupted(tmp_path, models, pairs):
    cache = tmp_path / "killed"
    partial = cache / "dataflow_cache_step_step2.partial"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(models), str(pairs),
                              str(cache)], stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while finished_chunks(partial) < 1 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    done = finished_chunks(partial)
    assert 1 <= done < PAIRS // 2

    resumed = run_pipeline(models, pairs, cache)
    assert resumed.chunks_resumed == done
    clean = run_pipeline(models, pairs, tmp_path / "clean")
    assert Path(resumed.output_path).read_text() == Path(clean.output_path).read_text()
    images = sorted(p.name for p in (cache / "dataflow_cache_step_step2_images").iterdir())
    assert images == sorted(Path(path).name for row in rows_of(clean) for path in row["marked_pair_images"])


@pytest.mark.slow  # ~25 s: two Ray actors each import torch and load three models
def test_ray_runner_writes_what_the_local_runner_writes(tmp_path, models, pairs, ray_cluster):
    from dataflowmm.execution.ray_runner import RayRunner

    local = run_pipeline(models, pairs, tmp_path / "local")  # 1 thread, as each of the 2 actors
    on_ray = run_pipeline(models, pairs, tmp_path / "ray", runner=RayRunner(replicas=2))
    assert Path(on_ray.output_path).read_bytes() == Path(local.output_path).read_bytes()
    for row in rows_of(local):
        for path in row["marked_pair_images"]:
            assert (tmp_path / "ray" / path).read_bytes() == (tmp_path / "local" / path).read_bytes()


def test_readme_example_and_scaffold_run_offline(tmp_path, models, monkeypatch):
    from test_readme_examples import readme_block

    from dataflowmm.scaffold import init_project, load_pipeline_module

    init_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(readme_block("Difference captions for image pairs"), {})
    rows = [json.loads(line) for line in open("cache_local/image_difference/dataflow_cache_step_step2.jsonl")]
    assert len(rows) == 6 and all(row["error"] is None for row in rows)
    assert sum(len(row["marked_pair_images"]) for row in rows) == sum(len(row["changed_boxes"]) for row in rows)

    module = load_pipeline_module(tmp_path / "gpu_pipelines" / "image_difference_caption_pipeline.py")
    regions, captions = module.main(["--tiny", "--cache-path", str(tmp_path / "scaffold"), "--no-marked-pairs"])
    assert regions.rows_out == captions.rows_out == 6 and captions.errors == 0
    assert Path(captions.output_path).read_text().count('"bbox_difference_captions"') == 6
