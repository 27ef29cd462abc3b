"""Step benchmark: student alone, teacher alone, actor vs in-process teacher, and the SKD step with prefetch.

Run:  python bench/step_bench.py [--steps 30] [--teacher-layers 6] [--student-layers 2]

All four measurements use the same SST-2 batches in one run (ratios, not absolute numbers, are the
targets; these machines are noisy). Teacher and student are each limited to one core (torch threads = 1;
the teacher actor gets num_cpus=1). Prints a table and one JSON line:
  (a) student training step alone            samples/s
  (b) teacher forward alone, in-process      samples/s
  (c) teacher forward through its Ray actor  samples/s  (ratio actor/in-process; target >= 0.95)
  (d) SKD step: student step with the teacher request for step t+1 sent before step t's backward
      (target: time per step <= 1.15 x the slower of (a) and (b))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch
    from rich.console import Console
    from rich.table import Table

    from actors.knowledge import TokenBatch
    from actors.manifest import TeacherInfo
    from actors.pool import TeacherPool
    from actors.teacher import Teacher
    from orchestrator.config import DataConfig
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.worker.losses import distillation_loss
    from actors.models import load_classifier, load_tokenizer

    torch.set_num_threads(1)
    n = args.warmup + args.steps
    data = encode(load_split("sst2", DataConfig(max_train_samples=n * args.batch_size), "train"),
                  load_tokenizer("minilm"), args.max_length)
    batches = [data.batch(np.arange(i * args.batch_size, (i + 1) * args.batch_size), 0) for i in range(n)]
    tbs = [TokenBatch.of(b) for b in batches]

    # a teacher checkpoint: the packaged MiniLM's bottom layers with a fresh head, saved once
    teacher_dir = Path(os.environ.get("SKD_BENCH_DIR", "/tmp/skd-bench")) / f"teacher-l{args.teacher_layers}"
    if not (teacher_dir / "config.json").is_file():
        load_classifier("minilm", 2, args.teacher_layers).save_pretrained(teacher_dir)
    student = load_classifier("minilm", 2, args.student_layers)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    student.train()

    def student_step(b, teacher_logits=None, before_backward=None):
        logits = student(input_ids=torch.as_tensor(b["input_ids"]),
                         attention_mask=torch.as_tensor(b["attention_mask"])).logits
        t = teacher_logits() if teacher_logits else None
        if before_backward:
            before_backward()
        loss = distillation_loss(logits, torch.as_tensor(b["labels"]), t, 0.5, 2.0, False)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        """samples/s of fn(i) over the measured steps (after warm-up)."""
        for i in range(args.warmup):
            fn(i)
        start = time.perf_counter()
        for i in range(args.warmup, n):
            fn(i)
        return args.steps * args.batch_size / (time.perf_counter() - start)

    results = {}
    results["a_student_alone"] = timed(lambda i: student_step(batches[i]))
    local = Teacher(0, str(teacher_dir), 2, threads=1, device="cpu")
    results["b_teacher_inprocess"] = timed(lambda i: local.knowledge(tbs[i]))

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    info = TeacherInfo("bench", str(teacher_dir), args.teacher_layers, 384, 0, 0.0, "accuracy", "", 2, "sst2")
    pool = TeacherPool.start([info], [0], num_cpus=1, num_gpus=0, threads=1, regression=False)
    results["c_teacher_actor"] = timed(lambda i: pool.knowledge(0, tbs[i]))

    pending = {}

    def skd_step(i):
        if i not in pending:
            pending[i] = pool.submit(0, tbs[i])

        def prefetch():  # request step i+1 before step i's backward pass
            if i + 1 < n:
                pending[i + 1] = pool.submit(0, tbs[i + 1])

        def teacher_logits():
            return torch.from_numpy(np.array(pending.pop(i).result().logits))

        student_step(batches[i], teacher_logits, prefetch)

    results["d_skd_prefetch"] = timed(skd_step)
    pool.close()
    ray.shutdown()

    slower = min(results["a_student_alone"], results["b_teacher_inprocess"])  # samples/s of the slower one
    ratios = {"skd_time_over_slower": slower / results["d_skd_prefetch"],
              "actor_over_inprocess": results["c_teacher_actor"] / results["b_teacher_inprocess"]}
    table = Table(title=f"step benchmark: teacher {args.teacher_layers} layers, student {args.student_layers} layers, "
                        f"batch {args.batch_size}, {args.steps} steps, 1 core each")
    table.add_column("measurement")
    table.add_column("samples/s", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.1f}")
    table.add_row("(d) time / slower of (a),(b)  [target <= 1.15]", f"{ratios['skd_time_over_slower']:.3f}")
    table.add_row("actor / in-process throughput [target >= 0.95]", f"{ratios['actor_over_inprocess']:.3f}")
    Console().print(table)
    print(json.dumps({"bench": "step", **vars(args), **{k: round(v, 2) for k, v in results.items()},
                      **{k: round(v, 4) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
