"""The dataflowmm command: init, models, and a scaffolded pipeline run where it was scaffolded."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from click.testing import CliRunner

from dataflowmm.cli import main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from llava_loader import load_llava_samples  # noqa: E402


def test_init_scaffolds_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gpu_pipelines" / "text_to_image_generation_pipeline.py").is_file()
    assert (tmp_path / "example_data" / "text_to_image" / "prompts.jsonl").is_file()

    (tmp_path / "gpu_pipelines" / "text_to_image_generation_pipeline.py").write_text("# mine")
    refused = runner.invoke(main, ["init", str(tmp_path)])
    assert refused.exit_code != 0 and "--force" in refused.output
    assert (tmp_path / "gpu_pipelines" / "text_to_image_generation_pipeline.py").read_text() == "# mine"

    forced = runner.invoke(main, ["init", str(tmp_path), "--force"])
    assert forced.exit_code == 0
    assert "TextToImagePipeline" in (tmp_path / "gpu_pipelines" / "text_to_image_generation_pipeline.py").read_text()


def test_models_tiny_builds_loadable_folders(tmp_path):
    result = CliRunner().invoke(main, ["models", "tiny", str(tmp_path), "--name", "tiny-sd"])
    assert result.exit_code == 0, result.output
    assert "tiny-sd" in result.output and (tmp_path / "tiny-sd" / "model_index.json").is_file()


def test_scaffolded_pipeline_runs_with_tiny(tmp_path):
    CliRunner().invoke(main, ["init", str(tmp_path)], catch_exceptions=False)
    pipelines = tmp_path / "gpu_pipelines"
    completed = subprocess.run([sys.executable, "text_to_image_generation_pipeline.py", "--tiny"],
                               cwd=pipelines, capture_output=True, text=True, env=os.environ.copy())
    assert completed.returncode == 0, completed.stderr
    output = tmp_path / "cache_local" / "text_to_image" / "dataflow_cache_step_step1.jsonl"  # beside the scaffolds
    rows = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert len(rows) == 8 and all(row["images"] and row["error"] is None for row in rows)
    assert all((output.parent / path).is_file() for row in rows for path in row["images"])
    assert "8 rows in, 8 rows out, 9 images written, 0 errors" in completed.stderr
    noise = [line for line in completed.stderr.splitlines() if not line.startswith("[dataflowmm]")]
    assert noise == []  # the model libraries' notices and load bars are hidden


def test_wheel_carries_the_scaffolds_and_the_shipped_weights(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("dataflowmm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dataflowmm/_scaffolds/gpu_pipelines/text_to_image_generation_pipeline.py" in names
    assert "dataflowmm/_scaffolds/example_data/text_to_image/prompts.jsonl" in names
    shipped = {path.relative_to(REPO).as_posix() for path in (REPO / "dataflowmm/kit/weights").rglob("*")
               if path.is_file()}
    assert "dataflowmm/kit/weights/shapes-sd/unet/diffusion_pytorch_model.safetensors" in shipped
    assert shipped <= set(names)  # .gitignore's *.safetensors keeps none of them out
    # installed from the wheel (not the checkout), init still finds them
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    project = tmp_path / "project"
    code = "import sys; from dataflowmm.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import dataflowmm.scaffold as s; print(s.scaffold_root())"],
                           check=True, env=env, capture_output=True, text=True, cwd=tmp_path).stdout
    assert where.strip().startswith(str(target))
    subprocess.run([sys.executable, "-c", code, "init", str(project)], check=True, env=env, cwd=tmp_path)
    assert (project / "gpu_pipelines" / "text_to_image_generation_pipeline.py").is_file()
    # and trained:NAME resolves from the installed copy, with no training
    resolved = subprocess.run(
        [sys.executable, "-c", "from dataflowmm.kit.shipped_weights import shipped_folder; "
                               "print(shipped_folder('shapes-clip'))"],
        check=True, env=env, capture_output=True, text=True, cwd=tmp_path).stdout
    assert resolved.strip().startswith(str(target))


def test_demo_runs_every_pipeline_on_tiny_models(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "demo" / "cache_local"
    generated = [json.loads(line) for line in open(cache / "text_to_image" / "dataflow_cache_step_step1.jsonl")]
    assert len(generated) == 8 and all(row["images"] for row in generated)
    captions = [json.loads(line) for line in open(cache / "image_captioning" / "dataflow_cache_step_step1.jsonl")]
    assert len(captions) == 7  # 3 rows with images: original + caption each; 1 row passes through
    augmented = [json.loads(line)
                 for line in open(cache / "image_augmentation" / "dataflow_cache_step_step2.jsonl")]
    assert len(augmented) == 9  # step 1 kept 3 caption rows; step 2 adds 2 variations of each
    for row in augmented:
        assert row["error"] is None and row["caption"]
        for path in row["images"]:
            assert (cache / "image_augmentation" / path).is_file()
    illustrations = [json.loads(line)
                     for line in open(cache / "image_generation_task" / "dataflow_cache_step_step1.jsonl")]
    assert len(illustrations) == 9  # 4 usable subjects x 2 generations + 1 row kept with its error
    assert sum(row["error"] is not None for row in illustrations) == 1
    differences = [json.loads(line) for line in open(cache / "image_difference" / "dataflow_cache_step_step2.jsonl")]
    assert len(differences) == 6 and all(row["error"] is None and row["bbox_tag"] for row in differences)
    scored = [json.loads(line) for line in open(cache / "shapes_world" / "dataflow_cache_step_step3.jsonl")]
    assert len(scored) == 8 and all(row["caption"] and len(row["clip_score"]) == 1 for row in scored)
    # The shapes models mean something: most captions of the generated images name the
    # prompt's colour, and the table the demo prints shows them.
    colour = sum(row["prompt"].split()[1] == row["caption"].split()[1] for row in scored)
    assert colour >= 6, [(row["prompt"], row["caption"]) for row in scored]
    assert "caption of the generated image" in result.output and scored[0]["prompt"] in result.output
    # Visual QA against the loopback chat server: every answer is the pixel truth, and the table shows them.
    answered = [json.loads(line) for line in open(cache / "visual_qa" / "dataflow_cache_step_step1.jsonl")]
    assert len(answered) == 8 and all(row["answer"] == row["truth"] for row in answered)
    assert answered[3]["question"] in result.output and answered[3]["answer"] in result.output
    conversations = [json.loads(line) for line in open(cache / "visual_qa" / "dataflow_cache_step_step2.jsonl")]
    assert all(row["conversations"][0]["value"].startswith("<image>\n") for row in conversations)
    # ... exported as LLaVA training JSON that a LLaVA-style loader reads, images and all.
    samples = load_llava_samples(cache / "visual_qa" / "llava" / "conversations.json", cache / "visual_qa" / "llava")
    assert len(samples) == len(conversations) and all(sample["images"] for sample in samples)
    assert samples[0]["conversations"][1]["value"] == conversations[0]["conversations"][1]["value"]
    # Instruction edits by shapes-sd, verified: most kept, each an edit triple.
    edits = [json.loads(line) for line in open(cache / "image_editing" / "dataflow_cache_step_step6.jsonl")]
    assert len(edits) >= 5 and all(row["source_image"] and row["edited_image"] for row in edits)
    assert edits[0]["instruction"] in result.output and "edit triples:" in result.output
    assert "demo finished" in result.output
    # The demo ends on the gallery a person can judge: the shapes world's kept and dropped rows.
    gallery = cache / "shapes_world" / "gallery.html"
    assert result.stdout.strip().splitlines()[-1] == f"gallery: {gallery.resolve()}" and gallery.is_file()
    assert "Saving the dataset" not in result.output  # no library progress bars without --debug
