"""The Ray runner on two real nodes (tests/two_nodes.py): the worker, where every actor runs,
has its own disk where the driver keeps its cache, input and pipeline code. Nothing is lost,
and the bytes are the local runner's."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from test_ray_runner import NoiseImages, entry_file, same_outputs  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.execution import LocalRunner  # noqa: E402
from dataflowmm.execution.ray_runner import RayRunner  # noqa: E402
from dataflowmm.operators import ClipScoreFilter, ImageCaptioner, PromptedImageGenerator  # noqa: E402
from dataflowmm.serving import ClipServing, LocalCaptionServing, LocalImageGenServing  # noqa: E402

TIMINGS = ("written_at", "mtime_ns", "seconds")
PLACES = ("fingerprint", "input_fingerprint")  # they chain where the input and cache live


def run(entry, cache, operator, runner, **keys):
    return operator.run(FileStorage(entry, cache_path=cache, runner=runner).step(), **keys)


def test_a_pipeline_with_its_cache_on_s3_writes_images_from_the_worker(s3_endpoint, two_node_cluster, tmp_path):
    """Cache on S3 (moto on loopback): the worker's actors write the images straight to the
    store and read them back from it in the next step; rows, images and manifests are the
    local runner's on the same store, and the driver's working folder never holds an image."""
    from dataflowmm.io.remote import filesystem
    from dataflowmm.operators import ImageShapeFilter

    address, private = two_node_cluster
    fs, _ = filesystem("s3://x")
    fs.mkdir("two-nodes")
    fs.invalidate_cache()
    entry = entry_file(private, n=9)  # on the driver's disk only

    def pipeline(url: str, runner, work: Path) -> list:
        storage = FileStorage(entry, cache_path=url, runner=runner, work_dir=work)
        return [NoiseImages().run(storage.step()),
                ImageShapeFilter(min_width=8, keep_dropped=True).run(storage.step(), input_image_key="images")]

    local = pipeline("s3://two-nodes/local", LocalRunner(), tmp_path / "local_work")
    on_ray = pipeline("s3://two-nodes/ray", RayRunner(address, replicas=2), tmp_path / "ray_work")
    fs.invalidate_cache()
    for step, (one, other) in enumerate(zip(local, on_ray, strict=True), start=1):
        assert (one.rows_out, one.errors) == (other.rows_out, other.errors)
        assert other.output_path == f"s3://two-nodes/ray/dataflow_cache_step_step{step}.jsonl"
        rows = fs.cat_file(f"two-nodes/ray/dataflow_cache_step_step{step}.jsonl")
        assert rows == fs.cat_file(f"two-nodes/local/dataflow_cache_step_step{step}.jsonl") and rows
        manifests = [json.loads(fs.cat_file(f"two-nodes/{run}/dataflow_cache_step_step{step}.manifest.json"))
                     for run in ("local", "ray")]
        local_manifest, ray_manifest = ({k: v for k, v in m.items() if k not in (*TIMINGS, *PLACES)}
                                        for m in manifests)
        assert ray_manifest == local_manifest
    images = sorted(path.split("/ray/", 1)[1] for path in fs.find("two-nodes/ray") if path.endswith(".png"))
    assert len(images) == on_ray[0].images_written == local[0].images_written == 8  # row 4 fails
    assert all(fs.cat_file(f"two-nodes/ray/{path}") == fs.cat_file(f"two-nodes/local/{path}") for path in images)
    assert not list((tmp_path / "ray_work").rglob("*.png"))  # written by the worker, straight to S3


def test_images_written_on_the_worker_reach_the_drivers_cache(two_node_cluster, tmp_path):
    """The worker has a folder at the cache's path (as a node with a local /data has): before,
    the step published rows whose 10 images lay on the worker's disk only."""
    address, private = two_node_cluster
    entry = entry_file(tmp_path)
    local = run(entry, tmp_path / "local", NoiseImages(), LocalRunner())
    cache = private / "same_path" / "cache"
    on_ray = run(entry, cache, NoiseImages(), RayRunner(address, replicas=2))
    assert on_ray.images_written == local.images_written == 10
    same_outputs(tmp_path / "local", local, cache, on_ray)  # every image read from the driver's disk
    assert not list(cache.rglob(".dataflowmm-node-check"))


def manifest(cache: Path, step: int) -> dict:
    found = json.loads((cache / f"dataflow_cache_step_step{step}.manifest.json").read_text())
    text = json.dumps({key: value for key, value in found.items() if key not in TIMINGS})
    return json.loads(text.replace(str(cache), "CACHE"))


def manifest_and_summary(cache: Path, moved: Path, step: int, summary):
    """The step's manifest, and its summary pointing where the cache will be moved."""
    summary.output_path = summary.output_path.replace(str(cache), str(moved))
    return manifest(cache, step), summary


def test_three_step_pipeline_on_two_nodes_gives_the_local_bytes(two_node_cluster, tmp_path, tiny_model):
    """Generate -> caption -> CLIP filter: the input and every step's images exist only on the
    driver's disk; rows, images and manifests (timings aside) are the local runner's."""
    address, private = two_node_cluster
    entry = private / "input" / "prompts.jsonl"
    entry.parent.mkdir()
    entry.write_text("".join(json.dumps({"prompt": f"a red circle {i}"}) + "\n" for i in range(6)))
    sd, blip, clip = (str(tiny_model(name)) for name in ("tiny-sd", "tiny-blip", "tiny-clip"))

    def pipeline(cache: Path, runner) -> list:
        storage = FileStorage(entry, cache_path=cache, runner=runner)
        return [
            PromptedImageGenerator(LocalImageGenServing(sd, batch_size=2, num_inference_steps=2, height=32,
                                                        width=32), save_interval=2).run(
                storage.step(), input_prompt_key="prompt", output_image_key="images"),
            ImageCaptioner(LocalCaptionServing(blip, max_new_tokens=4, batch_size=2), save_interval=2).run(
                storage.step(), input_image_key="images"),
            ClipScoreFilter(ClipServing(clip, batch_size=2), min_score=-0.12, keep_dropped=True,
                            save_interval=2).run(storage.step(), input_image_key="images", input_text_key="prompt"),
        ]

    # Both runs in the same folder (the local one moved away after), as fingerprints chain paths.
    cache, moved = private / "run", tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the worker's 2 actors on its 2 CPUs
    try:
        local = [manifest_and_summary(cache, moved, step, summary)
                 for step, summary in enumerate(pipeline(cache, LocalRunner()), start=1)]
    finally:
        torch.set_num_threads(threads)
    cache.rename(moved)
    on_ray = pipeline(cache, RayRunner(address, replicas=2))
    for step, ((local_manifest, one), other) in enumerate(zip(local, on_ray, strict=True), start=1):
        same_outputs(moved, one, cache, other)
        assert local_manifest == manifest(cache, step)
    assert on_ray[0].images_written == 6 and len(list(cache.glob("*_images/*.png"))) == 6
    assert on_ray[2].rows_dropped == local[2][1].rows_dropped
    dropped = "dataflow_cache_step_step3.dropped.jsonl"
    assert (cache / dropped).read_bytes() == (moved / dropped).read_bytes()


def test_a_worker_process_killed_mid_step_changes_nothing(two_node_cluster, tmp_path):
    address, private = two_node_cluster
    entry = entry_file(tmp_path, n=14)
    local = run(entry, tmp_path / "local", NoiseImages(), LocalRunner())
    dying = NoiseImages(die_marker=str(tmp_path / "died"), die_at=7)  # the marker is on shared disk
    on_ray = run(entry, private / "killed", dying, RayRunner(address, replicas=2))
    assert (tmp_path / "died").exists()  # an actor on the worker really was killed
    same_outputs(tmp_path / "local", local, private / "killed", on_ray)


DRIVER_ONLY_MODULE = '''
import os

import numpy as np
from PIL import Image

from dataflowmm.contract import Input, Operator, Output
from dataflowmm.io.images import image_file_name, save_png


class Shout(Operator):
    """Upper-cases the text, draws a flat image, and says whether it got the driver's HF_TOKEN."""

    columns = [Input("text", "input_text_key", "text"),
               Output("image", "output_image_key", "image", images=True, empty=None)]

    def __init__(self, save_interval=2):
        pass

    def process_batch(self, rows, row_ids, context):
        out = []
        for row, row_id in zip(rows, row_ids, strict=True):
            pixels = np.full((4, 4, 3), len(row["text"]), dtype=np.uint8)
            path = save_png(Image.fromarray(pixels), context.save_dir / image_file_name(row_id, 0))
            out.append({**row, "text": row["text"].upper(), "image": str(path),
                        "token_seen": os.environ.get("HF_TOKEN") == "hf_not_a_real_token_1234"})
        return out
'''


def test_a_pipeline_module_only_in_the_drivers_folder_runs(two_node_cluster, tmp_path, monkeypatch):
    import ray

    from dataflowmm.execution.ray_actors import close_actor_pool

    address, private = two_node_cluster
    folder = private / "my_pipeline"
    folder.mkdir()
    (folder / "driver_only_ops.py").write_text(DRIVER_ONLY_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_1234")
    from driver_only_ops import Shout

    close_actor_pool()
    ray.shutdown()  # the runner joins again, shipping this module's folder as working_dir
    try:
        entry = entry_file(folder, n=5, empty_at=())
        summary = run(entry, folder / "cache", Shout(), RayRunner(address, replicas=2))
    finally:
        sys.modules.pop("driver_only_ops", None)
    rows = [json.loads(line) for line in Path(summary.output_path).read_text().splitlines()]
    assert [row["text"] for row in rows] == [f"ROW {i}" for i in range(5)]
    assert all(row["token_seen"] for row in rows) and summary.errors == 0
    assert all((folder / "cache" / row["image"]).is_file() for row in rows)
    assert "hf_not_a_real_token_1234" not in "".join(p.read_text() for p in (folder / "cache").glob("*.json"))
    assert os.environ["HF_TOKEN"]  # (set by monkeypatch, removed after)
