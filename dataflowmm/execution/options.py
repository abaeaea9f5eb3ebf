"""The runner options every pipeline script takes: --runner, --ray-address, --replicas."""

from __future__ import annotations

import argparse
from typing import Any


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--runner local|ray`, `--ray-address` and `--replicas` to a pipeline script's parser."""
    group = parser.add_argument_group("where batches run")
    group.add_argument("--runner", choices=["local", "ray"], default="local",
                       help="local: this process (default); ray: a Ray cluster (pip install 'dataflowmm[ray]')")
    group.add_argument("--ray-address", default=None,
                       help="unset: start a local Ray cluster; 'auto': join the one `ray start --head` "
                            "started on this machine; or ray://HOST:10001")
    group.add_argument("--replicas", type=int, default=None,
                       help="Ray actors, each with its own model copy (default: one per GPU, else per CPU)")
    parser.add_argument("--debug", action="store_true",
                        help="on failure show the traceback (default: one line); also DATAFLOWMM_DEBUG=1")


def runner_from_args(args: argparse.Namespace) -> Any:
    """The runner the parsed options ask for (`None` is the local runner)."""
    if args.runner == "local":
        if args.ray_address or args.replicas:
            raise SystemExit("--ray-address and --replicas need --runner ray")
        return None
    from dataflowmm.execution.ray_runner import RayRunner

    return RayRunner(address=args.ray_address, replicas=args.replicas)
