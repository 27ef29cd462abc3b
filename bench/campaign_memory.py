"""Peak memory: a tuning campaign with N concurrent trials (one shared teacher pool) vs N independent
`skd distill` runs (each loads its own teachers), side by side in one run.

Run:  python bench/campaign_memory.py -c configs/sst2.yaml [--trials 4] [--steps 20]

Memory is the peak over time of the summed PSS (proportional set size: shared pages split between the
processes that map them, so torch's libraries are not counted N times) of every process started by the
command, sampled every 0.5 s from /proc/<pid>/smaps_rollup. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root: int) -> set[int]:
    """root and every process whose parent chain reaches it, plus Ray processes started by it (new sessions)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        frontier.extend(kids)
    return out


def peak_pss(cmds: list[list[str]], env: dict[str, str], logs: Path) -> tuple[float, float]:
    """Run the commands at once; return (peak summed PSS in GiB, wall seconds)."""
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT)
             for i, c in enumerate(cmds)]
    peak, stop = 0, threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            pids = set().union(*(descendants(p.pid) for p in procs))
            peak = max(peak, sum(pss_bytes(p) for p in pids))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    codes = [p.wait() for p in procs]
    stop.set()
    t.join()
    if any(codes):
        raise SystemExit(f"a command failed ({codes}); see {logs}")
    return peak / 2**30, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="configs/sst2.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    skd = str(Path(sys.executable).parent / "skd")
    logs = Path(os.environ.get("SKD_BENCH_DIR", "/tmp/skd-bench")) / "campaign_memory"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["-c", args.config, "--set", f"distill.max_steps={args.steps}", "--set", f"distill.eval_every={args.steps}",
              "--set", "data.max_dev_samples=200", "--set", f"ray.num_cpus={2 * args.trials}",
              "--set", "mlflow.experiment=skd-bench-memory"]
    env = dict(os.environ)
    campaign, campaign_s = peak_pss([[skd, "tune", *common, "--num-samples", str(args.trials), "--max-concurrent",
                                      str(args.trials), "--scheduler", "fifo",
                                      "--set", "mlflow.run_name=memory-campaign"]], env, logs / "campaign")
    independent, independent_s = peak_pss(
        [[skd, "distill", *common, "--set", f"distill.seed={i}", "--set", f"mlflow.run_name=memory-independent-{i}"]
         for i in range(args.trials)], env, logs / "independent")
    print(f"| setup | peak PSS (GiB) | wall (s) |\n|---|---|---|\n"
          f"| campaign, {args.trials} concurrent trials, one teacher pool | {campaign:.2f} | {campaign_s:.0f} |\n"
          f"| {args.trials} independent distill runs | {independent:.2f} | {independent_s:.0f} |")
    print(json.dumps({"bench": "campaign_memory", "trials": args.trials, "steps": args.steps,
                      "campaign_peak_gib": round(campaign, 3), "independent_peak_gib": round(independent, 3),
                      "ratio_independent_over_campaign": round(independent / campaign, 3),
                      "campaign_wall_s": round(campaign_s, 1), "independent_wall_s": round(independent_s, 1)}))


if __name__ == "__main__":
    main()
