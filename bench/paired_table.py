"""The table of a finished `skd compare` (e.g. bench/sampling_evidence.sh): each method's dev metric over
seeds, its paired difference from one or more baselines with a 95% bootstrap interval over seeds and dev
rows (`orchestrator.commands.compare.paired_bootstrap`), retention and wall time, from the saved students and the
MLflow store, so any method can be the baseline after the runs.

    python bench/paired_table.py -c configs/sst2.yaml --out runs/evidence/sst2 --baseline no-kd \\
        --baseline skd-uniform

Methods are the run-name prefixes of `<out>/students/<prefix>-s<seed>` (default: every one saved for the
first seed, in the evidence's order). `--out` may be repeated: comparisons run side by side into several
output folders (each with its own `mlflow.db`, since two processes writing one SQLite store can lock it) are
read as one. Prints one JSON line per method, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.manifest import read_manifest  # noqa: E402
from actors.models import load_classifier  # noqa: E402
from orchestrator.commands.compare import paired_bootstrap  # noqa: E402
from orchestrator.config.load import load_config  # noqa: E402
from orchestrator.driver.inputs import prepare_inputs  # noqa: E402
from orchestrator.common.metrics import glue_metrics  # noqa: E402
from orchestrator.common.evaluation import predict  # noqa: E402

ORDER = ["no-kd", "single-", "average", "skd-uniform", "skd-teacher-rank", "skd-student-rank",
         "skd-capacity-gaussian", "skd-adaptive"]


def found_methods(students: Path, seed: int) -> list[str]:
    """Run-name prefixes with a saved student for `seed` (`<prefix>-s<seed>`), in the evidence's order (no-kd,
    the single teacher whichever it is, average, then the SKD families), others after them by name."""
    names = [d.name[: -len(f"-s{seed}")] for d in students.glob(f"*-s{seed}") if d.is_dir()]

    def key(m: str) -> tuple[int, str]:
        return next((i for i, o in enumerate(ORDER) if m == o or (o.endswith("-") and m.startswith(o))),
                    len(ORDER)), m
    return sorted(names, key=key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--out", type=Path, action="append", required=True,
                        help="The compare's output_dir (students/, mlflow.db); repeat it for comparisons run "
                             "side by side into several folders (the first one's teachers manifest is used "
                             "unless --teachers).")
    parser.add_argument("--teachers", type=Path,
                        help="Teachers manifest for retention (default: <first --out>/teachers/manifest.json).")
    parser.add_argument("--method", action="append", help="Run-name prefixes (default: every one saved).")
    parser.add_argument("--baseline", action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    outs = [o.resolve() for o in args.out]
    cfg = load_config(args.config, [f"output_dir={outs[0]}"])
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    spec, labels = inputs.spec, inputs.dev.labels
    methods = args.method or list(dict.fromkeys(m for o in outs for s in args.seeds
                                                for m in found_methods(o / "students", s)))
    best = max(t.dev_metric for t in read_manifest(args.teachers or outs[0] / "teachers" / "manifest.json"))

    from mlflow.tracking import MlflowClient

    def home(m: str, s: int) -> Path:
        """The first output folder holding method `m`'s student of seed `s` (seeds may sit in folders apart)."""
        return next((o for o in outs if (o / "students" / f"{m}-s{s}").is_dir()), outs[0])

    def finished_runs(m: str, s: int) -> list:
        client = MlflowClient(f"sqlite:///{home(m, s)}/mlflow.db")
        exp = client.get_experiment_by_name(cfg.experiment_name())
        return [] if exp is None else client.search_runs(
            [exp.experiment_id], f"attributes.run_name = '{m}-s{s}' and attributes.status = 'FINISHED'")

    def metric(p: np.ndarray, y: np.ndarray) -> float:
        return glue_metrics(spec, p, y)[spec.metric]

    preds, wall = {}, {}
    for m in methods:
        preds[m] = [predict(load_classifier(str(home(m, s) / "students" / f"{m}-s{s}"), spec.num_labels,
                                            regression=spec.is_regression), inputs.dev, inputs.pad_id, 256)
                    for s in args.seeds]
        runs = [finished_runs(m, s) for s in args.seeds]
        wall[m] = [r[0].data.metrics.get("wall_s", float("nan")) for r in runs if r]
    rows = []
    for m in methods:
        scores = [metric(p, labels) for p in preds[m]]
        row = {"task": cfg.task, "method": m, "metric": spec.metric, "seeds": args.seeds, "per_seed": scores,
               "mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)),
               "retention": float(np.mean(scores)) / best, "wall_s": float(np.mean(wall[m])), "paired": {}}
        for b in args.baseline:
            if b != m and b in preds:
                d, lo, hi = paired_bootstrap(preds[m], preds[b], labels, metric, args.resamples)
                row["paired"][b] = {"delta": d, "low": lo, "high": hi, "real": lo > 0 or hi < 0}
        rows.append(row)
        print(json.dumps(row))
    head = ["method", f"dev {spec.metric} (mean ± std)", "per seed"] + [f"Δ vs {b} [95% CI]" for b in args.baseline]
    print("\n| " + " | ".join(head + ["retention", "wall s"]) + " |")
    print("|" + "---|" * (len(head) + 2))
    for r in rows:
        cells = [r["method"], f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
                 ", ".join(f"{100 * v:.2f}" for v in r["per_seed"])]
        for b in args.baseline:
            p = r["paired"].get(b)
            cells.append("baseline" if b == r["method"] else "-" if p is None else
                         f"{100 * p['delta']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"
                         + (" **real**" if p["real"] else ""))
        print("| " + " | ".join(cells + [f"{100 * r['retention']:.1f}%", f"{r['wall_s']:.0f}"]) + " |")


if __name__ == "__main__":
    main()
