import os
import socket
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: with no network here, a hub lookup must fail
# at once instead of waiting on connection timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Test clusters live on loopback: Ray 2.60 turns token authentication on for every process
# once ~/.ray/auth_token exists, and a process without the token is refused.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session", autouse=True)
def tiny_models_dir(tmp_path_factory) -> Path:
    """Tiny models are built once per test session into a private folder.

    Subprocesses started by tests inherit the variable and reuse the same builds.
    """
    folder = Path(os.environ.get("DATAFLOWMM_TEST_MODELS_DIR") or tmp_path_factory.mktemp("models"))
    previous = os.environ.get("DATAFLOWMM_MODELS_DIR")
    os.environ["DATAFLOWMM_MODELS_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DATAFLOWMM_MODELS_DIR", None)
    else:
        os.environ["DATAFLOWMM_MODELS_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model(tiny_models_dir):
    """tiny_model("tiny-sd") -> folder of that random-weight model (`tiny:tiny-sd`)."""
    from dataflowmm.models.tiny import tiny_model_path

    return lambda name: tiny_model_path(name, tiny_models_dir)


@pytest.fixture(scope="session")
def trained_model(tiny_models_dir):
    """trained_model("shapes-clip") -> folder of that trained model (`trained:shapes-clip`),
    copied from the shipped weights on first use and cached in the session's models folder."""
    from dataflowmm.models.tiny import trained_model_path

    return lambda name: trained_model_path(name, tiny_models_dir)


@pytest.fixture
def one_torch_thread():
    """Tiny models are latency-bound: on a busy 2-core machine, threads only fight each other.
    A module takes it for every test with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _ray_session():
    """Ray is shut down at the end of the session, whichever cluster it was connected to."""
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """A local Ray cluster (2 CPUs, no dashboard), started once and kept for the session; started
    again after a test that connected elsewhere (`two_node_cluster`)."""
    from dataflowmm.execution.ray_runner import connect

    connect(num_cpus=2)
    return _ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def two_node_cluster(_ray_session, tmp_path_factory):
    """(address, private folder): this process connected to two real Ray nodes on this machine
    (tests/two_nodes.py); the worker node, where every actor runs, has its own empty tmpfs at
    `private` (and an empty folder `same_path/cache` there, at the same path as the driver's). Skipped,
    with the reason, where a mount namespace is not permitted."""
    from two_nodes import TwoNodes, unshare_refusal

    from dataflowmm.execution.ray_actors import close_actor_pool

    refusal = unshare_refusal()
    if refusal:
        pytest.skip(refusal)
    private = tmp_path_factory.mktemp("private")
    nodes = TwoNodes(private, [private / "same_path" / "cache"])
    close_actor_pool()
    _ray_session.shutdown()
    try:
        nodes.start()
        yield nodes.address, private
    finally:
        close_actor_pool()
        _ray_session.shutdown()
        nodes.stop()


FAKE_SECRET = "dataflowmmFAKEsecretKEY0123456789"  # a recognisable fake key: found nowhere it should not be


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback (a free port) for the session, with fake `AWS_*`
    credentials and `AWS_ENDPOINT_URL` in the environment (as a user's s3fs and Ray workers,
    which get `AWS_*` forwarded, find them)."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in (*fake, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.update(fake)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    yield endpoint
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    server.stop()
