"""The fingerprint of one finished skd run, to show that a change left a run's behaviour alone: the teacher
drawn at every step (MLflow metric `train/teacher`, one value per step, in step order) as its length,
per-teacher counts, first 20 draws and SHA-256, and the run's final dev metrics.

    .venv/bin/python bench/run_fingerprint.py --tracking-uri sqlite:///mlflow.db --experiment skd-demo \
        --run skd-uniform-s0

Prints one JSON line. Exit 2 when the run or its `train/teacher` history is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient  # noqa: E402


def fingerprint(client: MlflowClient, run_id: str) -> dict:
    """{"steps", "counts" {teacher index: steps}, "first_20", "sha256" of the comma-joined sequence, "dev"}."""
    history = sorted(client.get_metric_history(run_id, "train/teacher"), key=lambda m: (m.step, m.timestamp))
    sequence = [int(m.value) for m in history]
    counts: dict[int, int] = {}
    for k in sequence:
        counts[k] = counts.get(k, 0) + 1
    metrics = client.get_run(run_id).data.metrics
    return {"steps": len(sequence), "counts": dict(sorted(counts.items())), "first_20": sequence[:20],
            "sha256": hashlib.sha256(",".join(map(str, sequence)).encode()).hexdigest(),
            "dev": {k: round(v, 6) for k, v in sorted(metrics.items()) if k.startswith("dev/")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="skd-demo")
    ap.add_argument("--run", default="skd-uniform-s0", help="run name (the newest run of that name is read)")
    args = ap.parse_args()
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], f"attributes.run_name = '{args.run}'",
                                                     order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        print(f"no run {args.run!r} in experiment {args.experiment!r} of {args.tracking_uri}", file=sys.stderr)
        return 2
    out = fingerprint(client, runs[0].info.run_id)
    if not out["steps"]:
        print(f"run {args.run!r} has no train/teacher history", file=sys.stderr)
        return 2
    print(json.dumps({"run": args.run, "run_id": runs[0].info.run_id, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
