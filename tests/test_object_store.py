"""Entry files, images and the step cache on S3: moto's server on loopback speaks the protocol.

One session server (`ThreadedMotoServer` on 127.0.0.1, a free port); the fixture sets fake
`AWS_*` credentials and `AWS_ENDPOINT_URL`, so the scaffolds take `s3://` URLs with no
other option, as a user's would. No test talks to any other address.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from click.testing import CliRunner  # noqa: E402

from dataflowmm import FileStorage  # noqa: E402
from dataflowmm.cli import main  # noqa: E402
from dataflowmm.console import run_script  # noqa: E402
from dataflowmm.execution.cache_lock import CacheInUse  # noqa: E402
from dataflowmm.io.remote import RemoteStorageError, filesystem  # noqa: E402
from dataflowmm.scaffold import init_project, load_pipeline_module  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_local_runner import Crash, NoiseImageOperator, make_entry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
from conftest import FAKE_SECRET  # noqa: E402

VOLATILE = {"fingerprint", "input_fingerprint", "mtime_ns", "written_at"}  # paths and clocks


@pytest.fixture
def bucket(s3_endpoint, request, monkeypatch, tmp_path):
    """A fresh bucket per test; the default local working folders under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fs, _ = filesystem("s3://x")
    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    fs.mkdir(name)
    fs.invalidate_cache()
    return fs, name


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    init_project(folder)
    return folder


def manifest_without_volatile(text: str) -> dict:
    return {key: value for key, value in json.loads(text).items() if key not in VOLATILE}


def scaffold_outputs(fs, cache: str | Path, name: str = "dataflow_cache_step_step1") -> tuple[bytes, dict, dict]:
    """(rows bytes, manifest, {image path: bytes}) of step 1 in a local folder or on S3."""
    read = (lambda rel: fs.cat_file(f"{cache[5:]}/{rel}")) if isinstance(cache, str) else \
        (lambda rel: (cache / rel).read_bytes())
    rows = read(f"{name}.jsonl")
    images = {}
    for line in rows.splitlines():
        for key in ("image", "images"):
            value = json.loads(line).get(key)
            for path in value if isinstance(value, list) else [value] if isinstance(value, str) else []:
                if path.startswith(f"{name}_images/"):
                    images[path] = read(path)
    return rows, manifest_without_volatile(read(f"{name}.manifest.json")), images


def test_text_to_image_scaffold_on_s3_gives_the_local_run_bytes(project, bucket, tmp_path, capsys):
    fs, name = bucket
    scaffold = load_pipeline_module(project / "gpu_pipelines" / "text_to_image_generation_pipeline.py")
    entry = project / "example_data" / "text_to_image" / "prompts.jsonl"
    fs.put_file(str(entry), f"{name}/in/prompts.jsonl")
    run_script(scaffold.main, ["--tiny", "--input", str(entry), "--cache-path", str(tmp_path / "local")])
    run_script(scaffold.main, ["--tiny", "--input", f"s3://{name}/in/prompts.jsonl", "--cache-path", f"s3://{name}/run1"])
    err = capsys.readouterr().err
    assert f"-> s3://{name}/run1/dataflow_cache_step_step1.jsonl" in err
    local, remote = scaffold_outputs(fs, tmp_path / "local"), scaffold_outputs(fs, f"s3://{name}/run1")
    assert remote[0] == local[0] and remote[1] == local[1]
    assert remote[2] == local[2] and len(remote[2]) == local[1]["images_written"] > 0
    left = sorted(path.rsplit("/", 1)[-1] for path in fs.find(f"{name}/run1") if "_images/" not in path)
    assert left == ["dataflow_cache_step_step1.jsonl", "dataflow_cache_step_step1.manifest.json"]  # no chunk, no lock
    step_url = f"s3://{name}/run1/dataflow_cache_step_step1.jsonl"  # exports and the gallery read it
    cli = CliRunner()
    exported = cli.invoke(main, ["export", step_url, "--to", "llava", f"s3://{name}/export/train.json"])
    assert exported.exit_code == 0 and f"-> s3://{name}/export/train.json" in exported.output
    fs.invalidate_cache()
    conversations = json.loads(fs.cat_file(f"{name}/export/train.json"))
    names = [n for c in conversations for n in (c["image"] if isinstance(c["image"], list) else [c["image"]])]
    assert len(conversations) == remote[0].count(b"\n") and len(names) == len(remote[2])
    assert all(fs.exists(f"{name}/export/{image}") for image in names)
    page = cli.invoke(main, ["gallery", step_url, "-o", str(tmp_path / "gallery.html")])
    assert page.exit_code == 0 and (tmp_path / "gallery.html").read_text().count("data:image/") >= len(remote[2])


def test_captioning_scaffold_reads_entry_and_images_from_s3(project, bucket, tmp_path, capsys):
    fs, name = bucket
    scaffold = load_pipeline_module(project / "gpu_pipelines" / "image_captioning_pipeline.py")
    fs.put(str(project / "example_data" / "image_captioning"), f"{name}/data/", recursive=True)
    fs.put(str(project / "example_data" / "images"), f"{name}/data/", recursive=True)
    fs.get(f"{name}/data", str(tmp_path / "data"), recursive=True)  # the same layout on disk
    entry = tmp_path / "data" / "image_captioning" / "images.jsonl"
    run_script(scaffold.main, ["--tiny", "--input", str(entry), "--cache-path", str(tmp_path / "run1")])
    url = f"s3://{name}/data/image_captioning/images.jsonl"
    run_script(scaffold.main, ["--tiny", "--input", url, "--cache-path", f"s3://{name}/run1"])
    assert ", 0 errors" in capsys.readouterr().err.splitlines()[-1]
    remote, local = scaffold_outputs(fs, f"s3://{name}/run1"), scaffold_outputs(fs, tmp_path / "run1")
    assert remote[:2] == local[:2] and b'"images":["../data/images/red_circle.png"]' in remote[0]


def test_killed_step_resumes_from_chunk_objects_on_another_machine(bucket, tmp_path):
    fs, name = bucket
    entry = make_entry(tmp_path, n=9)
    cache = f"s3://{name}/run1"
    reference = NoiseImageOperator()
    reference.run(FileStorage(entry, cache_path=tmp_path / "plain").step())
    with pytest.raises(Crash):
        NoiseImageOperator(crash_after_batches=3).run(
            FileStorage(entry, cache_path=cache, work_dir=tmp_path / "machine-a").step())
    chunks = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{name}/run1/dataflow_cache_step_step1.partial"))
    assert chunks == ["chunk-000000.jsonl", "meta.json"]  # 3 batches of 2 = one chunk of 4 rows + a half
    resumed = NoiseImageOperator()
    summary = resumed.run(FileStorage(entry, cache_path=cache, work_dir=tmp_path / "machine-b").step())
    assert summary.chunks_resumed == 1
    assert [text for batch in resumed.batches_seen for text in batch] == [f"prompt {i}" for i in range(4, 9)]
    def without_source(data: bytes) -> list[dict]:  # a local input's path, as seen from each cache
        return [{k: v for k, v in json.loads(line).items() if k != "source"} for line in data.splitlines()]

    rows = fs.cat_file(f"{name}/run1/dataflow_cache_step_step1.jsonl")
    assert without_source(rows) == without_source((tmp_path / "plain" / "dataflow_cache_step_step1.jsonl").read_bytes())
    images = fs.find(f"{name}/run1/dataflow_cache_step_step1_images")
    assert len(images) == 9 and not fs.exists(f"{name}/run1/dataflow_cache_step_step1.partial")
    again = NoiseImageOperator()  # a third machine reuses the finished step from the store
    assert again.run(FileStorage(entry, cache_path=cache, work_dir=tmp_path / "machine-c").step()).reused


SIGKILLED_CHILD = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from test_local_runner import NoiseImageOperator
from dataflowmm import FileStorage
entry, cache, work, marker = sys.argv[2:6]

operator = NoiseImageOperator()  # the parent's operator and fingerprint: only this run's calls block
process = operator.process_batch

def blocking(rows, row_ids, context):  # blocks (then is killed) after 2 chunks of 4 rows
    if len(operator.batches_seen) == 4:
        pathlib.Path(marker).write_text("blocked")
        time.sleep(600)
    return process(rows, row_ids, context)

operator.process_batch = blocking
operator.run(FileStorage(entry, cache_path=cache, work_dir=work).step())
"""


def test_sigkilled_run_resumes_from_the_store_after_its_lock_expires(bucket, tmp_path, monkeypatch):
    """kill -9 mid-step: the chunk objects on S3 survive it; another machine is refused while the
    dead run's lock lives, then resumes after its expiry with the uninterrupted result."""
    import signal
    import subprocess

    fs, name = bucket
    monkeypatch.setenv("DATAFLOWMM_STORE_LOCK_TTL", "3")
    entry = make_entry(tmp_path, n=12, empty_at=(5,))
    reference = NoiseImageOperator().run(FileStorage(entry, cache_path=tmp_path / "plain").step())
    cache, marker = f"s3://{name}/run1", tmp_path / "blocked"
    child = subprocess.Popen([sys.executable, "-c", SIGKILLED_CHILD, str(Path(__file__).parent), str(entry), cache,
                              str(tmp_path / "machine-a"), str(marker)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the chunk where it is killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    fs.invalidate_cache()
    chunks = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{name}/run1/dataflow_cache_step_step1.partial"))
    assert chunks == ["chunk-000000.jsonl", "chunk-000001.jsonl", "meta.json"]
    assert not fs.exists(f"{name}/run1/dataflow_cache_step_step1.jsonl")  # nothing published half-written
    with pytest.raises(CacheInUse):  # the dead run's lock has not expired yet
        NoiseImageOperator().run(FileStorage(entry, cache_path=cache, work_dir=tmp_path / "machine-b").step())
    time.sleep(3.5)
    resumed = NoiseImageOperator()
    summary = resumed.run(FileStorage(entry, cache_path=cache, work_dir=tmp_path / "machine-b").step())
    assert summary.chunks_resumed == 2 and len(resumed.batches_seen) == 2  # rows 8-11 only
    assert (summary.rows_out, summary.errors, summary.images_written) == (reference.rows_out, 1, 11)
    plain = (tmp_path / "plain" / "dataflow_cache_step_step1.jsonl").read_bytes()
    same_rows = [{k: v for k, v in json.loads(line).items() if k != "source"} for line in plain.splitlines()]
    assert [{k: v for k, v in json.loads(line).items() if k != "source"}
            for line in fs.cat_file(f"{name}/run1/dataflow_cache_step_step1.jsonl").splitlines()] == same_rows


def test_second_run_is_refused_while_the_lock_lives_and_allowed_after_it_expires(bucket, tmp_path):
    fs, name = bucket
    entry = make_entry(tmp_path, n=3)
    lock = f"{name}/run1/dataflow_cache_step.lock/000000000000"
    fs.pipe_file(lock, json.dumps({"owner": "crashed-driver", "expires": time.time() + 1.5}).encode())
    storage = FileStorage(entry, cache_path=f"s3://{name}/run1")
    with pytest.raises(CacheInUse, match="in use by another run \\(crashed-driver"):
        NoiseImageOperator().run(storage.step())
    time.sleep(1.6)
    summary = NoiseImageOperator().run(FileStorage(entry, cache_path=f"s3://{name}/run1").step())
    assert summary.rows_out == 3
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.find(f"{name}/run1/dataflow_cache_step.lock")] == ["000000000000"]


def test_lock_take_over_is_exclusive(bucket):
    from dataflowmm.execution.store_lock import StoreLease
    from dataflowmm.store import StoreMirror

    fs, name = bucket
    store = StoreMirror(f"s3://{name}/run1", None, Path("/nonexistent"))
    fs.pipe_file(f"{name}/run1/p.lock/000000000004", json.dumps({"owner": "old", "expires": 0}).encode())
    first, second = StoreLease(store, "p", 30), StoreLease(store, "p", 30)
    first.acquire()
    try:
        assert first.generation == 5
        second.generation = -1
        with pytest.raises(CacheInUse, match="in use by another run"):
            second.acquire()
        with pytest.raises(FileExistsError):  # the conditional create itself, as moto answers it
            fs.pipe_file(f"{name}/run1/p.lock/000000000005", b"{}", mode="create")
    finally:
        first.release()


def test_store_mistakes_end_as_one_line_or_a_row_error(project, bucket, tmp_path, capsys):
    fs, name = bucket
    entry = make_entry(tmp_path, n=2)
    with pytest.raises(RemoteStorageError, match=r"bucket no-such-bucket-29 does not exist") as missing:
        FileStorage(entry, cache_path="s3://no-such-bucket-29/run1",
                    storage_options={"key": "testing", "secret": FAKE_SECRET})
    assert FAKE_SECRET not in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(FileNotFoundError, match=rf"not found: s3://{name}/nope.jsonl"):
        FileStorage(f"s3://{name}/nope.jsonl", cache_path=tmp_path / "c")
    from moto import settings

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # the server now checks credentials: ours are unknown
    try:
        with pytest.raises(RemoteStorageError) as denied:
            FileStorage(entry, cache_path=f"s3://{name}/run1", storage_options={"key": "wrong", "secret": FAKE_SECRET})
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    assert str(denied.value).startswith(f"cache_path s3://{name}/run1: ") and FAKE_SECRET not in str(denied.value)
    # a missing image and an object that is not an image: row errors, the step published
    fs.pipe_file(f"{name}/data/notes.png", b"just some text, not an image")
    fs.put_file(str(project / "example_data" / "images" / "red_circle.png"), f"{name}/data/ok.png")
    rows = [{"id": i, "image": image} for i, image in enumerate(["ok.png", "gone.png", "notes.png"])]
    fs.pipe_file(f"{name}/data/rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())
    from dataflowmm.operators import ImageSizeFilter

    storage = FileStorage(f"s3://{name}/data/rows.jsonl", cache_path=f"s3://{name}/run2",
                          storage_options={"key": "testing", "secret": FAKE_SECRET})
    ImageSizeFilter().run(storage.step(), input_image_key="image")
    out = [json.loads(line) for line in fs.cat_file(f"{name}/run2/dataflow_cache_step_step1.jsonl").splitlines()]
    errors = {row["id"]: row["error"] for row in out}
    assert errors[0] is None
    assert f"image not found: s3://{name}/data/gone.png" in errors[1]
    assert f"image s3://{name}/data/notes.png: not an image (text)" in errors[2]
    manifest = fs.cat_file(f"{name}/run2/dataflow_cache_step_step1.manifest.json").decode()
    assert FAKE_SECRET not in manifest and FAKE_SECRET not in capsys.readouterr().err


def test_storage_options_reach_the_images_rows_name(bucket, tmp_path, monkeypatch, s3_endpoint):
    """With the endpoint and keys given only as `storage_options` (none in the environment),
    the images a remote entry's rows name are read with them too; the key is written nowhere."""
    import io

    from PIL import Image

    from dataflowmm.operators import ImageShapeFilter

    fs, name = bucket
    for index in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (20 + index, 10)).save(buffer, "PNG")
        fs.pipe_file(f"{name}/in/img/{index}.png", buffer.getvalue())
    fs.pipe_file(f"{name}/in/rows.jsonl", b"".join(json.dumps({"image": f"img/{i}.png"}).encode() + b"\n"
                                                   for i in range(3)))
    for variable in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    type(fs).clear_instance_cache()  # no file system made from the environment above is reused
    options = {"key": "testing", "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    storage = FileStorage(f"s3://{name}/in/rows.jsonl", cache_path=f"s3://{name}/run", storage_options=options)
    summary = ImageShapeFilter(min_width=21).run(storage.step(), input_image_key="image",
                                                 output_stats_key="shape")
    assert (summary.rows_out, summary.rows_dropped, summary.errors) == (2, 1, 0)
    fs.invalidate_cache()
    rows = [json.loads(line) for line in fs.cat_file(f"{name}/run/dataflow_cache_step_step1.jsonl").splitlines()]
    assert [row["shape"] for row in rows] == [[[21, 10]], [[22, 10]]]
    written = b"".join(fs.cat_file(path) for path in fs.find(f"{name}/run"))
    assert FAKE_SECRET.encode() not in written


def test_http_entry_goes_through_the_download_guards(tmp_path):
    """An http(s) entry file is read through the same guards as an images API's answer: an
    internal address is refused in one line, before anything is written."""
    from dataflowmm.io.remote import RemoteStorageError

    with pytest.raises(RemoteStorageError, match=r"^first_entry_file_name http://127\.0\.0\.1:9/rows\.jsonl: host 127\.0\.0\.1 is an internal address"):
        FileStorage("http://127.0.0.1:9/rows.jsonl", cache_path=tmp_path / "cache")


def test_missing_backend_names_the_extra():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(RemoteStorageError, match=r"pip install 'dataflowmm\[gcs\]'"):
            filesystem("gs://bucket/run1")
    else:
        pytest.skip("gcsfs is installed here")


def test_memory_store_and_the_ray_runner_refusing_it(tmp_path):
    """`memory://` is a second fsspec backend (no server); it lives in one process, so the
    Ray runner, whose actors write images straight to the store, refuses it in one line."""
    import fsspec

    pytest.importorskip("ray")
    from dataflowmm.execution.ray_runner import RayRunner

    fs = fsspec.filesystem("memory")
    fs.mkdir("/membucket")
    entry = make_entry(tmp_path, n=5)
    summary = NoiseImageOperator().run(FileStorage(entry, cache_path="memory://membucket/run1",
                                                   work_dir=tmp_path / "w").step())
    assert summary.output_path == "memory://membucket/run1/dataflow_cache_step_step1.jsonl"
    assert len(fs.find("/membucket/run1/dataflow_cache_step_step1_images")) == 5
    storage = FileStorage(entry, cache_path="memory://membucket/run2", runner=RayRunner(), work_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"cache_path memory://membucket/run2 lives in this process's memory: "
                                         r"Ray actors on other processes cannot write to it"):
        NoiseImageOperator().run(storage.step())
