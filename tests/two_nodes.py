"""Two real Ray nodes on one machine: a head with no CPUs for actors, and a worker node in a
private mount namespace whose `private` folder is its own tmpfs (a second machine's disk).

Every actor runs on the worker. The rest of the file system (the project, the venv, the
models) is shared, as a cluster image would ship them; the driver's files under `private`
are not. `same_path` names folders created on the worker's tmpfs at the same paths as the
driver's (a node with a local /data). Loopback only, every port chosen free, token
authentication off in every process (RAY_AUTH_MODE=disabled), Ray's temp folder private to
the cluster (so no other `ray.init()` on the machine joins it); `stop()` ends every process
it started, by process group.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def unshare_refusal() -> str | None:
    """Why a worker node cannot get its own mount namespace here, else None."""
    if not sys.platform.startswith("linux"):
        return "a private mount namespace needs Linux"
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare is not available: {error}"
    if probe.returncode:
        return f"unshare --mount is not permitted here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class TwoNodes:
    """`start()` the cluster, `address` to join it, `stop()` everything."""

    def __init__(self, private: Path, same_path: list[Path]):
        self.private, self.same_path = private, same_path
        self.temp = Path(tempfile.mkdtemp(prefix="dfr", dir="/tmp"))  # short: Ray's socket paths
        self.ray = str(Path(sys.executable).parent / "ray")
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.processes: list[subprocess.Popen] = []
        self.address = ""

    def _node_arguments(self) -> list[str]:
        agent, grpc, metrics, runtime_env, node_manager, object_manager = free_ports(6)
        return ["--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
                f"--object-manager-port={object_manager}", "--disable-usage-stats", "--block"]

    def _spawn(self, command: list[str]) -> None:
        log = open(self.temp / f"node{len(self.processes)}.log", "wb")  # noqa: SIM115 (the node's lifetime)
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self, timeout: float = 60) -> str:
        port, = free_ports(1)
        self.address = f"127.0.0.1:{port}"
        self._spawn([self.ray, "start", "--head", "--num-cpus=0", f"--port={port}", "--include-dashboard=false",
                     f"--temp-dir={self.temp}", *self._node_arguments()])
        folders = " ".join(shlex.quote(str(path)) for path in self.same_path)
        worker = " ".join(shlex.quote(part) for part in [
            self.ray, "start", f"--address={self.address}", "--num-cpus=2", *self._node_arguments()])
        script = f"mount -t tmpfs tmpfs {shlex.quote(str(self.private))} && " + \
            (f"mkdir -p {folders} && " if folders else "") + f"exec {worker}"
        self._spawn(["unshare", "--mount", "--propagation", "private", "bash", "-c", script])
        try:
            self._wait_for_two_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self.address

    def _wait_for_two_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                break
            try:
                status = subprocess.run([self.ray, "status", f"--address={self.address}"], env=self.env,
                                        capture_output=True, text=True, timeout=10)
            except subprocess.TimeoutExpired:
                continue
            if status.returncode == 0 and "/2.0 CPU" in status.stdout:
                return
            time.sleep(0.5)
        logs = "\n".join(path.read_text(errors="replace")[-1500:] for path in sorted(self.temp.glob("node*.log")))
        raise RuntimeError(f"the two-node cluster did not come up in {timeout:.0f} s:\n{logs}")

    def stop(self) -> None:
        """End both nodes (each `ray start --block` ends its node's processes on SIGTERM), then
        anything left in their process groups."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes = []
