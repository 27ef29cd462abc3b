"""The `skd` console entry point: the orchestrator's commands plus the campaign commands `tune` and `runs`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from actors.errors import SkdError
from orchestrator.commands.cli import ConfigOpt, SetOpt, app, console, fail
from orchestrator.config import MlflowConfig
from orchestrator.config.load import load_config


@app.command()
def tune(config: ConfigOpt, set_: SetOpt = None,
         num_samples: Annotated[Optional[int], typer.Option(help="Trials (default: tune.num_samples).")] = None,
         scheduler: Annotated[Optional[str], typer.Option(help="asha | fifo | pbt (default: tune.scheduler).")] = None,
         search: Annotated[Optional[str], typer.Option(help="random | optuna (default: tune.search).")] = None,
         max_concurrent: Annotated[Optional[int], typer.Option(help="Trials at once (default: tune.max_concurrent).")] = None,
         resume: Annotated[bool, typer.Option(help="Continue the newest unfinished campaign of this name.")] = False):
    """Ray Tune campaign over sampling distributions and KD settings: one shared teacher pool, a parent
    MLflow run per campaign and a nested run per trial."""
    from orchestrator.tracking import browse_hint
    from tuning.campaign import run_campaign

    extra = [f"tune.{k}={v}" for k, v in (("num_samples", num_samples), ("scheduler", scheduler),
                                          ("search", search), ("max_concurrent", max_concurrent)) if v is not None]
    try:
        cfg = load_config(config, [*(set_ or []), *extra])
        result = run_campaign(cfg, resume=resume)
    except SkdError as exc:
        fail(exc)
    ranked = sorted([t for t in result.trials if t["metric"] is not None], key=lambda t: -t["metric"])
    if cfg.tune is not None and cfg.tune.mode == "min":
        ranked.reverse()
    table = Table(title=f"skd tune: {cfg.task}, {len(result.trials)} trials, {result.wall_s:.0f} s (best first)")
    names = sorted({k for t in result.trials for k in t if k.startswith("param.")})
    for col in ("trial", "status", result.metric, "evals", "GSNR", *[n[6:] for n in names]):
        table.add_column(col)
    for t in ranked[:10]:
        cells = [f"{t[n]:.4g}" if isinstance(t.get(n), float) else str(t.get(n)) for n in names]
        table.add_row(t["trial_id"], t["status"], f"{t['metric']:.4f}", str(t["evaluations"]),
                      "-" if t["gsnr_mean"] is None else f"{t['gsnr_mean']:.3g}", *cells)
    console.print(table)
    console.print(f"campaign run {result.parent_run_id} in experiment {cfg.experiment_name()} "
                  f"(id {result.experiment_id}); browse: "
                  f"{browse_hint(cfg.tracking_uri(), result.experiment_id, result.parent_run_id)}",
                  highlight=False, markup=False, soft_wrap=True)


@app.command()
def runs(config: Annotated[Optional[Path], typer.Option("-c", "--config", help="Take the store and experiment from this config.")] = None,
         tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: sqlite:///mlflow.db).")] = None,
         experiment: Annotated[Optional[str], typer.Option(help="Experiment name (default: the config's).")] = None,
         limit: int = 50):
    """List campaigns (with their trials) and distill runs from the MLflow store, newest first."""
    from tuning.runs import list_runs

    try:
        cfg = load_config(config) if config else None
        uri = tracking_uri or (cfg.tracking_uri() if cfg else MlflowConfig().resolved_uri())
        exp = experiment or (cfg.experiment_name() if cfg else None)
        if exp is None:
            raise SkdError("skd runs: pass -c CONFIG or --experiment NAME")
        list_runs(uri, exp, console, limit)
    except SkdError as exc:
        fail(exc)


def _terminate(signum, frame) -> None:
    """SIGTERM as Ctrl-C: clean-up runs (MLflow run ended KILLED, teachers and local Ray released)."""
    raise KeyboardInterrupt


OPTIONAL_VALUES = {"--register": "default"}
"""Options whose value may be left out (`skd distill --register` registers as skd-<task>-student), and the
value they then take: typer has no optional-value options, so `main` fills the value in."""


def fill_optional_values(args: list[str]) -> list[str]:
    """`args` with the value of an `OPTIONAL_VALUES` option filled in where it is followed by nothing or by
    another option (`--register --set x=1` -> `--register default --set x=1`)."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def main() -> None:
    """Console entry point (`skd`)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app(args=fill_optional_values(sys.argv[1:]), prog_name="skd")


if __name__ == "__main__":
    sys.exit(main())
