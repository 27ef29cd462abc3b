"""The environment skd gives its Ray workers: glibc malloc settings (`ray.hold_freed_memory`) and Ray Train's
health-check interval, set for every worker of the job and leaving a user's or a submitted job's own
settings alone; and a local cluster's servers, every one on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestrator.driver import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_worker_env_holds_freed_memory_unless_the_user_set_it(monkeypatch):
    for key in runtime.HOLD_FREED_MEMORY:
        monkeypatch.delenv(key, raising=False)
    assert runtime.worker_env(False) == {}
    assert runtime.worker_env(True) == runtime.HOLD_FREED_MEMORY
    assert runtime.HOLD_FREED_MEMORY["MALLOC_ARENA_MAX"] == "1"  # Ray Train's training thread uses the main heap
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert runtime.worker_env(True)["MALLOC_ARENA_MAX"] == "4"  # the user's own value stands


def test_job_env_leaves_what_a_submitted_job_sets(monkeypatch):
    env = {"RAY_ADDRESS": "127.0.0.1:6379", "MALLOC_ARENA_MAX": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert runtime._job_env(env) == {"env_vars": env}
    job = {"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2", "RAY_ADDRESS": "10.0.0.1:6379"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert runtime._job_env(env) is None  # Ray refuses to merge a variable the job already sets
    assert runtime._job_env({**env, "X": "1"}) == {"env_vars": {"X": "1"}}
    assert runtime._address_for_workers("auto") == {} and runtime._address_for_workers("ray://h:10001") == {}


PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from orchestrator.driver import runtime
from orchestrator.config import RayConfig
import ray

def env():
    return {{k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_ADDRESS")}}

def listening():  # (process name, address) of each listening TCP socket of this driver and what it started
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    pids = {{p.pid: p.name() for p in procs}}
    return sorted({{(pids[c.pid], c.laddr.ip) for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.pid in pids}})

seen, sockets = {{}}, []
for hold in (True, False):
    with runtime.ray_session(RayConfig(num_cpus=1, hold_freed_memory=hold)):
        seen[str(hold)] = ray.get(ray.remote(num_cpus=0)(env).remote())
        actor = ray.remote(num_cpus=0)(type("Probe", (), {{"ping": lambda self: 1}})).remote()
        ray.get(actor.ping.remote())  # a core worker of an actor listens too
        sockets = sockets or listening()
print("ENV", json.dumps(seen))
print("SOCKETS", json.dumps(sockets))
"""


def test_workers_of_a_local_cluster_get_the_settings():
    """A local cluster started by `ray_session` (in a fresh process: the test session's own Ray would be
    reused): its workers see the malloc settings only with hold_freed_memory, always the cluster address."""
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("MALLOC_") and k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ENV "))[4:])
    held, plain = seen["True"], seen["False"]
    assert {k: held[k] for k in runtime.HOLD_FREED_MEMORY} == runtime.HOLD_FREED_MEMORY
    assert all(plain[k] is None for k in runtime.HOLD_FREED_MEMORY)
    assert held["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # inherited from the driver's defaults
    assert held["RAY_ADDRESS"] and held["RAY_ADDRESS"].startswith("127.0.0.1:")
    # every server of the local cluster (GCS, raylet, agents, dashboard, workers) on the loopback interface
    sockets = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SOCKETS "))[8:])
    names = {name for name, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("Probe" in n or "ray::" in n for n in names), sockets
    assert [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")] == []
