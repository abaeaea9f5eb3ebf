"""The image-editing scaffold on the shapes world, offline: instructions, shapes-sd edits,
verification, difference captions, edit triples exported for training; Ray writes the same bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dataflowmm.io.images import load_image
from dataflowmm.kit.shapes_edits import judge_edit
from dataflowmm.scaffold import load_pipeline_module

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from llava_loader import load_llava_samples  # noqa: E402

pytest.importorskip("openai")  # the loopback chat server is spoken to through the openai client
scaffold = load_pipeline_module(REPO / "gpu_pipelines" / "image_editing_pipeline.py")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The scaffold run once with --tiny in this process, for both tests (one torch thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = tmp_path_factory.mktemp("editing") / "local"
        return cache, scaffold.main(["--tiny", "--cache-path", str(cache)])
    finally:
        torch.set_num_threads(threads)


def test_tiny_pipeline_makes_verified_edit_triples(local_run):
    cache, summaries = local_run
    sources = rows_of(scaffold.DEFAULT_INPUT)
    assert len(sources) >= 8 and summaries[1].images_written == len(sources)
    verified = summaries[3]
    assert verified.rows_in == len(sources) and verified.rows_out + verified.rows_dropped == len(sources)
    for row in rows_of(verified.dropped_path):
        assert row["dropped_by"].startswith("EditVerifier: ") and row["edit_scores"]["target_score"] is not None
    triples = rows_of(summaries[-1].output_path)
    assert len(triples) == verified.rows_out >= 6
    right = 0
    for row in triples:
        assert row["instruction"] == f"make the {row['shape']} {row['target_colour']}"
        assert row["target_caption"] == f"a {row['target_colour']} {row['shape']} on a {row['background']} background"
        edited = load_image(cache / row["edited_image"])
        assert (cache / row["source_image"]).is_file() and edited.size == (32, 32)
        right += judge_edit(row, edited, row["target_colour"])["right"]
        assert row["error"] is None and len(row["bbox_tag"]) >= 1
    print(f"kept {len(triples)} of {len(sources)} edits; right by the pixel judge: {right}")
    assert right >= 0.75 * len(triples)  # the README's figure is measured on 66 edits: 0.96
    samples = load_llava_samples(cache / "llava" / "edits.json", cache / "llava")
    assert len(samples) == len(triples) and all(len(sample["images"]) == 2 for sample in samples)
    assert [sample["conversations"][1]["value"] for sample in samples] == [row["instruction"] for row in triples]
    datasets = pytest.importorskip("datasets")
    dataset = datasets.load_from_disk(str(cache / "edit_triples_hf"))
    assert dataset.num_rows == len(triples) and isinstance(dataset.features["edited_image"], datasets.Image)
    assert dataset[0]["edited_image"].size == (32, 32) and dataset[0]["instruction"] == triples[0]["instruction"]


@pytest.mark.slow  # ~40 s: two Ray actors import torch and diffusers and load the shapes models
def test_ray_writes_the_local_bytes(tmp_path, local_run, ray_cluster):
    """Every step, on two Ray actors of one torch thread each, as the local run at one thread:
    PromptedImageEditGenerator's edits included (the operator's Ray test, for every step)."""
    cache, local = local_run
    on_ray = scaffold.main(["--tiny", "--cache-path", str(tmp_path / "ray"), "--runner", "ray", "--replicas", "2"])
    for mine, theirs in zip(local, on_ray, strict=True):
        assert Path(mine.output_path).read_bytes() == Path(theirs.output_path).read_bytes(), mine.operator
    for row in rows_of(local[1].output_path):
        for path in row["edited_images"]:
            assert (cache / path).read_bytes() == (tmp_path / "ray" / path).read_bytes()
