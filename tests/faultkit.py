"""Fault injection on this machine, shared by the fault tests and `bench/faults.py`: a real `mlflow server`
to stop and restart, Ray Train worker processes to kill, teachers to kill once they have served enough."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable


def start_mlflow_server(port: int, root: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend and proxied artifacts under `root`), answering
    its /health endpoint when this returns.

    Raises:
        RuntimeError: it did not come up within 120 s (the end of its log is in the message).
    """
    log = open(root / "server.log", "a")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return wait_until_healthy(proc, port, root / "server.log", 120)


def wait_until_healthy(proc: subprocess.Popen, port: int, log: Path, timeout_s: float) -> subprocess.Popen:
    """`proc` once an MLflow server it runs answers /health on 127.0.0.1:`port`.

    Raises:
        RuntimeError: no answer within `timeout_s` seconds, or the process ended (the server is stopped
            and the end of its `log` is in the message).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"the MLflow server did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a server started here and its process group (uvicorn workers, job runners), and wait."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def train_workers() -> list:
    """Ray Train worker processes of a cluster this process started (its descendants), as psutil processes."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def when(condition: Callable[[], bool], running: Callable[[], bool], timeout_s: float = 600,
         every_s: float = 0.02) -> bool:
    """Poll until `condition()` holds (True) or `running()` stops or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while running() and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False


def checkpoint_written(storage: Path, run_name: str) -> Callable[[], bool]:
    """Whether the Ray Train run of MLflow run `run_name` has written a checkpoint under `storage`."""
    return lambda: bool(list(Path(storage).glob(f"{run_name}-*/checkpoint_*")))


def checkpoint_registered(storage: Path, run_name: str) -> Callable[[], bool]:
    """Whether Ray Train's controller has registered a checkpoint of that run (its checkpoint manager
    snapshot lists one). A checkpoint folder exists a moment earlier; a worker killed in between (up to one
    controller poll, ~2 s) restarts from the checkpoint before it."""
    import json

    def registered() -> bool:
        for snapshot in Path(storage).glob(f"{run_name}-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return True
            except (OSError, ValueError):
                continue
        return False
    return registered


def kill_workers() -> list[int]:
    """SIGKILL every Ray Train worker process of this process's cluster; their pids."""
    import signal

    killed = []
    for proc in train_workers():
        proc.send_signal(signal.SIGKILL)
        killed.append(proc.pid)
    return killed


def teacher_requests(pool) -> int:
    """Knowledge requests the pool's live teachers have served so far."""
    import ray

    return sum(ray.get(a.stats.remote())["requests"] for a in pool.actors.values())


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of an MLflow metric, the last value logged per step (a restarted worker logs some steps
    twice)."""
    last = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        last[m.step] = m.value
    return sorted(last.items())


def step_of(tag: str) -> int:
    """The 1-based step of a skd event tag's value ("step S: ...", e.g. `skd.teacher_lost.<name>`)."""
    return int(tag.split(":")[0].removeprefix("step "))
