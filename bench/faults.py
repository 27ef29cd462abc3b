"""The fault table: each fault injected into the same short SST-2 run, next to an uninterrupted one.

    python bench/faults.py [--out runs/bench-faults] [--steps 200]

Teachers are the bottom 3 and 2 layers of the packaged MiniLM, fine-tuned briefly; the student keeps 1
layer; 4,000 training rows, the full dev set, batch 16, a checkpoint every 25 steps. Everything logs to a
real `mlflow server` on 127.0.0.1 that this script starts (and, for the outage, stops and restarts).
Faults (one run each, one Ray cluster for the in-process runs):

- teacher-lost: `ray.kill(teacher, no_restart=True)` once the teachers served 60 requests;
- worker-killed: SIGKILL of the Ray Train worker process right after its first checkpoint;
- interrupt: `skd distill` in its own process, SIGINT after its first checkpoint, then `--resume`;
- mlflow-outage: the tracking server stopped after step 20's metrics arrived and restarted 10 s later.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import runtime  # noqa: E402  (Ray / MLflow environment defaults)
from tests.faultkit import (checkpoint_written, kill_workers, start_mlflow_server, stop,  # noqa: E402
                            teacher_requests, when)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-faults"))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlflow").mkdir(exist_ok=True)
    port = runtime.free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, out / "mlflow")

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.config_load import load_config
    from orchestrator.distill import run_distill
    from orchestrator.plan import make_plan
    from orchestrator.sources import start_pool
    from orchestrator.teachers import prepare_teachers

    base = config(out, uri, args.steps)
    cfg = lambda *o: load_config(None, list(o), base=base)  # noqa: E731
    client = MlflowClient(uri)
    prepare_teachers(cfg())
    runtime.start_local_ray(2, dashboard=False, log_to_driver=False)
    rows = []

    def record(fault: str, how: str, res, extra: dict | None = None) -> None:
        row = {"fault": fault, "injected": how, "status": res.status, "steps": res.steps, "wall_s": round(res.wall_s, 1),
               **store_view(client, res.run_id, args.steps), **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("none", "-", run_distill(cfg("mlflow.run_name=baseline"), register_as=None))

    c = cfg("mlflow.run_name=teacher-lost")
    plan = make_plan(c)
    pool = start_pool(plan, plan.resources(ray.cluster_resources(), len(plan.active)), plan.active)
    thread, box = in_background(lambda: run_distill(c, source=pool, register_as=None))
    when(lambda: teacher_requests(pool) >= 60, thread.is_alive, every_s=0.05)
    ray.kill(pool.actors[1], no_restart=True)
    thread.join()
    pool.close()
    tags = client.get_run(box["out"].run_id).data.tags
    record("teacher lost for good", "ray.kill(teacher actor, no_restart=True) after 60 requests", box["out"],
           {"event": tags.get("skd.teacher_lost.minilm-l2", "-"), "counts": box["out"].counts})

    c = cfg("mlflow.run_name=worker-killed")
    thread, box = in_background(lambda: run_distill(c, register_as=None))
    when(checkpoint_written(c.storage_path(), "worker-killed"), thread.is_alive)
    killed = kill_workers()
    thread.join()
    record("student worker killed", f"SIGKILL of the Ray Train worker after its first checkpoint ({len(killed)})",
           box["out"])

    raw = json.loads(cfg().model_dump_json(exclude_none=True, exclude={"tune"}))
    (out / "interrupt.yaml").write_text(json.dumps(raw))
    log = out / "interrupt.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "skd"), "distill", "-c", str(out / "interrupt.yaml"),
                                 "--set", "mlflow.run_name=interrupted"], stdout=f, stderr=subprocess.STDOUT)
        when(checkpoint_written(c.storage_path(), "interrupted"), lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    first = float(re.search(r"wall time\s*│\s*([\d.]+) s", log.read_text()).group(1))
    res = run_distill(cfg("mlflow.run_name=interrupted"), resume=True, register_as=None)
    res.wall_s += first
    record("driver interrupted", "SIGINT to `skd distill` after its first checkpoint, then --resume", res,
           {"exit_code": code, "first_part_s": first, "whole_s": round(time.perf_counter() - started, 1)})

    c = cfg("mlflow.run_name=mlflow-outage")
    thread, box = in_background(lambda: run_distill(c, register_as=None))

    def step_20_logged() -> bool:
        exp = client.get_experiment_by_name("skd-bench-faults")
        found = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'mlflow-outage'")
        return bool(found) and any(m.step >= 20 for m in client.get_metric_history(found[0].info.run_id, "train/loss"))

    when(step_20_logged, thread.is_alive, every_s=0.2)
    stop(server)
    time.sleep(10)
    server = start_mlflow_server(port, out / "mlflow")
    thread.join()
    record("MLflow server down 10 s", "mlflow server stopped after step 20, restarted 10 s later", box["out"])
    ray.shutdown()
    stop(server)

    base_wall = rows[0]["wall_s"]
    print("\n| fault | injected | status | steps | steps trained twice (>=) | steps missing metrics | "
          "trainer wall s (vs none) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['injected']} | {r['status']} | {r['steps']} | {r['steps_logged_twice']} | "
              f"{r['steps_missing_metrics']} | {r['wall_s']} ({r['wall_s'] - base_wall:+.1f}) |")


if __name__ == "__main__":
    main()
