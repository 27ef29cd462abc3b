"""Served-teacher concurrency: one teacher actor answering 1, 2 and 4 students at once, with 1 or 2 compute
slots (`teachers.max_concurrency`).

Run:  python bench/pool_concurrency.py [--seconds 20] [--teacher-layers 6] [--slots 1 2] [--students 1 2 4]

Each student is a Ray actor that sends one knowledge request (a batch of real SST-2 sentences, soft labels)
and waits for the answer before sending the next, as a student without prefetch does; students do no
training here, so the teacher is the only thing measured. Per (slots, students): total requests/s and
samples/s over the whole window (total answered / total seconds), and the request latency seen by the
students (median and 95th percentile, ms). The teacher runs on CPU with torch threads = 1 per slot pass.
Prints a table and one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.driver import runtime  # noqa: F401,E402  (quiet Ray defaults)


class Student:
    """Sends requests to one teacher in a closed loop for `seconds`; returns per-request latencies (s)."""

    def run(self, teacher, batches: list, seconds: float, start_at: float) -> list[float]:
        import ray

        while time.time() < start_at:  # every student starts at the same moment
            time.sleep(0.001)
        latencies, i = [], 0
        end = start_at + seconds
        while time.time() < end:
            t0 = time.perf_counter()
            ray.get(teacher.knowledge.remote(batches[i % len(batches)]))
            latencies.append(time.perf_counter() - t0)
            i += 1
        return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--students", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()

    import numpy as np
    import ray
    from rich.console import Console
    from rich.table import Table

    from actors.knowledge import TokenBatch
    from actors.manifest import TeacherInfo
    from actors.models import load_classifier, load_tokenizer
    from actors.pool import TeacherPool
    from orchestrator.config import DataConfig
    from orchestrator.driver.inputs import encode, load_split

    n = 16
    data = encode(load_split("sst2", DataConfig(max_train_samples=n * args.batch_size), "train"),
                  load_tokenizer("minilm"), args.max_length)
    batches = [TokenBatch.of(data.batch(np.arange(i * args.batch_size, (i + 1) * args.batch_size), 0))
               for i in range(n)]
    teacher_dir = Path(os.environ.get("SKD_BENCH_DIR", "/tmp/skd-bench")) / f"teacher-l{args.teacher_layers}"
    if not (teacher_dir / "config.json").is_file():
        load_classifier("minilm", 2, args.teacher_layers).save_pretrained(teacher_dir)
    info = TeacherInfo("bench", str(teacher_dir), args.teacher_layers, 384, 0, 0.0, "accuracy", "", 2, "sst2")

    runtime.start_local_ray(max(args.students) + 2, dashboard=False, log_to_driver=False)
    rows = []
    try:
        batch_refs = [ray.put(b) for b in batches]
        students = [ray.remote(Student).options(num_cpus=0).remote() for _ in range(max(args.students))]
        for slots in args.slots:
            pool = TeacherPool.start([info], [0], num_cpus=1, num_gpus=0, threads=1, regression=False, slots=slots)
            teacher = pool.actors[0]
            ray.get([teacher.knowledge.remote(b) for b in batch_refs[:2]])  # warm-up
            for k in args.students:
                start_at = time.time() + 1.0
                lat = ray.get([s.run.remote(teacher, batch_refs, args.seconds, start_at) for s in students[:k]])
                every = np.concatenate([np.asarray(x) for x in lat])
                requests = len(every)
                row = {"bench": "pool_concurrency", "slots": slots, "students": k, "seconds": args.seconds,
                       "requests": requests, "requests_per_s": round(requests / args.seconds, 2),
                       "samples_per_s": round(requests * args.batch_size / args.seconds, 1),
                       "latency_p50_ms": round(1000 * float(np.median(every)), 1),
                       "latency_p95_ms": round(1000 * float(np.percentile(every, 95)), 1),
                       "per_student_requests": [len(x) for x in lat], "teacher_layers": args.teacher_layers,
                       "batch_size": args.batch_size, "cpu_cores": os.cpu_count()}
                rows.append(row)
                print(json.dumps(row), flush=True)
            pool.close()
    finally:
        ray.shutdown()

    table = Table(title=f"one teacher ({args.teacher_layers} MiniLM layers, CPU, 1 thread per pass), closed-loop "
                        f"students, batch {args.batch_size}, {args.seconds:g} s each, {os.cpu_count()} cores")
    for col in ("slots", "students", "requests/s", "samples/s", "latency p50 ms", "latency p95 ms", "per student"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["slots"]), str(r["students"]), f"{r['requests_per_s']:.1f}", f"{r['samples_per_s']:.0f}",
                      f"{r['latency_p50_ms']:.0f}", f"{r['latency_p95_ms']:.0f}",
                      "/".join(map(str, r["per_student_requests"])))
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
