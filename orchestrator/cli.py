"""The `skd` command line: teachers prepare, distill, evaluate.

Every command validates its config before touching Ray; user errors print one readable message and
exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator import runtime  # noqa: F401  (sets quiet Ray/MLflow environment defaults first)
from orchestrator.config import DataConfig, MlflowConfig, load_config
from actors.errors import SkdError

app = typer.Typer(help="Stochastic knowledge distillation (SKDBERT) of BERT-style models on Ray, tracked in MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
teachers_app = typer.Typer(help="Prepare the teacher ensemble.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")
cache_app = typer.Typer(help="The offline knowledge cache (train without loading teachers).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole tables

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="YAML config, e.g. configs/sst2.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting: --set distill.alpha=0.3 (repeatable).")]


def _fail(exc: SkdError) -> None:
    console.print(Text("error: ", style="bold red") + Text(str(exc)))  # Text: no markup parsing of "[t4]"
    raise typer.Exit(2)


@teachers_app.command("prepare")
def teachers_prepare(config: ConfigOpt, set_: SetOpt = None,
                     force: Annotated[bool, typer.Option(help="Retrain teachers already in the manifest.")] = False):
    """Fine-tune every teacher in `teachers.members`, evaluate on dev, and write the teachers manifest
    (one MLflow run per teacher). Teachers already prepared are reused."""
    from orchestrator.teachers import prepare_teachers

    try:
        cfg = load_config(config, set_)
        teachers = prepare_teachers(cfg, force=force)
    except SkdError as exc:
        _fail(exc)
    table = Table(title=f"teachers for {cfg.task} ({cfg.manifest_path()})")
    for col in ("name", "layers", "hidden", "parameters", f"dev {teachers[0].metric}", "checkpoint"):
        table.add_column(col)
    for t in teachers:
        table.add_row(t.name, str(t.num_layers), str(t.hidden_size), f"{t.parameters / 1e6:.1f}M",
                      f"{t.dev_metric:.4f}", t.checkpoint)
    console.print(table)


@app.command()
def distill(config: ConfigOpt, set_: SetOpt = None,
            resume: Annotated[bool, typer.Option(help="Continue the newest unfinished run of this config.")] = False,
            resume_from: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint folder.")] = None,
            stop_after: Annotated[Optional[int], typer.Option(
                help="Stop after N steps, leaving the run resumable (for preemptible slots).")] = None,
            knowledge: Annotated[Optional[str], typer.Option(
                help="online (teacher actors) or cache:PATH (a `skd cache build` folder: no teachers loaded). "
                     "Default: distill.knowledge.source.")] = None):
    """Distil a student from the teacher ensemble: each step ONE teacher, drawn from the sampling
    distribution, serves soft labels and, if configured, hidden states / attentions (strategies: skd,
    no-kd, average, single:<teacher>)."""
    from orchestrator.distill import run_distill
    from orchestrator.tracking import ui_command

    try:
        extra = [f"distill.knowledge.source={knowledge}"] if knowledge else []
        cfg = load_config(config, [*(set_ or []), *extra])
        if resume_from is not None and not (resume_from / "trainer_state.json").is_file():
            raise SkdError(f"--resume-from {resume_from}: not a checkpoint folder (no trainer_state.json)")
        result = run_distill(cfg, resume=resume, resume_from=str(resume_from) if resume_from else None,
                             stop_after=stop_after)
    except SkdError as exc:
        _fail(exc)
    table = Table(title=f"skd distill: {cfg.task}, run {result.run_name} ({result.status})")
    table.add_column("quantity")
    table.add_column("value")
    for k, v in result.dev.items():
        table.add_row(f"dev {k}", f"{v:.4f}")
    table.add_row("retention (student / best teacher)", "-" if result.retention is None else f"{result.retention:.4f}")
    table.add_row("steps", str(result.steps))
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    table.add_row("throughput", f"{result.samples_per_s:.1f} samples/s")
    for name, n in result.counts.items():
        table.add_row(f"samples from {name}", str(n))
    table.add_row("student", str(result.model_dir or "-"))
    table.add_row("MLflow run", result.run_id)
    console.print(table)
    if result.status == "KILLED":
        console.print(f"stopped early; continue with: skd distill -c {config} --resume")
    console.print(f"browse runs: [bold]{ui_command(cfg.tracking_uri())}[/]", highlight=False)


@cache_app.command("build")
def cache_build(config: ConfigOpt, set_: SetOpt = None,
                out: Annotated[Optional[Path], typer.Option(
                    help="Cache folder (default: the path of distill.knowledge.source, else "
                         "<output_dir>/knowledge-cache).")] = None,
                overwrite: Annotated[bool, typer.Option(
                    help="Delete a cache built for another setup in that folder and build afresh.")] = False):
    """Run every teacher over the training set once and store its soft labels and selected hidden-state
    knowledge (distill.knowledge) as memory-mapped safetensors shards. An interrupted build resumes."""
    from orchestrator.knowledge_cache import build_cache

    try:
        cfg = load_config(config, set_)
        summary = build_cache(cfg, out, overwrite=overwrite)
    except SkdError as exc:
        _fail(exc)
    table = Table(title=f"knowledge cache {summary['path']}")
    table.add_column("quantity")
    table.add_column("value")
    table.add_row("teachers", ", ".join(summary["teachers"]))
    table.add_row("examples", str(summary.get("num_examples", "-")))
    table.add_row("bytes per example", f"{summary['bytes_per_example']:,.0f}")
    table.add_row("total size", f"{summary['total_bytes'] / 2 ** 20:,.2f} MiB")
    fraction = summary.get("hsk_fraction")
    table.add_row("fraction of full HSK kept", "-" if fraction is None else f"{100 * fraction:.3f} %")
    console.print(table)
    console.print(f"train from it: skd distill -c {config} --knowledge cache:{summary['path']}", highlight=False)


@app.command()
def compare(config: ConfigOpt, set_: SetOpt = None,
            variant: Annotated[list[str], typer.Option(
                help="no-kd | average | single:<teacher> | skd:<family> (repeatable).")] = ("no-kd", "skd:uniform"),
            seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")] = (0, 1, 2)):
    """Run several strategies x seeds on ONE shared teacher pool and print mean and spread per strategy."""
    from orchestrator.compare import run_comparison

    try:
        cfg = load_config(config, set_)
        summaries = run_comparison(cfg, str(config), list(variant), list(seed), list(set_ or []))
    except SkdError as exc:
        _fail(exc)
    metric = summaries[0].metric
    table = Table(title=f"skd compare: {cfg.task}, seeds {list(seed)} (mean ± sample std)")
    for col in ("variant", f"dev {metric}", "retention", "wall s", "samples/s"):
        table.add_column(col)
    for v in summaries:
        fmt = lambda ms, scale=1.0, d=2: f"{ms[0] * scale:.{d}f} ± {ms[1] * scale:.{d}f}"  # noqa: E731
        table.add_row(v.variant, fmt(v.dev, 100), fmt(v.retention, 100), fmt(v.wall_s, d=1), fmt(v.samples_per_s, d=1))
    console.print(table)
    for v in summaries:
        console.print(f"{v.variant}: " + ", ".join(f"seed run {r.run_id[:8]} {metric}={r.dev[metric]:.4f}"
                                                    for r in v.runs), highlight=False)


@app.command()
def tune(config: ConfigOpt, set_: SetOpt = None,
         num_samples: Annotated[Optional[int], typer.Option(help="Trials (default: tune.num_samples).")] = None,
         scheduler: Annotated[Optional[str], typer.Option(help="asha | fifo | pbt (default: tune.scheduler).")] = None,
         search: Annotated[Optional[str], typer.Option(help="random | optuna (default: tune.search).")] = None,
         max_concurrent: Annotated[Optional[int], typer.Option(help="Trials at once (default: tune.max_concurrent).")] = None,
         resume: Annotated[bool, typer.Option(help="Continue the newest unfinished campaign of this name.")] = False):
    """Ray Tune campaign over sampling distributions and KD settings: one shared teacher pool, a parent
    MLflow run per campaign and a nested run per trial."""
    from orchestrator.tracking import ui_command
    from tuning.campaign import run_campaign

    extra = [f"tune.{k}={v}" for k, v in (("num_samples", num_samples), ("scheduler", scheduler),
                                          ("search", search), ("max_concurrent", max_concurrent)) if v is not None]
    try:
        cfg = load_config(config, [*(set_ or []), *extra])
        result = run_campaign(cfg, resume=resume)
    except SkdError as exc:
        _fail(exc)
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
                  f"(id {result.experiment_id}); browse: [bold]{ui_command(cfg.tracking_uri())}[/]", highlight=False)


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
        _fail(exc)


@app.command()
def evaluate(model_dir: Annotated[Path, typer.Argument(help="A save_pretrained folder.")],
             task: Annotated[str, typer.Option(help="GLUE task name (cola, sst2, mrpc, stsb, ...).")],
             config: Annotated[Optional[Path], typer.Option("-c", "--config", help="Take data settings from this config.")] = None,
             glue_dir: Annotated[Optional[Path], typer.Option(help="GLUE folder (default: $GLUE_DIR, ../shared/data/glue).")] = None,
             max_length: int = 128, batch_size: int = 128):
    """The task's GLUE metric on the dev set for any saved model."""
    from orchestrator.data import encode, load_split, task_spec
    from actors.models import load_classifier, load_tokenizer
    from orchestrator.train_loop import evaluate as run_eval

    try:
        if not (model_dir / "config.json").is_file():
            raise SkdError(f"MODEL_DIR {model_dir} is not a save_pretrained folder (no config.json)")
        data = load_config(config).data if config else DataConfig(glue_dir=glue_dir, max_length=max_length)
        spec = task_spec(task.lower().replace("-", ""), data)
        dev = load_split(spec.name, data, "dev")
        tok = load_tokenizer(str(model_dir))
        model = load_classifier(str(model_dir), spec.num_labels, regression=spec.is_regression)
        metrics = run_eval(model, encode(dev, tok, data.max_length), spec, int(tok.pad_token_id or 0), batch_size)
    except SkdError as exc:
        _fail(exc)
    table = Table(title=f"{model_dir} on {spec.name} dev ({len(dev)} rows)")
    table.add_column("metric")
    table.add_column("value")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)


def main() -> None:
    """Console entry point (`skd`)."""
    app(prog_name="skd")


if __name__ == "__main__":
    sys.exit(main())
