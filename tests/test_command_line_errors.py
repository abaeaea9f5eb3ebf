"""A user's mistake on the command line: one line, non-zero exit; --debug gives the traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataflowmm.cli import run as dataflowmm_command
from dataflowmm.console import run_script
from dataflowmm.scaffold import init_project, load_pipeline_module
from dataflowmm.serving import LocalImageGenServing
from dataflowmm.serving.model_source import hub_reachable

HINT = " (--debug shows the traceback)"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    init_project(folder)
    return folder


@pytest.fixture(scope="module")
def text_to_image(project):
    return load_pipeline_module(project / "gpu_pipelines" / "text_to_image_generation_pipeline.py")


def fails_with(main, argv, capsys):
    """The exit code and the stderr lines of a failing scaffold run."""
    with pytest.raises(SystemExit) as exited:
        run_script(main, argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def test_missing_input_file(text_to_image, tmp_path, capsys):
    code, err = fails_with(text_to_image.main, ["--tiny", "--input", str(tmp_path / "nope.jsonl"),
                                                "--cache-path", str(tmp_path / "cache")], capsys)
    assert code == 1
    assert err == [f"error: first_entry_file_name not found: {tmp_path / 'nope.jsonl'}{HINT}"]


def test_malformed_jsonl_line(text_to_image, tmp_path, capsys):
    entry = tmp_path / "prompts.jsonl"
    entry.write_text('{"conversations": [{"role": "user", "content": "a cat"}]}\n{"conversations": [\n')
    code, err = fails_with(text_to_image.main, ["--tiny", "--input", str(entry),
                                                "--cache-path", str(tmp_path / "cache")], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {entry}:2: malformed JSON line") and err[0].endswith(HINT)


def test_a_key_no_row_has(text_to_image, tmp_path, capsys):
    entry = tmp_path / "prompts.jsonl"
    entry.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    code, err = fails_with(text_to_image.main, ["--tiny", "--input", str(entry),
                                                "--cache-path", str(tmp_path / "cache")], capsys)
    assert (code, err) == (1, [f"error: {entry}: no row has key 'conversations'; keys found: ['prompt']{HINT}"])


def test_unknown_hub_id_offline(text_to_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = fails_with(text_to_image.main, ["--model", "nobody/no-such-model",
                                                "--cache-path", str(tmp_path / "cache")], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: could not load model 'nobody/no-such-model': HF_HUB_OFFLINE is set "
                             "and 'nobody/no-such-model' is not in the local Hugging Face cache; ")
    assert "tiny:tiny-sd" in err[0]
    assert list((tmp_path / "cache").iterdir()) == []  # no empty .partial/ or _images/ left


def test_unreachable_hub_fails_at_once_saying_so(text_to_image, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub_reachable.cache_clear()
    code, err = fails_with(text_to_image.main, ["--model", "nobody/no-such-model",
                                                "--cache-path", str(tmp_path / "cache")], capsys)
    assert code == 1 and len(err) == 1
    assert ("the Hugging Face Hub (http://127.0.0.1:9) cannot be reached from here and "
            "'nobody/no-such-model' is not in the local Hugging Face cache") in err[0]


def test_debug_gives_the_traceback(text_to_image, tmp_path):
    with pytest.raises(FileNotFoundError, match="first_entry_file_name not found"):
        run_script(text_to_image.main, ["--tiny", "--input", str(tmp_path / "nope.jsonl"), "--debug"])


def test_the_scaffold_script_itself_prints_one_line(project, tmp_path):
    script = project / "gpu_pipelines" / "text_to_image_generation_pipeline.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--input", str(tmp_path / "nope.jsonl")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DATAFLOWMM_DEBUG": ""})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: first_entry_file_name not found: {tmp_path / 'nope.jsonl'}{HINT}"]


def test_the_default_cache_is_beside_the_scaffold_not_where_you_stand(text_to_image, project):
    assert Path(text_to_image.parse_args([]).cache_path) == project / "cache_local" / "text_to_image"


def test_dataflowmm_command_mistake_is_one_line(project, capsys):
    with pytest.raises(SystemExit) as exited:
        dataflowmm_command(["init", str(project)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and len(err) == 1
    assert err[0].startswith("Error: ") and "already exists; pass --force to overwrite" in err[0]


def test_models_list_says_where_each_model_is_and_whether_it_is_built(tiny_model, tiny_models_dir, capsys):
    tiny_model("tiny-clip")
    dataflowmm_command(["models", "list"])  # returns: exit code 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "tiny:tiny-sd" in lines and "tiny:tiny-clip" in lines
    assert " built " in lines["tiny:tiny-clip"] and lines["tiny:tiny-clip"].endswith(str(tiny_models_dir / "tiny-clip"))


def test_a_serving_takes_a_tiny_model_by_name(tiny_models_dir):
    serving = LocalImageGenServing("tiny:tiny-sd", height=32, width=32, num_inference_steps=2)
    assert serving.config()["model"] == "tiny:tiny-sd"
    images = serving.generate(["a red circle"], seeds=[0])
    assert images[0][0].size == (32, 32)
    with pytest.raises(ValueError, match=r"unknown tiny model 'tiny:nope'; choose from tiny:tiny-sd, "):
        LocalImageGenServing("tiny:nope")
