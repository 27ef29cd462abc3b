"""Cost of the GSNR probe (`distill.gsnr_every`, `distill.gsnr_probe_size`) relative to a training step.

Run:  python bench/gsnr_bench.py [--student-layers 2] [--batch-size 32] [--probe-sizes 8 16 32]

The student is the packaged MiniLM's bottom layers (the SST-2 configs' student) on real SST-2 rows, one
torch thread, the same as one Ray Train worker with `ray.cpus_per_worker: 1`. Measured side by side in one
process: the mean time of a training step (forward, backward, AdamW) and of one GSNR probe
(`orchestrator.worker.gsnr.probe_gsnr`: per-sample gradients with torch.func vmap over the probe, then
per-parameter mean^2 / variance, Liu et al. ICLR 2020) for each probe size. The overhead of probing every
N steps is probe_s / (N * step_s). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--probe-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every", type=int, nargs="+", default=[50, 100], help="probe intervals (steps) to report")
    args = ap.parse_args()

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from orchestrator.config import DataConfig
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.worker.gsnr import probe_gsnr
    from actors.models import load_classifier, load_tokenizer

    torch.set_num_threads(1)
    rows = max(args.batch_size, max(args.probe_sizes))
    data = encode(load_split("sst2", DataConfig(max_train_samples=rows), "train"), load_tokenizer("minilm"),
                  args.max_length)
    student = load_classifier("minilm", 2, args.student_layers)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = data.batch(np.arange(args.batch_size), 0)

    def step():
        out = student(input_ids=torch.as_tensor(batch["input_ids"]),
                      attention_mask=torch.as_tensor(batch["attention_mask"]),
                      labels=torch.as_tensor(batch["labels"]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mean_seconds(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - start) / args.repeats

    step_s = mean_seconds(step)
    probes = {}
    for size in args.probe_sizes:
        probe = data.batch(np.arange(size), 0)
        probes[size] = mean_seconds(lambda: probe_gsnr(student, probe, regression=False))

    table = Table(title=f"GSNR probe cost: MiniLM student, {args.student_layers} layers, 1 thread, "
                        f"training batch {args.batch_size}, max length {args.max_length}")
    table.add_column("probe size", justify="right")
    table.add_column("probe s", justify="right")
    table.add_column("probe / step", justify="right")
    for n in args.every:
        table.add_column(f"overhead every {n} steps", justify="right")
    for size, s in probes.items():
        table.add_row(str(size), f"{s:.3f}", f"{s / step_s:.2f}", *[f"{100 * s / (n * step_s):.2f}%" for n in args.every])
    Console().print(f"training step: {step_s:.3f} s")
    Console().print(table)
    print(json.dumps({"bench": "gsnr", **vars(args), "step_s": round(step_s, 4),
                      **{f"probe{size}_s": round(s, 4) for size, s in probes.items()},
                      **{f"probe{size}_over_step": round(s / step_s, 3) for size, s in probes.items()}}))


if __name__ == "__main__":
    main()
