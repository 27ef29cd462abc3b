"""Offline knowledge cache vs online teacher actors, side by side in one run: training speed and size.

Run:  python bench/cache_bench.py -c configs/sst2-hsk.yaml [--steps 150] [--cache PATH] [--set k=v ...]

1. `skd cache build` for the config's knowledge request (timed; reused when already complete).
2. The same student, teachers, request, seed and steps trained twice: online (teacher actors select and
   send the knowledge each step) and from the cache (no teacher loaded); with --cache-cpus N a third run
   from the cache gives the student the N CPUs the teachers no longer occupy. Speed = mean training
   throughput (samples/s) over the run, i.e. per-epoch time without the Ray start-up; the wall time of
   each run is printed too.
3. Size: the cache's bytes vs the bytes of the full hidden-state knowledge (HSK) of the same examples:
   every teacher layer (embeddings excluded) x every real token x every dim, in the request's wire dtype.

Targets (issue #4): speed-up >= 2.7 (Liu et al. report 2.7-3.4x) and, for 1 layer x 10 tokens x 10% width,
size ratio <= 2%. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import runtime  # noqa: E402,F401  (Ray / MLflow environment defaults)
from orchestrator.config_load import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/sst2-hsk.yaml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: <output_dir>/bench-cache)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--cache-cpus", type=int, default=0,
                    help="also train from the cache with this many CPUs (torch threads) for the student: the "
                         "cores the teachers no longer need (0: skip)")
    args = ap.parse_args()

    from actors.manifest import read_manifest
    from orchestrator.distill import run_distill
    from orchestrator.cache_build import build_cache
    from orchestrator.data import prepare_inputs

    base = [*args.sets, f"distill.max_steps={args.steps}", f"distill.eval_every={args.steps}"]
    cfg = load_config(args.config, base)
    cache = (args.cache or cfg.out_dir() / "bench-cache").resolve()
    t0 = time.perf_counter()
    summary = build_cache(cfg, cache)
    build_s = time.perf_counter() - t0

    online = run_distill(load_config(args.config, [*base, "mlflow.run_name=bench-online"]), register_as=None)
    cached = run_distill(load_config(args.config, [*base, "mlflow.run_name=bench-cache",
                                                   f"distill.knowledge.source=cache:{cache}"]), register_as=None)

    wide = None
    if args.cache_cpus:
        wide = run_distill(load_config(args.config, [*base, "mlflow.run_name=bench-cache-wide",
                                                     f"distill.knowledge.source=cache:{cache}",
                                                     f"ray.cpus_per_worker={args.cache_cpus}"]), register_as=None)
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    teachers = read_manifest(cfg.manifest_path())
    tokens = sum(len(x) for x in inputs.train.input_ids)  # real tokens of the training split
    value_bytes = 4 if cfg.distill.knowledge.wire_dtype == "float32" else 2
    full = sum(t.num_layers * t.hidden_size for t in teachers) * tokens * value_bytes
    row = {
        "bench": "cache", "config": args.config, "steps": args.steps,
        "cache_build_s": round(build_s, 1), "cache_bytes": summary["total_bytes"],
        "bytes_per_example": round(summary["bytes_per_example"], 1), "full_hsk_bytes": full,
        "size_ratio": summary["total_bytes"] / full, "hsk_fraction": summary.get("hsk_fraction"),
        "online_samples_per_s": round(online.samples_per_s, 2), "cache_samples_per_s": round(cached.samples_per_s, 2),
        "speedup": cached.samples_per_s / online.samples_per_s,
        "online_wall_s": round(online.wall_s, 1), "cache_wall_s": round(cached.wall_s, 1),
        "online_dev": online.dev, "cache_dev": cached.dev,
    }
    if wide is not None:
        row.update(cache_cpus=args.cache_cpus, cache_wide_samples_per_s=round(wide.samples_per_s, 2),
                   speedup_wide=wide.samples_per_s / online.samples_per_s, cache_wide_wall_s=round(wide.wall_s, 1),
                   cache_wide_dev=wide.dev)
    print(f"{'quantity':<34}{'value':>16}")
    for k in ("cache_build_s", "cache_bytes", "bytes_per_example", "full_hsk_bytes", "size_ratio", "hsk_fraction",
              "online_samples_per_s", "cache_samples_per_s", "speedup", "online_wall_s", "cache_wall_s",
              "cache_wide_samples_per_s", "speedup_wide", "cache_wide_wall_s"):
        if k not in row:
            continue
        v = row[k]
        print(f"{k:<34}{v:>16.4f}" if isinstance(v, float) else f"{k:<34}{v!s:>16}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
