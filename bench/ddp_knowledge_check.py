"""Check (not a timing): hidden-state, attention and [CLS] knowledge with a data-parallel student.

Run:  python bench/ddp_knowledge_check.py      (about 3 minutes on 2 cores)

Two tiny random teachers of different depth AND width (4 x 32 with 2 heads, 2 x 48 with 3 heads), a
2-layer student trained by 2 Ray Train workers for 8 steps with the stacked schedule (4 IR steps, then
soft labels), once online (teacher actors select the knowledge) and once from a cache built for the same
request. Prints the hidden-state loss per IR step of both runs; they must be equal: both workers get
their shard's knowledge from the sampled teacher, and the cache holds exactly what the teachers serve.
Exits 1 if a run fails or the losses differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.driver import runtime  # noqa: E402,F401  (Ray / MLflow environment defaults)


def main() -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.config.load import load_config
    from orchestrator.commands.distill import run_distill
    from orchestrator.commands.cache_build import build_cache
    from tests.conftest import tiny_raw
    from tests.test_knowledge_e2e import KNOWLEDGE
    from tests.tiny import make_tiny_bert, make_tiny_teachers

    tmp = Path(tempfile.mkdtemp(prefix="skd-ddp-"))
    student = make_tiny_bert(tmp / "student")
    raw = tiny_raw(tmp, student, student={"init": str(student), "num_layers": 2},
                   distill={"max_steps": 8, "eval_every": 8, "log_every": 1, "knowledge": KNOWLEDGE},
                   ray={"num_workers": 2, "cpus_per_worker": 1, "num_cpus": 3})
    raw["teachers"] = make_tiny_teachers(tmp, {"ta": (4, 32, 2), "tb": (2, 48, 3)})[1]
    summary = build_cache(load_config(None, base=raw))
    client = MlflowClient(load_config(None, base=raw).tracking_uri())
    losses = {}
    for source in ("online", f"cache:{summary['path']}"):
        name = source.split(":")[0]
        res = run_distill(load_config(None, [f"distill.knowledge.source={source}", f"mlflow.run_name=ddp-{name}"],
                                      base=raw), register_as=None)
        losses[name] = {m.step: m.value for m in client.get_metric_history(res.run_id, "train/loss_hidden")}
        print(f"{name}: {res.status}, {res.steps} steps, 2 workers, train/loss_hidden "
              f"{ {k: round(v, 5) for k, v in sorted(losses[name].items())} }", flush=True)
        if res.status != "FINISHED":
            return 1
    same = losses["online"] == losses["cache"] and len(losses["online"]) == 4
    print("online == cache:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
