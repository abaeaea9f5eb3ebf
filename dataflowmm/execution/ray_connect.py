"""Joining (or starting) a Ray cluster: the code and the environment the workers get.

Nodes of a cluster share nothing with the driver but what Ray ships: the `runtime_env`.
The driver's own pipeline code (the folder of the module that defines the operator, or of
the script being run) travels as its `working_dir`, unless the user gives a `runtime_env`
of their own. Credentials travel as environment variables of the workers, never in a
manifest, a log line or an error message. Variables that hold a local path (`HF_HOME`,
the models folder) travel only to a cluster this process starts, whose workers share its
disk: on a joined cluster such a path need not exist on any other node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Settings every worker needs to load the same models as the driver.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")
# Prefixes of cloud credentials and settings (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS...).
FORWARDED_PREFIXES = ("AWS_", "GOOGLE_")
# Paths on this machine: forwarded only to a cluster started here (every node is this machine).
LOCAL_PATH_ENV = ("HF_HOME", "HF_HUB_CACHE", "DATAFLOWMM_MODELS_DIR", "DATAFLOWMM_PRODUCED_DATA_DIR",
                  "DJ_PRODUCED_DATA_DIR")
# Never uploaded with the pipeline's folder: environments, caches, step outputs.
WORKING_DIR_EXCLUDES = [".venv/", "venv/", ".git/", "__pycache__/", "*.partial/", "*_images/", "cache_local/"]


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray runner needs Ray: pip install 'dataflowmm[ray]'") from None
    return ray


def joins_existing_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` joins a running cluster rather than starting one: an address
    given, `RAY_ADDRESS` set, or a `ray start` on this machine (Ray then refuses `num_cpus`)."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(None, None) is not None
    except Exception:  # noqa: BLE001 - Ray's private lookup changed: assume a cluster of our own
        return False


def forwarded_env(starts_cluster: bool) -> dict[str, str]:
    """The driver's variables the workers get (see the module's docstring)."""
    names = list(FORWARDED_ENV) + (list(LOCAL_PATH_ENV) if starts_cluster else [])
    env = {name: os.environ[name] for name in names if name in os.environ}
    env.update({name: value for name, value in os.environ.items() if name.startswith(FORWARDED_PREFIXES)})
    return env


def secret_values() -> list[str]:
    """Values of the forwarded credentials, to blank out of any text shown to the user."""
    names = ["HF_TOKEN"] + [name for name in os.environ if name.startswith(FORWARDED_PREFIXES)]
    return [os.environ[name] for name in names if len(os.environ.get(name, "")) >= 4]


def pipeline_folder(module_name: str | None = None) -> Path | None:
    """The folder to ship as `working_dir`: the import root of `module_name` (the operator's
    module), else the folder of the script being run; None when that is installed code
    (site-packages, dataflowmm itself), which every node has already."""
    installed = {Path(path).resolve() for path in (sys.prefix, sys.base_prefix)}
    installed.add(Path(__file__).resolve().parents[1])  # the dataflowmm package

    def own(file: str | None, depth: int) -> Path | None:
        if not file or not os.path.isfile(file):
            return None
        folder = Path(file).resolve().parents[depth]
        return None if any(folder == root or root in folder.parents for root in installed) else folder

    module = sys.modules.get(module_name or "")
    if module is not None and module_name != "__main__":
        found = own(getattr(module, "__file__", None), module_name.count("."))
        if found is not None:
            return found
    return own(getattr(sys.modules.get("__main__"), "__file__", None), 0)


def runtime_env_for(starts_cluster: bool, user_env: dict | None, module_name: str | None) -> dict[str, Any]:
    """The `runtime_env` of the job: the user's own (forwarded variables added to its
    `env_vars` where it sets none of that name), else the pipeline's folder as `working_dir`."""
    env_vars = forwarded_env(starts_cluster)
    # A node that shares this machine's paths (a cluster started here, or NFS) also finds
    # modules next to the driver's script this way; elsewhere the entries do not exist.
    env_vars["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path and os.path.isdir(path))
    if user_env is not None:
        return {**user_env, "env_vars": {**env_vars, **(user_env.get("env_vars") or {})}}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    folder = pipeline_folder(module_name)
    if folder is not None:
        runtime_env.update(working_dir=str(folder), excludes=WORKING_DIR_EXCLUDES)
    return runtime_env


def connect(address: str | None = None, num_cpus: int | None = None, *, runtime_env: dict | None = None,
            module_name: str | None = None) -> None:
    """Join the Ray cluster at `address` (`"auto"`: the one `ray start --head` started here, or
    `ray://host:10001`), or start a local one when `address` is None and none runs here.
    Does nothing when Ray is already initialised in this process.

    `num_cpus` sizes a cluster started here; a joined cluster keeps its own. `runtime_env`
    replaces the pipeline folder this function would ship (`module_name`'s, see
    `pipeline_folder`); the forwarded variables are added to it either way.
    """
    ray = import_ray()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    starts = not joins_existing_cluster(address)
    options: dict[str, Any] = {"runtime_env": runtime_env_for(starts, runtime_env, module_name),
                               "logging_level": "WARNING", "log_to_driver": False}
    if starts:
        options.update(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(address=address, **options)
    except Exception as error:  # noqa: BLE001 - Ray raises many kinds here: each becomes one line
        raise _connection_error(ray, address, error) from None


def _connection_error(ray: Any, address: str | None, error: Exception) -> Exception:
    text = " ".join(str(error).split())
    for secret in secret_values():
        text = text.replace(secret, "***")
    where = f"the Ray cluster at {address!r}" if address else "the Ray cluster on this machine"
    if isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in text \
            or "uthentication" in text:
        if not isinstance(error, ray.exceptions.AuthenticationError):
            text = " ".join(str(ray.exceptions.AuthenticationError(text[:300])).split())
        return ConnectionError(f"{where} refused this driver's authentication token: {text}")
    if not isinstance(error, (ConnectionError, TimeoutError, RuntimeError, ValueError)):
        return error
    return ConnectionError(
        f"cannot reach {where} ({text[:300]}); start one with `ray start --head` on this machine, or run "
        "without --ray-address to start a local cluster")
