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
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # the dashboard serves Ray's state API, which Ray Train's controller polls; keep it on loopback
        ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU machine)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
