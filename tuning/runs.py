"""`skd runs`: campaigns, their trials and distill runs from an MLflow store, in the terminal."""

from __future__ import annotations

import datetime as dt

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from orchestrator import tracking


def _when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else "-"


def list_runs(tracking_uri: str, experiment: str, console: Console, limit: int = 50) -> int:
    """Print the experiment's campaigns (with nested trials) and other runs; returns the number of runs shown.

    Raises:
        SkdError: the experiment does not exist in the store.
    """
    from actors.errors import SkdError

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise SkdError(f"no experiment {experiment!r} in {tracking.mask(tracking_uri)}; experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    children: dict[str, list] = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(r)
    table = Table(title=f"MLflow experiment {experiment} ({tracking.mask(tracking_uri)})")
    for col in ("run", "kind", "status", "started", "dev metric", "retention", "GSNR", "run id"):
        table.add_column(col)
    shown = 0
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") or shown >= limit:
            continue
        shown += 1
        _row(table, r, "")
        for c in sorted(children.get(r.info.run_id, []), key=lambda c: c.info.start_time or 0):
            _row(table, c, "  └ ")
    console.print(table)
    console.print(f"browse: {tracking.browse_hint(tracking_uri, exp.experiment_id)}", highlight=False, markup=False,
                  soft_wrap=True)
    return shown


def _row(table: Table, r, prefix: str) -> None:
    m = r.data.metrics
    dev = next((f"{k[4:]} {v:.4f}" for k, v in m.items() if k.startswith("dev/") and k != "dev/retention"), "")
    best = next((f"best {k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("best/")), "")
    table.add_row(prefix + (r.info.run_name or ""), r.data.tags.get("skd.kind", ""), r.info.status,
                  _when(r.info.start_time), dev or best, f"{m['dev/retention']:.3f}" if "dev/retention" in m else "",
                  f"{m['gsnr/all/mean']:.3g}" if "gsnr/all/mean" in m else "", r.info.run_id[:12])
