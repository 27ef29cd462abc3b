"""`skd distill` against the plain in-process script (`bench/plain_kd.py`), side by side in one run.

Run:  python bench/vs_plain.py -c configs/sst2.yaml [--set key=value ...] [--threads 2]

Both do SKD with a uniform distribution over the config's teachers (prepared: `skd teachers prepare`),
and single-teacher KD (`--variants`), the same data, student, steps, evaluations and final save; the
plain script runs once more with the malloc settings skd gives its workers (`ray.hold_freed_memory`), so
the comparison is fair either way. Run nothing else on the machine meanwhile.
For each: the whole command's wall time (process start to exit: imports, Ray, teacher loading, MLflow,
saving), the step loop's time with and without evaluations and checkpoints, and the training throughput
= total samples / step-loop seconds. Targets (#12): skd's training throughput >= 1.1x the plain script's,
and skd's whole command <= 1.1x the plain script's. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run a command (output passed through), return (wall seconds, stdout).

    Raises:
        RuntimeError: it failed (its output's end is in the message).
    """
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout[-2000:]} {proc.stderr[-3000:]}")
    return wall, proc.stdout


def skd_row(cfg, name: str, wall: float, plain: dict) -> dict:
    """The `skd distill` run `name`'s figures from its MLflow metrics (samples / `time/train_s`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment_name())
    run = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'", max_results=1)[0]
    m = run.data.metrics
    metric = f"dev/{next(iter(plain['dev']))}" if plain["dev"] else None
    samples = int(sum(v for k, v in m.items() if k.startswith("teacher_samples/")))  # one teacher per step
    return {"wall_s": round(wall, 2), "loop_s": round(m["time/loop_s"], 2), "train_s": round(m["time/train_s"], 2),
            "samples": samples, "samples_per_s": round(samples / m["time/train_s"], 2), "dev": m.get(metric),
            "run_id": run.info.run_id, "timings": {k: round(v, 2) for k, v in m.items() if k.startswith("time/")}}


def plain_row(wall: float, plain: dict) -> dict:
    """The plain script's row from its JSON line (`bench/plain_kd.py`) and the command's wall seconds."""
    return {"wall_s": round(wall, 2), "loop_s": round(plain["train_s"] + plain["eval_s"], 2),
            "train_s": plain["train_s"], "samples": plain["samples"], "samples_per_s": plain["samples_per_s"],
            "dev": next(iter(plain["dev"].values()), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the plain script")
    ap.add_argument("--variants", default="skd,single:minilm-l6",
                    help="comma-separated: skd (uniform over the config's teachers) and/or single:<teacher>")
    args = ap.parse_args()

    import os

    from rich.console import Console
    from rich.table import Table

    from orchestrator.config.load import load_config
    from orchestrator.driver.runtime import HOLD_FREED_MEMORY

    bindir = Path(sys.executable).parent
    stamp = time.strftime("%H%M%S")
    rows, ratios = [], {}
    for i, variant in enumerate(v.strip() for v in args.variants.split(",")):
        sets = [*args.overrides, f"distill.strategy={variant}", "distill.distribution.family=uniform"]
        cfg = load_config(args.config, sets)
        plain_cmd = [sys.executable, "bench/plain_kd.py", "-c", args.config, "--threads", str(args.threads),
                     *[a for s in sets for a in ("--set", s)]]
        wall, out = timed(plain_cmd)
        plain = json.loads(out.strip().splitlines()[-1])
        rows.append((f"plain script, {variant}, {args.threads} threads, in turn", plain_row(wall, plain)))
        if i == 0:  # the plain script with the malloc settings skd gives its workers (ray.hold_freed_memory)
            wall_m, out_m = timed(plain_cmd, env={**os.environ, **HOLD_FREED_MEMORY})
            rows.append((f"plain script, {variant}, + skd's malloc settings",
                         plain_row(wall_m, json.loads(out_m.strip().splitlines()[-1]))))
        name = f"vs-plain-{variant.replace(':', '-')}-{stamp}"
        wall_skd, _ = timed([str(bindir / "skd"), "distill", "-c", args.config,
                             *[a for s in sets for a in ("--set", s)], "--set", f"mlflow.run_name={name}"])
        skd = skd_row(cfg, name, wall_skd, plain)
        rows.append((f"skd distill, {variant}", skd))
        ratios[variant] = {"train_throughput_skd_over_plain": round(skd["samples_per_s"] / plain["samples_per_s"], 3),
                           "wall_skd_over_plain": round(skd["wall_s"] / wall, 3)}
        rows.append((f"skd / plain, {variant}  [targets: samples/s >= 1.1, whole <= 1.1]", ratios[variant]))
    table = Table(title=f"skd distill vs the plain script: {cfg.task}, {plain['steps']} steps of "
                        f"{cfg.distill.batch_size}")
    for col in ("run", "whole command s", "step loop s (with evals)", "training s", "samples/s (training)", "dev"):
        table.add_column(col, justify="right")
    for label, r in rows:
        if "wall_s" not in r:
            table.add_row(label, f"{r['wall_skd_over_plain']:.3f}", "", "", f"{r['train_throughput_skd_over_plain']:.3f}", "")
            continue
        table.add_row(label, f"{r['wall_s']:.1f}", f"{r['loop_s']:.1f}", f"{r['train_s']:.1f}",
                      f"{r['samples_per_s']:.1f}", "-" if r["dev"] is None else f"{r['dev']:.4f}")
    Console(width=170).print(table)
    print(json.dumps({"bench": "vs_plain", "config": args.config, "overrides": args.overrides,
                      "rows": [{"run": label, **r} for label, r in rows], "ratios": ratios}))


if __name__ == "__main__":
    main()
