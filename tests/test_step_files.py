"""What a step leaves on disk: file modes, no stale or empty folders, honest reuse, Ctrl-C."""

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from test_local_runner import Crash, NoiseImageOperator, make_entry, run_once

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.local_runner import run_step
from dataflowmm.execution.step import StepInterrupted
from dataflowmm.io.images import image_file_name, save_png
from dataflowmm.seeds import derive_seed


class ManyImages(NoiseImageOperator):
    """`count` images per row, named by row identity and index."""

    def __init__(self, count=2, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def process_batch(self, rows, row_ids, context):
        out = []
        for row, row_id in zip(rows, row_ids, strict=True):
            paths = []
            for index in range(self.count):
                pixels = np.random.default_rng(derive_seed(index, row_id)).integers(0, 255, (4, 4, 3))
                paths.append(str(save_png(Image.fromarray(pixels.astype("uint8")),
                                          context.save_dir / image_file_name(row_id, index))))
            out.append({**row, "images": paths})
        return out


class Interrupting(NoiseImageOperator):
    """Ctrl-C arrives during batch number `at`."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def process_batch(self, rows, row_ids, context):
        if len(self.batches_seen) == self.at:
            raise KeyboardInterrupt
        return super().process_batch(rows, row_ids, context)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- file modes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
@pytest.mark.parametrize("cache_type", ["jsonl", "parquet"])
def test_published_files_get_the_mode_the_umask_gives(tmp_path, umask, expected, cache_type):
    entry = make_entry(tmp_path, n=3)
    previous = os.umask(umask)
    try:
        _, storage = run_once(entry, tmp_path / "cache", NoiseImageOperator(), cache_type=cache_type)
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".png", ".json", f".{cache_type}"} <= kinds
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(expected)}, modes


# -- stale images and empty folders ----------------------------------------------------------


def test_rerun_with_fewer_images_removes_the_earlier_runs_images_from_the_default_folder(tmp_path):
    entry = make_entry(tmp_path, n=3)
    run_once(entry, tmp_path / "cache", ManyImages(count=3))
    summary, storage = run_once(entry, tmp_path / "cache", ManyImages(count=1))

    folder = storage.images_dir
    rows = [json.loads(line) for line in open(summary.output_path)]
    referenced = sorted(os.path.relpath(tmp_path / "cache" / p, folder) for row in rows for p in row["images"])
    assert files_under(folder) == referenced and len(referenced) == 3


def test_a_users_save_dir_is_never_cleaned(tmp_path):
    entry = make_entry(tmp_path, n=3)
    shared = tmp_path / "shared_images"
    shared.mkdir()
    (shared / "someone_elses.png").write_bytes(b"not ours")
    run_once(entry, tmp_path / "cache", ManyImages(count=3, save_dir=shared))
    run_once(entry, tmp_path / "cache", ManyImages(count=1, save_dir=shared))
    assert len(files_under(shared)) == 1 + 3 * 3  # the stranger's file and both runs' images


def test_a_failed_model_load_leaves_no_empty_folders(tmp_path):
    entry = make_entry(tmp_path, n=3)
    storage = FileStorage(entry, cache_path=tmp_path / "cache").step()
    with pytest.raises(Crash):
        run_step(storage, NoiseImageOperator(crash_after_batches=0))  # fails like a model load would
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_failure_after_finished_chunks_keeps_them_for_the_rerun(tmp_path):
    entry = make_entry(tmp_path, n=7)
    storage = FileStorage(entry, cache_path=tmp_path / "cache").step()
    with pytest.raises(Crash):
        run_step(storage, NoiseImageOperator(crash_after_batches=2))  # chunks of 4 rows: one finished
    assert storage.checkpoint_dir.is_dir()
    assert run_step(FileStorage(entry, cache_path=tmp_path / "cache").step(),
                    NoiseImageOperator()).chunks_resumed == 1


def test_a_step_that_writes_no_images_creates_no_images_folder(tmp_path):
    from dataflowmm.operators import PromptTemplate

    entry = make_entry(tmp_path, n=2)
    storage = FileStorage(entry, cache_path=tmp_path / "cache").step()
    PromptTemplate("say {text}").run(storage, output_key="prompt")
    assert not storage.images_dir.exists()


# -- reuse -----------------------------------------------------------------------------------


def test_deleted_images_make_a_finished_step_recompute(tmp_path, capsys):
    entry = make_entry(tmp_path, n=3)
    run_once(entry, tmp_path / "cache", NoiseImageOperator())
    summary, storage = run_once(entry, tmp_path / "cache", NoiseImageOperator())
    assert summary.reused
    victim = sorted(storage.images_dir.iterdir())[0]
    victim.unlink()

    summary, _ = run_once(entry, tmp_path / "cache", NoiseImageOperator())
    assert not summary.reused and summary.images_written == 3 and victim.is_file()
    assert f"image {storage.images_dir.name}/{victim.name} is missing" in capsys.readouterr().err


def test_strict_does_not_reuse_a_step_that_recorded_errors(tmp_path):
    entry = make_entry(tmp_path, n=3, empty_at={1})
    summary, _ = run_once(entry, tmp_path / "cache", NoiseImageOperator())
    assert summary.errors == 1
    assert run_once(entry, tmp_path / "cache", NoiseImageOperator()).__getitem__(0).reused
    with pytest.raises(ValueError, match=r"input.jsonl: row 1: key 'text': empty prompt"):
        run_once(entry, tmp_path / "cache", NoiseImageOperator(strict=True))


def test_a_model_folder_rebuilt_with_other_weights_changes_the_fingerprint(tmp_path, tiny_model):
    import shutil

    from dataflowmm.serving import ClipServing

    folder = tmp_path / "clip"
    shutil.copytree(tiny_model("tiny-clip"), folder)
    before = ClipServing(str(folder)).config()
    assert before == ClipServing(str(folder)).config()
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, same header, other weights
    weights.write_bytes(bytes(data))
    after = ClipServing(str(folder)).config()
    assert after["model"] == before["model"] and after["model_content"] != before["model_content"]


def test_a_step_recomputes_when_its_local_model_folder_was_rebuilt(tmp_path, tiny_model):
    import shutil

    from dataflowmm.operators import ImageCaptioner
    from dataflowmm.serving import LocalCaptionServing

    folder = tmp_path / "blip"
    shutil.copytree(tiny_model("tiny-blip"), folder)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    entry = tmp_path / "rows.jsonl"
    entry.write_text(json.dumps({"images": ["red.png"], "text": ""}) + "\n")

    def caption():
        operator = ImageCaptioner(LocalCaptionServing(str(folder), max_new_tokens=4), keep_original_sample=False)
        return operator.run(FileStorage(entry, cache_path=tmp_path / "cache").step())

    assert not caption().reused
    assert caption().reused
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # rebuilt in place: same path, same size, other weights
    weights.write_bytes(bytes(data))
    assert not caption().reused


# -- Ctrl-C and progress ---------------------------------------------------------------------


def test_ctrl_c_prints_one_line_with_what_was_saved_and_the_rerun_resumes(tmp_path, capsys):
    entry = make_entry(tmp_path, n=7)

    def main(argv):
        storage = FileStorage(entry, cache_path=tmp_path / "cache")
        return run_step(storage.step(), Interrupting(at=int(argv[0])))

    with pytest.raises(SystemExit) as exited:
        run_script(main, ["3"])  # batches of 2, chunks of 4 rows: one chunk finished
    assert exited.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("interrupted in step 1 Interrupting: 4 of 7 rows saved in 1 finished "
                       "chunk; run the same command to resume")
    assert not any("Traceback" in line for line in err)

    summary = run_script(main, ["99"])
    assert summary.chunks_resumed == 1 and summary.rows_out == 7


def test_ctrl_c_before_any_chunk_finished_says_nothing_was_saved(tmp_path):
    entry = make_entry(tmp_path, n=7)
    with pytest.raises(StepInterrupted, match=r"0 of 7 rows saved \(a chunk of 4 rows is saved when it finishes\)"):
        run_step(FileStorage(entry, cache_path=tmp_path / "cache").step(), Interrupting(at=1))


def test_without_a_terminal_progress_comes_as_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATAFLOWMM_PROGRESS_INTERVAL", "0")
    entry = make_entry(tmp_path, n=5)
    run_once(entry, tmp_path / "cache", NoiseImageOperator())
    lines = [line for line in capsys.readouterr().err.splitlines() if "rows/s" in line]
    assert lines[0].startswith("[dataflowmm] step 1 NoiseImageOperator: 2/5 rows, ")
    assert lines[-1].startswith("[dataflowmm] step 1 NoiseImageOperator: 5/5 rows, ")
    assert all(", ETA " in line for line in lines)
