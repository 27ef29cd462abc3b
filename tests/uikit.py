"""The MLflow UI as a user opens it (`mlflow ui`, the command skd prints, on 127.0.0.1) and what it must
show for skd's runs, read through MLflow's REST API: shared by the tests and `bench/ui_check.py`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def start_mlflow_ui(store_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui --backend-store-uri STORE --host 127.0.0.1 --port PORT`, answering /health on return.

    Raises:
        RuntimeError: it did not come up within 240 s (the end of its log is in the message); it takes 10-20 s
            on an idle 2-core machine and minutes when training runs share the cores.
    """
    from tests.faultkit import wait_until_healthy

    out = open(log, "a")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return wait_until_healthy(proc, port, log, 240)


def rest(base: str, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` as JSON to) MLflow's REST API at `base` + /api/2.0/mlflow/ + `path`."""
    url = f"{base}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:  # slow first answers on a busy machine
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def ui_problems(base: str, experiment: str, registered: set[str] = frozenset()) -> list[str]:
    """What the UI at `base` would show wrongly for skd's experiment `experiment`, as readable problems ([]:
    none): the experiment kind tag; every distill or teacher run with its training and dev data as dataset
    inputs; every distill run that learned from teachers tagged with their runs and described; no
    registered model other than `registered` (skd registers only on request)."""
    found = []
    exp = rest(base, "experiments/get-by-name?experiment_name=" + urllib.parse.quote(experiment))["experiment"]
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    if tags.get("mlflow.experimentKind") != "custom_model_development":
        found.append(f"experiment {experiment}: mlflow.experimentKind is {tags.get('mlflow.experimentKind')!r}")
    runs = [run for run in rest(base, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                      "max_results": 1000}).get("runs", [])
            if any(t["key"] == "skd.kind" and t["value"] in ("distill", "teacher") for t in run["data"].get("tags", []))]
    if not runs:
        found.append(f"experiment {experiment}: no distill or teacher runs")
    for run in runs:
        name, rtags = run["info"]["run_name"], {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        datasets = {d["dataset"]["name"] for d in run.get("inputs", {}).get("dataset_inputs", [])}
        task = rtags.get("skd.task")
        if datasets != {f"{task}-train", f"{task}-dev"}:
            found.append(f"run {name}: dataset inputs {sorted(datasets)}")
        if rtags.get("skd.kind") == "distill" and rtags.get("skd.strategy") != "no-kd":
            if "skd.teacher_runs" not in rtags:
                found.append(f"run {name}: no skd.teacher_runs tag")
            if "| teacher |" not in rtags.get("mlflow.note.content", ""):
                found.append(f"run {name}: no teachers table in its description")
    models = {m["name"] for m in rest(base, "registered-models/search").get("registered_models", [])}
    if models - set(registered):
        found.append(f"registered models nobody asked for: {sorted(models - set(registered))}")
    return found
