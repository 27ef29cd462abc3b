"""Offline knowledge cache vs online teacher actors, side by side in one run: training speed and size.

Run:  python bench/cache_bench.py -c configs/sst2-hsk.yaml [--steps 150] [--cache PATH] [--set k=v ...]

1. `skd cache build` for the config's knowledge request (timed; reused when already complete).
2. The same student, teachers, request, seed and steps trained twice: online (teacher actors select and
   send the knowledge each step) and from the cache (no teacher loaded); with --cache-cpus N a third run
   from the cache gives the student the N CPUs the teachers no longer occupy. Speed = training throughput
   (total samples / `time/train_s`, the step loop without evaluations and checkpoints), i.e. per-epoch
   time without the Ray start-up; the wall time of each run is printed too.
2b. Device-seconds per epoch, the way the gain matters on a cluster where every teacher actor and every
   student worker holds a device (GPU) for the whole run: online (W workers + N teachers) x epoch seconds,
   from the cache W x epoch seconds (no teacher loaded); their ratio, and the same with the build's
   N x build seconds spread over 1 and over `--epochs-reused` epochs (a cache is built once and read by
   every run and epoch after). MUD / Liu et al. (ACL 2021) report 2.7-3.4x.
3. Size: the cache's bytes vs the bytes of the full hidden-state knowledge (HSK) of the same examples:
   every teacher layer (embeddings excluded) x every real token x every dim, in the request's wire dtype.

Targets: device-seconds per epoch online / from the cache >= 2.7 (#12; the time ratio `speedup` is
reported beside it) and, for 1 layer x 10 tokens x 10% width, size ratio <= 2% (#4). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.driver import runtime  # noqa: E402,F401  (Ray / MLflow environment defaults)
from orchestrator.config.load import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/sst2-hsk.yaml")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: <output_dir>/bench-cache)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--cache-cpus", type=int, default=0,
                    help="also train from the cache with this many CPUs (torch threads) for the student: the "
                         "cores the teachers no longer need (0: skip)")
    ap.add_argument("--epochs-reused", type=int, default=10,
                    help="epochs (over all runs) that read one cache build, for the amortised device-seconds")
    args = ap.parse_args()

    from actors.manifest import read_manifest
    from orchestrator.commands.distill import run_distill
    from orchestrator.commands.cache_build import build_cache
    from orchestrator.driver.inputs import prepare_inputs

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
    rows, workers, n = len(inputs.train), cfg.ray.num_workers, len(cfg.teachers.members)
    rate = {label: args.steps * cfg.distill.batch_size * workers / r.timings["time/train_s"]
            for label, r in (("online", online), ("cache", cached), ("wide", wide)) if r is not None}
    online_dev_s = (workers + n) * rows / rate["online"]  # device-seconds per epoch, teachers online
    cache_dev_s = workers * rows / rate["cache"]  # from the cache: the student's devices only
    build_dev_s = n * build_s
    tokens = sum(len(x) for x in inputs.train.input_ids)  # real tokens of the training split
    value_bytes = 4 if cfg.distill.knowledge.wire_dtype == "float32" else 2
    full = sum(t.num_layers * t.hidden_size for t in teachers) * tokens * value_bytes
    row = {
        "bench": "cache", "config": args.config, "steps": args.steps,
        "cache_build_s": round(build_s, 1), "cache_bytes": summary["total_bytes"],
        "bytes_per_example": round(summary["bytes_per_example"], 1), "full_hsk_bytes": full,
        "size_ratio": summary["total_bytes"] / full, "hsk_fraction": summary.get("hsk_fraction"),
        "online_samples_per_s": round(rate["online"], 2), "cache_samples_per_s": round(rate["cache"], 2),
        "speedup": rate["cache"] / rate["online"],
        "devices_online": workers + n, "devices_cache": workers, "epoch_rows": rows,
        "online_device_s_per_epoch": round(online_dev_s, 1), "cache_device_s_per_epoch": round(cache_dev_s, 1),
        "device_s_ratio": online_dev_s / cache_dev_s,
        "device_s_ratio_with_build_1_epoch": online_dev_s / (cache_dev_s + build_dev_s),
        f"device_s_ratio_with_build_{args.epochs_reused}_epochs":
            args.epochs_reused * online_dev_s / (args.epochs_reused * cache_dev_s + build_dev_s),
        "online_wall_s": round(online.wall_s, 1), "cache_wall_s": round(cached.wall_s, 1),
        "online_dev": online.dev, "cache_dev": cached.dev,
    }
    if wide is not None:
        row.update(cache_cpus=args.cache_cpus, cache_wide_samples_per_s=round(rate["wide"], 2),
                   speedup_wide=rate["wide"] / rate["online"], cache_wide_wall_s=round(wide.wall_s, 1),
                   cache_wide_dev=wide.dev)
    print(f"{'quantity':<34}{'value':>16}")
    for k in ("cache_build_s", "cache_bytes", "bytes_per_example", "full_hsk_bytes", "size_ratio", "hsk_fraction",
              "online_samples_per_s", "cache_samples_per_s", "speedup", "online_wall_s", "cache_wall_s",
              "online_device_s_per_epoch", "cache_device_s_per_epoch", "device_s_ratio",
              "device_s_ratio_with_build_1_epoch", f"device_s_ratio_with_build_{args.epochs_reused}_epochs",
              "cache_wide_samples_per_s", "speedup_wide", "cache_wide_wall_s"):
        if k not in row:
            continue
        v = row[k]
        print(f"{k:<34}{v:>16.4f}" if isinstance(v, float) else f"{k:<34}{v!s:>16}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
