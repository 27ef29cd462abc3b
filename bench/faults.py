"""The fault table: each fault injected into the same short SST-2 run, next to an uninterrupted one.

    python bench/faults.py [--out runs/bench-faults] [--steps 200]

Teachers are the bottom 3 and 2 layers of the packaged MiniLM, fine-tuned briefly; the student keeps 1
layer; 4,000 training rows, the full dev set, batch 16, a checkpoint every 25 steps. Everything logs to a
real `mlflow server` on 127.0.0.1 that this script starts (and, for the outage, stops and restarts).
Faults (one run each, one Ray cluster for the in-process runs):

- teacher-lost: `ray.kill(teacher, no_restart=True)` once the teachers served 60 requests;
- worker-killed: SIGKILL of the Ray Train worker process once its first checkpoint is registered;
- interrupt: `skd distill` in its own process, SIGINT after its first checkpoint, then `--resume`;
- mlflow-outage: the tracking server stopped after step 20's metrics arrived and restarted 10 s later;
- checkpoint-corrupt: the run stopped after 100 steps, its newest checkpoint's model.safetensors cut by
  64 bytes, then `--resume` (falls back to the checkpoint before);
- nan-teacher: one teacher's classifier weights set to NaN (a copy of its folder, served by its actor):
  `distill.nonfinite: stop` ends the run with a checkpoint and one error;
- cache-damaged: soft labels cached, one bit flipped in one shard; the run is refused before Ray starts,
  `skd cache build` rewrites that shard, the run trains from the cache;
- disk-full: ray.storage_path on a 24 MiB tmpfs this script mounts (root only; skipped otherwise), smaller
  than one checkpoint: the first checkpoint fills it, the run ends with one error and is not retried.

Prints one JSON line per run and a markdown table: final status and steps, steps trained twice (a lower
bound on the work lost: steps re-trained after a restart that had already logged), steps without a
train/loss value in the store (metrics lost), and trainer wall time (s) against the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.driver import runtime  # noqa: E402  (Ray / MLflow environment defaults)
from tests.faultkit import (checkpoint_registered, checkpoint_written, kill_workers,  # noqa: E402
                            start_mlflow_server, stop, teacher_requests, when)


def config(out: Path, uri: str, steps: int) -> dict:
    return {"task": "sst2", "output_dir": str(out),
            "data": {"max_train_samples": 4000, "max_length": 64},
            "teachers": {"members": [{"name": "minilm-l3", "init": "minilm", "num_layers": 3},
                                     {"name": "minilm-l2", "init": "minilm", "num_layers": 2}],
                         "finetune": {"max_steps": 60, "batch_size": 32}, "num_cpus": 0.25},
            "student": {"init": "minilm", "num_layers": 1},
            "distill": {"max_steps": steps, "batch_size": 16, "eval_every": steps // 2, "checkpoint_every": 25,
                        "log_every": 5},
            "ray": {"num_workers": 1, "cpus_per_worker": 1, "num_cpus": 2},
            "mlflow": {"tracking_uri": uri, "experiment": "skd-bench-faults"}}


FAULTS = ("teacher-lost", "worker-killed", "interrupt", "mlflow-outage", "checkpoint-corrupt", "nan-teacher",
          "cache-damaged", "disk-full")


@dataclass
class Bench:
    """One benchmark invocation: its config maker, store, server and rows. Run names end in `stamp`, so
    runs (and their checkpoint folders) of an earlier invocation in the same folder are never matched."""

    out: Path
    steps: int
    port: int
    server: subprocess.Popen
    base: dict
    stamp: str = field(default_factory=lambda: time.strftime("%m%d-%H%M%S"))
    rows: list = field(default_factory=list)

    def name(self, fault: str) -> str:
        return f"{fault}-{self.stamp}"

    def cfg(self, fault: str, *overrides: str):
        from orchestrator.config.load import load_config

        return load_config(None, [f"mlflow.run_name={self.name(fault)}", *overrides], base=self.base)

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"http://127.0.0.1:{self.port}")

    def record(self, fault: str, how: str, res, extra: dict | None = None) -> None:
        row = {"fault": fault, "injected": how, "status": res.status, "steps": res.steps,
               "wall_s": round(res.wall_s, 1), **store_view(self.client, res.run_id, self.steps), **(extra or {})}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def in_background(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=fn()))
    thread.start()
    return thread, box


def store_view(client, run_id: str, steps: int) -> dict:
    """Steps logged twice and steps missing, from the store's train/loss history."""
    seen = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    return {"steps_logged_twice": sum(1 for n in seen.values() if n > 1),
            "steps_missing_metrics": sum(1 for s in range(1, steps + 1) if s not in seen)}


def restart_view(client, run_id: str) -> dict:
    """From the train/loss timestamps: the longest pause between two logged steps (a restart: the worker
    died, a new one set up and resumed), the steps around it, and its seconds."""
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    before, after = max(zip(history, history[1:]), key=lambda pair: pair[1].timestamp - pair[0].timestamp)
    return {"longest_pause_after_step": before.step, "next_step_logged": after.step,
            "longest_pause_s": round((after.timestamp - before.timestamp) / 1000, 1)}


def teacher_lost(b: Bench) -> None:
    import ray

    from orchestrator.commands.distill import run_distill
    from orchestrator.driver.plan import make_plan
    from orchestrator.driver.sources import start_pool

    c = b.cfg("teacher-lost")
    plan = make_plan(c)
    pool = start_pool(plan, plan.resources(ray.cluster_resources(), len(plan.active)), plan.active)
    thread, box = in_background(lambda: run_distill(c, source=pool, register_as=None))
    when(lambda: teacher_requests(pool) >= 60, thread.is_alive, every_s=0.05)
    ray.kill(pool.actors[1], no_restart=True)
    thread.join()
    pool.close()
    tags = b.client.get_run(box["out"].run_id).data.tags
    b.record("teacher lost for good", "ray.kill(teacher actor, no_restart=True) after 60 requests", box["out"],
             {"event": tags.get("skd.teacher_lost.minilm-l2", "-"), "counts": box["out"].counts})


def worker_killed(b: Bench) -> None:
    from orchestrator.commands.distill import run_distill

    c = b.cfg("worker-killed")
    thread, box = in_background(lambda: run_distill(c, register_as=None))
    when(checkpoint_registered(c.storage_path(), b.name("worker-killed")), thread.is_alive)
    killed = kill_workers()
    thread.join()
    b.record("student worker killed", f"SIGKILL of the Ray Train worker after its first registered checkpoint "
             f"({len(killed)})", box["out"], restart_view(b.client, box["out"].run_id))


def interrupted(b: Bench) -> None:
    from orchestrator.commands.distill import run_distill

    c = b.cfg("interrupt")
    config_file = b.out / "interrupt.yaml"
    config_file.write_text(json.dumps(json.loads(c.model_dump_json(exclude_none=True, exclude={"tune"}))))
    log = b.out / f"{b.name('interrupt')}.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "skd"), "distill", "-c", str(config_file)],
                                stdout=f, stderr=subprocess.STDOUT)
        when(checkpoint_written(c.storage_path(), b.name("interrupt")), lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    first = float(re.search(r"wall time\s*│\s*([\d.]+) s", log.read_text()).group(1))
    res = run_distill(c, resume=True, register_as=None)
    res.wall_s += first
    b.record("driver interrupted", "SIGINT to `skd distill` after its first checkpoint, then --resume", res,
             {"exit_code": code, "first_part_s": first, "whole_s": round(time.perf_counter() - started, 1)})


def mlflow_outage(b: Bench) -> None:
    from orchestrator.commands.distill import run_distill

    c = b.cfg("mlflow-outage")
    thread, box = in_background(lambda: run_distill(c, register_as=None))
    client = b.client

    def step_20_logged() -> bool:
        exp = client.get_experiment_by_name("skd-bench-faults")
        found = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{b.name('mlflow-outage')}'")
        return bool(found) and any(m.step >= 20 for m in client.get_metric_history(found[0].info.run_id, "train/loss"))

    when(step_20_logged, thread.is_alive, every_s=0.2)
    stop(b.server)
    time.sleep(10)
    b.server = start_mlflow_server(b.port, b.out / "mlflow")
    thread.join()
    b.record("MLflow server down 10 s", "mlflow server stopped after step 20, restarted 10 s later", box["out"])


def checkpoint_corrupt(b: Bench) -> None:
    from orchestrator.commands.distill import run_distill

    c = b.cfg("checkpoint-corrupt")
    first = run_distill(c, stop_after=100, register_as=None)
    weights = Path(first.checkpoint) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    res = run_distill(c, resume=True, register_as=None)
    res.wall_s += first.wall_s
    tag = b.client.get_run(res.run_id).data.tags.get("skd.checkpoint_refused", "-")
    b.record("newest checkpoint damaged", f"stopped at 100, {weights.name} of step {first.steps}'s checkpoint cut by "
             f"64 bytes, then --resume", res, {"event": tag})


def nan_teacher(b: Bench) -> None:
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    from actors.errors import NonFiniteError
    from actors.manifest import read_manifest, write_manifest
    from orchestrator.commands.distill import run_distill

    teachers = read_manifest(b.cfg("teachers").manifest_path())
    bad = b.out / f"nan-teacher-{b.stamp}"
    victim = teachers[1]
    shutil.copytree(victim.checkpoint, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("classifier.") and k.endswith("weight"))
    tensors[key][:] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    manifest = b.out / f"nan-teachers-{b.stamp}.json"
    write_manifest(manifest, [dataclasses.replace(t, checkpoint=str(bad)) if t is victim else t for t in teachers])
    c = b.cfg("nan-teacher", f"teachers.manifest={manifest}")
    began = time.perf_counter()
    try:
        run_distill(c, register_as=None)
        error = "none"
    except NonFiniteError as exc:
        error = str(exc)
    failed_row(b, "a teacher answers NaN", "nan-teacher", f"{victim.name}'s classifier weights set to NaN", began,
               error)


def cache_damaged(b: Bench) -> None:
    from actors.errors import SkdError
    from orchestrator.commands.cache_build import build_cache
    from orchestrator.commands.distill import run_distill

    cache = b.out / f"cache-{b.stamp}"
    c = b.cfg("cache-damaged", f"distill.knowledge.source=cache:{cache}")
    build_cache(c, cache)
    shard = next(iter(sorted(cache.glob("*/shard-00001.safetensors"))))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    try:
        run_distill(c, register_as=None)
        refused = "not refused"
    except SkdError as exc:
        refused = str(exc)
    began = time.perf_counter()
    build_cache(c, cache)
    rebuilt = round(time.perf_counter() - began, 1)
    res = run_distill(c, register_as=None)
    b.record("cache shard damaged", f"one bit flipped in {shard.parent.name}/{shard.name}", res,
             {"refused": refused, "rebuild_s": rebuilt})


def failed_row(b: Bench, fault: str, name: str, how: str, began: float, error: str, extra: dict | None = None
               ) -> None:
    """Record a run that ended with an error (no RunResult): its MLflow status and steps from the store."""
    exp = b.client.get_experiment_by_name("skd-bench-faults")
    [run] = b.client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{b.name(name)}'")
    steps = max((m.step for m in b.client.get_metric_history(run.info.run_id, "train/loss")), default=0)
    row = {"fault": fault, "injected": how, "status": run.info.status, "steps": steps,
           "wall_s": round(time.perf_counter() - began, 1), **store_view(b.client, run.info.run_id, steps),
           "error": error, **(extra or {})}
    b.rows.append(row)
    print(json.dumps(row), flush=True)


def disk_full(b: Bench) -> None:
    import os

    from actors.errors import SkdError
    from orchestrator.commands.distill import run_distill

    disk = b.out / f"fulldisk-{b.stamp}"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        print(json.dumps({"fault": "disk-full", "skipped": "mounting a tmpfs needs root"}), flush=True)
        return
    try:
        c = b.cfg("disk-full", f"ray.storage_path={disk}", "ray.max_failures=2")
        began = time.perf_counter()
        try:
            run_distill(c, register_as=None)
            error = "none"
        except SkdError as exc:
            error = str(exc)
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("checkpoint_*"))
        failed_row(b, "disk full", "disk-full", "ray.storage_path on a 24 MiB tmpfs (a checkpoint is larger)",
                   began, error, {"checkpoint_folders_left": left})
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def table(rows: list[dict]) -> None:
    base_wall = rows[0]["wall_s"]
    print("\n| fault | injected | status | steps | steps trained twice (>=) | steps missing metrics | "
          "trainer wall s (vs none) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['injected']} | {r['status']} | {r['steps']} | {r['steps_logged_twice']} | "
              f"{r['steps_missing_metrics']} | {r['wall_s']} ({r['wall_s'] - base_wall:+.1f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-faults"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS),
                        help="which faults to inject (the uninterrupted run always runs)")
    args = parser.parse_args()
    out = args.out.resolve()
    (out / "mlflow").mkdir(parents=True, exist_ok=True)
    port = runtime.free_port()
    uri = f"http://127.0.0.1:{port}"
    b = Bench(out, args.steps, port, start_mlflow_server(port, out / "mlflow"), config(out, uri, args.steps))
    import ray

    from orchestrator.commands.distill import run_distill
    from orchestrator.commands.teachers import prepare_teachers

    try:
        prepare_teachers(b.cfg("teachers"))
        runtime.start_local_ray(2, dashboard=False, log_to_driver=False)
        b.record("none", "-", run_distill(b.cfg("baseline"), register_as=None))
        for fault, inject in (("teacher-lost", teacher_lost), ("worker-killed", worker_killed),
                              ("interrupt", interrupted), ("mlflow-outage", mlflow_outage),
                              ("checkpoint-corrupt", checkpoint_corrupt), ("nan-teacher", nan_teacher),
                              ("cache-damaged", cache_damaged), ("disk-full", disk_full)):
            if fault in args.faults:
                inject(b)
    finally:
        ray.shutdown()
        stop(b.server)
    table(b.rows)


if __name__ == "__main__":
    main()
