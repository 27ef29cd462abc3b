"""Connecting to Ray: a local cluster started (and stopped) by the program, or an existing one (`ray.address`,
or `$RAY_ADDRESS` as Ray sets it for the driver of a `ray job submit` job)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from actors.errors import ConfigError
from orchestrator.config import RayConfig
from orchestrator.common.console import filter_worker_output

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
# Ray Train's controller polls its workers every 2 s by default, so a finished (or failed) worker group is
# noticed up to 2 s late; 0.5 s cut an empty fit() from 6.6 to 5.5 s (mean of 3, docs/results.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the Ray already initialised in this process, else attach to the cluster `attach_address` names
    (`ray.address`, else a non-empty `$RAY_ADDRESS`, which Ray sets for the driver of a `ray job submit`
    job) and print one line naming it, else start a local cluster (token auth off, dashboard bound to
    127.0.0.1; never one found by chance) and shut it down on exit.

    Raises:
        ConfigError: `$RAY_ADDRESS` is an http(s) URL (a dashboard / job API address, not a cluster).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address, origin = attach_address(cfg)
    env = worker_env(cfg.hold_freed_memory)
    if address:
        env.update(_address_for_workers(address))
        with _joined_as_loopback(address):
            ray.init(address=address, log_to_driver=True, runtime_env=_job_env(env))
        print(f"[skd] attached to the Ray cluster at {_gcs_address(address)} ({origin})", flush=True)
    else:
        start_local_ray(cfg.num_cpus or os.cpu_count(), env=env)
    filter_worker_output()
    try:
        yield
    finally:
        ray.shutdown()


def attach_address(cfg: RayConfig) -> tuple[str | None, str]:
    """The existing cluster to attach to and where that came from: (`ray.address`, "ray.address") for an
    address other than `auto`; else ($RAY_ADDRESS, "RAY_ADDRESS=...") when that variable is set and non-empty
    (a Ray job's driver, or a user who exported it; `ray.init` lets it stand for `auto` too); else
    ("auto", "ray.address") for `ray.address: auto`; else (None, "") for a new local cluster.

    Raises:
        ConfigError: $RAY_ADDRESS is an http(s) URL: that is the dashboard's job API (what `ray job submit`
            reads), not a cluster address a driver can attach to.
    """
    if cfg.address and cfg.address != "auto":
        return cfg.address, "ray.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not env:
        return (cfg.address, "ray.address") if cfg.address else (None, "")
    if env.startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS={env} is a dashboard (job submission) address, not a Ray cluster to "
                          f"attach to: set RAY_API_SERVER_ADDRESS for `ray job submit` instead, set ray.address "
                          f"(auto, or the cluster's host:port), or unset RAY_ADDRESS to start a local cluster")
    return env, f"RAY_ADDRESS={env}"


# glibc malloc: keep freed blocks up to 256 MiB in the heap (not mmap'd, so not unmapped on free), do not
# trim the heap below 1 GiB, and use the main heap from every thread (Ray Train runs the training function
# in a thread; a thread's own arena gives memory back regardless). PyTorch's CPU training step frees and
# re-allocates its large tensors (gradients, activations; the MiniLM embedding gradient alone is 47 MB) every
# step; with glibc's defaults each is mmap'd and unmapped again, and the next step page-faults it back in
# (measured: 37,000 minor faults per student step in-process, 3 s of 20 s in the kernel; in a Ray Train
# worker 12,000 per step before, 1,000 after, 7% less training time; docs/results.md). The MALLOC_*_ variables,
# not GLIBC_TUNABLES (Ray 2.60 handed the worker a GLIBC_TUNABLES value cut at its first ':').
HOLD_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824", "MALLOC_ARENA_MAX": "1"}


def worker_env(hold_freed_memory: bool) -> dict[str, str]:
    """Environment variables every worker process of this job gets (student workers, teacher actors): the
    malloc settings `HOLD_FREED_MEMORY` when `hold_freed_memory`, each unless the driver's environment sets
    it already (a user's own setting stands). Ignored off glibc."""
    if not hold_freed_memory:
        return {}
    return {k: os.environ.get(k, v) for k, v in HOLD_FREED_MEMORY.items()}


def _job_env(env: dict[str, str]) -> dict | None:
    """The runtime_env for `ray.init` with `env`'s variables, less those the submitted job already sets for
    its workers (Ray refuses to merge the same variable twice; a `ray job submit` job's own setting stands)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray in a job's driver
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: v for k, v in env.items() if k not in taken}
    return {"env_vars": env} if env else None


def _address_for_workers(address: str) -> dict[str, str]:
    """The variable that gives this job's workers the cluster's address (as `start_local_ray` does), so that
    Ray Train's placement-group cleaner finds this cluster even when another Ray runs on the same machine;
    none where `address` is not host:port (auto, ray://...)."""
    if "://" in address or ":" not in address:
        return {}
    return {"RAY_ADDRESS": address}


@contextlib.contextmanager
def _joined_as_loopback(address: str) -> Iterator[None]:
    """Join the cluster at `address` as one of its own 127.0.0.1 nodes where it is a loopback cluster (one
    `start_local_ray` started, every server on 127.0.0.1 only): Ray rewrites a given 127.0.0.1/localhost
    address to the machine's routable address (`resolve_ip_for_localhost`), where such a GCS does not listen,
    and the driver then hangs on "Failed to connect to the observability pubsub". With the single-node switch
    off in this process for the `ray.init` call Ray keeps 127.0.0.1. Any other cluster (one that also answers
    on the routable address, or any host that is not loopback) is joined as Ray joins it."""
    from ray._private import ray_constants

    if not _loopback_only(address):
        yield
        return
    cluster_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag


def _loopback_only(address: str) -> bool:
    """Whether `address` (host:port) is a loopback host whose port answers on 127.0.0.1 but not on this
    machine's routable address (a cluster `start_local_ray` started). False for auto, ray://... and other
    hosts. One TCP connect each, 2 s at most."""
    import socket

    from ray._private.services import node_ip_address_from_perspective, parse_address

    parsed = parse_address(address) if "://" not in address and ":" in address else None
    if parsed is None or parsed[0] not in ("127.0.0.1", "localhost", "::1"):
        return False

    def answers(host: str) -> bool:
        try:
            with socket.create_connection((host, int(parsed[1])), timeout=1.0):
                return True
        except OSError:
            return False

    routable = node_ip_address_from_perspective()
    return answers("127.0.0.1") and (routable.startswith("127.") or not answers(routable))


def _gcs_address(fallback: str) -> str:
    """The connected cluster's GCS address (host:port), or `fallback` where Ray does not say (Ray Client)."""
    import ray

    try:
        return str(ray.get_runtime_context().gcs_address or fallback)
    except Exception:  # noqa: BLE001  (a Ray Client connection has no GCS address to show)
        return fallback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_local_ray(num_cpus: int | None, *, dashboard: bool = True, log_to_driver: bool = True,
                    env: dict[str, str] | None = None) -> str:
    """Start a new local Ray cluster on 127.0.0.1 (every server bound to the loopback interface, `LOOPBACK`;
    token auth off) whose workers know its address, even when another Ray runs on this machine
    (`address="local"`: never attach to a cluster found by chance).

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
        env: more environment variables for every worker of this job (e.g. `worker_env`).

    Returns:
        The GCS address, host:port.
    """
    import ray
    from ray._private import ray_constants

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = f"127.0.0.1:{free_port()}"
    # RAY_GCS_SERVER_PORT: this cluster's port; LOOPBACK: every server on 127.0.0.1 (read by each Ray process
    # at import: the GCS, raylet, agents and workers this start spawns inherit it)
    previous = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", *LOOPBACK)}
    os.environ.update({"RAY_GCS_SERVER_PORT": address.split(":")[1], **LOOPBACK})
    cluster_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False  # this process
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {**(env or {}), **LOOPBACK, "RAY_ADDRESS": address}})
    finally:  # the next cluster this process starts (or joins: cluster_utils, ray.address) decides its own
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return address


LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray 2.60 binds its gRPC and HTTP servers (GCS, raylet, core workers, dashboard agent, metrics export,
runtime-env agent) to 127.0.0.1 only when the node's address is exactly 127.0.0.1, and replaces a given
`_node_ip_address="127.0.0.1"` with the machine's routable address unless its single-node switch (this
variable, `ray_constants.ENABLE_RAY_CLUSTER`) is off: the one setting that keeps a local cluster on the
loopback interface (ray/_private/services.py `get_node_ip_address`, `resolve_ip_for_localhost`). Such a
cluster takes no other nodes, which a local cluster never has."""


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU machine)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
