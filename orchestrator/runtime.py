"""Connecting to Ray: a local cluster started (and stopped) by the program, or an existing one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from orchestrator.config import RayConfig

# Quiet, offline-friendly defaults; users can still override them in their environment.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # print each worker line once, as it happens
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every worker print is echoed twice
# Ray Train gives a worker group 60 s to start; on a busy 2-core machine worker processes (torch and
# transformers imports, rate-limited process starts) can take longer, and a timed-out start leaks its
# placement group, so later trials wait forever. Give starts 10 minutes.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the Ray already initialised in this process, else connect to `ray.address`, else start a
    local cluster (token auth off, dashboard off, bound to 127.0.0.1) and shut it down on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        start_local_ray(cfg.num_cpus or os.cpu_count())
    try:
        yield
    finally:
        ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_local_ray(num_cpus: int | None, *, dashboard: bool = True, log_to_driver: bool = True) -> str:
    """Start a new local Ray cluster on 127.0.0.1 (token auth off) whose workers know its address, even
    when another Ray runs on this machine (`address="local"`: never attach to a cluster found by chance).

    Ray Train V2 removes the placement group of a controller that died (a Tune trial stopped by ASHA or
    PBT) from a detached cleaner actor that finds the cluster through Ray's state API. Without an address
    that lookup auto-detects clusters and fails with "Found multiple active Ray instances" as soon as a
    second Ray runs on the machine; the cleaner thread dies, the stopped trial's placement group leaks and
    the next trial waits for it forever. So the GCS port is chosen up front (`RAY_GCS_SERVER_PORT`) and
    every worker of this job gets `RAY_ADDRESS` through the job's runtime environment.

    Args:
        num_cpus: logical CPUs of the cluster (None: all cores).
        dashboard: start the dashboard (it serves the state API; bound to 127.0.0.1).
        log_to_driver: forward worker output to this process.

    Returns:
        The GCS address, host:port.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = f"127.0.0.1:{free_port()}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = address.split(":")[1]
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    finally:  # the next cluster this process starts picks its own port
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return address


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU machine)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
