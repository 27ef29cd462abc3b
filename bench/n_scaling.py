"""Training throughput against ensemble size: SKD over N teachers vs single-teacher KD vs no KD vs `average`.

Run:  python bench/n_scaling.py [-c configs/sst2.yaml] [--ns 1,2,4,8] [--steps 100] [--teacher-layers 1]

Stochastic KD (SKDBERT, Ding et al., AAAI 2023) asks ONE teacher per step, so its cost should not depend
on how many teachers the ensemble holds; `average` asks all of them each step (in parallel: one request
per teacher actor, sent at once) and grows with N once their summed forward work outruns the cores they
have. Targets (#12): SKD's training throughput >= 0.95x single-teacher KD and >= 0.90x no-KD for every N.

Teachers: N copies of the bottom `--teacher-layers` layers of the packaged MiniLM with a fresh head
(seeded, not fine-tuned: time does not depend on how well they were trained), written under
`--out/teachers` with their manifest, as `skd teachers prepare` would. They share one logical CPU
(`teachers.num_cpus = 1/N`, one thread each) and the student worker has the other (`ray.cpus_per_worker 1`):
on the 2-core machine, "teachers on their own core". Each variant is one `skd distill` command on the
config's data and 2-layer student, `--steps` steps, one evaluation at the end; throughput = total samples
/ training seconds (`time/train_s`: the step loop without evaluations and checkpoints), read back from
the run's MLflow metrics. Run nothing else on the machine meanwhile. Prints a table and one JSON line.
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


def make_teachers(folder: Path, n: int, layers: int) -> list[dict[str, str]]:
    """Write `n` MiniLM-derived teachers (bottom `layers` layers, seeded random head) and their manifest into
    `folder` (kept when already there). Returns the config's `teachers.members` entries."""
    import torch

    from actors.manifest import TeacherInfo, write_manifest
    from actors.models import count_parameters, load_classifier, load_tokenizer, vocab_fingerprint

    tok = load_tokenizer("minilm")
    infos = []
    for i in range(n):
        path = folder / f"t{i}"
        if not (path / "config.json").exists():
            torch.manual_seed(i + 1)
            model = load_classifier("minilm", 2, layers)
            model.save_pretrained(path)
            tok.save_pretrained(path)
        model = load_classifier(str(path), 2)
        infos.append(TeacherInfo(name=f"t{i}", checkpoint=str(path.resolve()), num_layers=layers,
                                 hidden_size=model.config.hidden_size, parameters=count_parameters(model),
                                 dev_metric=0.5, metric="accuracy", vocab=vocab_fingerprint(tok), num_labels=2,
                                 task="sst2", mlflow_run_id=""))
    write_manifest(folder / "manifest.json", infos)
    return [{"name": i.name, "init": i.checkpoint} for i in infos]


def run_variant(args, base: dict, members: list[dict[str, str]], n: int, strategy: str, out: Path) -> dict:
    """One `skd distill` of `strategy` over the first `n` teachers; its training throughput from MLflow."""
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator.config.load import load_config

    cfg = json.loads(json.dumps(base))
    cfg["teachers"] = {**{k: v for k, v in cfg["teachers"].items() if k not in ("members", "finetune")},
                       "members": members[:n], "manifest": str((out / "teachers" / "manifest.json").resolve()),
                       "num_cpus": round(1.0 / n, 4), "threads": 1}
    cfg["output_dir"] = str(out)
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{(out / 'mlflow.db').resolve()}", "experiment": "skd-n-scaling"}
    cfg["ray"] = {**cfg.get("ray", {}), "num_workers": 1, "cpus_per_worker": 1}
    cfg["distill"] = {**cfg["distill"], "strategy": strategy, "max_steps": args.steps, "eval_every": args.steps,
                      "distribution": {"family": "uniform", "eps": 0.0}}
    cfg.pop("tune", None)
    path = out / f"config-{strategy.replace(':', '-')}-{n}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    name = f"{strategy.replace(':', '-')}-n{n}-{time.strftime('%H%M%S')}"
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "skd"), "distill", "-c", str(path),
                           "--set", f"mlflow.run_name={name}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"skd distill ({strategy}, N={n}) failed: {proc.stdout[-2000:]} {proc.stderr[-3000:]}")
    loaded = load_config(str(path), [])
    client = MlflowClient(loaded.tracking_uri())
    exp = client.get_experiment_by_name(loaded.experiment_name())
    run = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'", max_results=1)[0]
    m = run.data.metrics
    samples = args.steps * loaded.distill.batch_size * loaded.ray.num_workers
    waits = [x.value for x in client.get_metric_history(run.info.run_id, "train/knowledge_wait_s")]
    return {"strategy": strategy, "n": n, "samples": samples, "train_s": round(m["time/train_s"], 2),
            "samples_per_s": round(samples / m["time/train_s"], 2), "wall_s": round(wall, 1),
            "wait_ms_per_step": round(1000 * sum(waits) / max(len(waits), 1), 2), "run_id": run.info.run_id}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="configs/sst2.yaml")
    ap.add_argument("--ns", default="1,2,4,8", help="ensemble sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--teacher-layers", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-n-scaling")
    args = ap.parse_args()

    import yaml
    from rich.console import Console
    from rich.table import Table

    ns = sorted({int(x) for x in args.ns.split(",")})
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / args.config).read_text())
    members = make_teachers(out / "teachers", max(ns), args.teacher_layers)
    rows = [run_variant(args, base, members, 1, "no-kd", out), run_variant(args, base, members, 1, "single:t0", out)]
    rows += [run_variant(args, base, members, n, "skd", out) for n in ns]
    rows += [run_variant(args, base, members, n, "average", out) for n in ns if n > 1]
    nokd, single = rows[0]["samples_per_s"], rows[1]["samples_per_s"]
    for r in rows:
        r["over_single"], r["over_no_kd"] = round(r["samples_per_s"] / single, 3), round(r["samples_per_s"] / nokd, 3)

    table = Table(title=f"training throughput vs ensemble size: {args.steps} steps of {base['distill']['batch_size']}, "
                        f"2-layer student, teachers = MiniLM bottom {args.teacher_layers} layer(s), sharing one core")
    for col in ("run", "N", "samples/s", "/ single KD  [skd >= 0.95]", "/ no KD  [skd >= 0.90]",
                "knowledge wait ms/step", "whole command s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["strategy"], str(r["n"]), f"{r['samples_per_s']:.1f}", f"{r['over_single']:.3f}",
                      f"{r['over_no_kd']:.3f}", f"{r['wait_ms_per_step']:.1f}", f"{r['wall_s']:.0f}")
    Console(width=160).print(table)
    skd = [r for r in rows if r["strategy"] == "skd"]
    print(json.dumps({"bench": "n_scaling", "config": args.config, "steps": args.steps,
                      "teacher_layers": args.teacher_layers, "rows": rows,
                      "skd_min_over_single": min(r["over_single"] for r in skd),
                      "skd_min_over_no_kd": min(r["over_no_kd"] for r in skd)}))


if __name__ == "__main__":
    main()
