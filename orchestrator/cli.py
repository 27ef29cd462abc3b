"""The `skd` command line, orchestrator part: teachers prepare, distill, cache build, compare, evaluate.

`tuning.cli` adds the campaign commands (`tune`, `runs`) to this app and is the console entry point, so
the layers stay one-way (tuning imports orchestrator, never the reverse).

Every command validates its config before touching Ray; user errors print one readable message and
exit with status 2.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from actors.errors import SkdError, TeachersLostError
from orchestrator import runtime  # noqa: F401  (sets quiet Ray/MLflow environment defaults first)
from orchestrator.config import DataConfig
from orchestrator.config_load import load_config

app = typer.Typer(help="Stochastic knowledge distillation (SKDBERT) of BERT-style models on Ray, tracked in MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
teachers_app = typer.Typer(help="Prepare the teacher ensemble; serve it as a long-lived, elastic pool.",
                           no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")
cache_app = typer.Typer(help="The offline knowledge cache (train without loading teachers).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes get whole tables

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="YAML config, e.g. configs/sst2.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting: --set distill.alpha=0.3 (repeatable).")]


def fail(exc: SkdError) -> None:
    """Print a user error as one line (no traceback) and exit with status 2."""
    console.print(Text("error: ", style="bold red") + Text(str(exc)))  # Text: no markup parsing of "[t4]"
    raise typer.Exit(2)


def resume_command(config: Path, set_: list[str] | None) -> str:
    """The `skd distill ... --resume` command that continues a run started with these arguments."""
    import shlex

    sets = " ".join(f"--set {shlex.quote(s)}" for s in set_ or [])
    return f"skd distill -c {shlex.quote(str(config))} {sets + ' ' if sets else ''}--resume"


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
        fail(exc)
    table = Table(title=f"teachers for {cfg.task} ({cfg.manifest_path()})")
    for col in ("name", "family", "layers", "hidden", "parameters", "GFLOPs/token", f"dev {teachers[0].metric}",
                "checkpoint"):
        table.add_column(col)
    for t in teachers:
        table.add_row(t.name, t.family or "-", str(t.num_layers), str(t.hidden_size), f"{t.parameters / 1e6:.1f}M",
                      f"{t.flops_per_token / 1e9:.3f}" if t.flops_per_token else "-", f"{t.dev_metric:.4f}",
                      t.checkpoint)
    console.print(table)


PoolOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Pool name (default: teachers.pool of the config, else 'default').")]
AddressOpt = Annotated[Optional[str], typer.Option(
    help="Ray cluster: auto or host:port (default: ray.address of the config, else $RAY_ADDRESS).")]
OptConfig = Annotated[Optional[Path], typer.Option("-c", "--config", help="YAML config (for ray.address, teachers.pool).")]


def print_pools(pools: list[dict]) -> None:
    """One table per served pool: each teacher's node, device, requests, examples, queue, compute seconds."""
    if not pools:
        console.print("no teacher pools serve on this cluster")
    for p in pools:
        table = Table(title=f"teacher pool {p['pool']} (version {p['version']}; "
                            f"{p['settings']['task']}, {p['settings']['slots']} slot(s) per teacher)")
        for col in ("teacher", "node", "device", "requests", "examples", "queued", "running", "compute s", "status"):
            table.add_column(col)
        for t in p["teachers"]:
            table.add_row(t["name"], t.get("node", "-"), t.get("device", "-"), str(t.get("requests", "-")),
                          str(t.get("examples", "-")), str(t.get("queued", "-")), str(t.get("running", "-")),
                          f"{t['compute_s']:.1f}" if "compute_s" in t else "-", t["status"])
        console.print(table)
        changes = "; ".join(f"v{h['version']} {h['change']}" for h in p["history"][-5:])
        console.print(f"changes: {changes}", highlight=False)


@teachers_app.command("serve")
def teachers_serve(config: ConfigOpt, set_: SetOpt = None, name: PoolOpt = None):
    """Start the config's prepared teachers as a named pool of detached actors on the running cluster
    (ray.address) and return; jobs with `teachers.pool: NAME` share it until `skd teachers stop`."""
    from orchestrator.serving import serve

    try:
        print_pools([serve(load_config(config, set_), name)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("status")
def teachers_status(config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None):
    """List the served pools (or one): each teacher's node, device, requests served and queue."""
    from orchestrator.serving import connect, status

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            print_pools(status(name or (cfg.teachers.pool if cfg else None)))
    except SkdError as exc:
        fail(exc)


@teachers_app.command("add")
def teachers_add(config: ConfigOpt, teacher: Annotated[list[str], typer.Argument(help="Teachers of the config to add.")],
                 set_: SetOpt = None, name: PoolOpt = None):
    """Start prepared teachers of the config and add them to a served pool; attached students ask them from
    their next step on (the sampling distribution gives them their share)."""
    from orchestrator.serving import add

    try:
        print_pools([add(load_config(config, set_), list(teacher), name)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("remove")
def teachers_remove(teacher: Annotated[list[str], typer.Argument(help="Teachers to remove.")],
                    config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None,
                    drain_s: Annotated[float, typer.Option(help="Seconds to keep serving requests already sent.")] = 10.0):
    """Take teachers out of a served pool; attached students stop asking them at their next step and their
    mass is spread over the rest; the actors stop after --drain-s seconds."""
    from orchestrator.serving import connect, remove

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            print_pools([remove(cfg, list(teacher), name, drain_s)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("stop")
def teachers_stop(config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None):
    """Stop a served pool: its teacher actors, placement group and directory."""
    from orchestrator.serving import connect, pool_name, stop

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            pool = pool_name(cfg, name)
            console.print(f"stopped pool {pool}: {', '.join(stop(pool)) or 'no teachers'}", highlight=False)
    except SkdError as exc:
        fail(exc)


@app.command()
def distill(config: ConfigOpt, set_: SetOpt = None,
            resume: Annotated[bool, typer.Option(help="Continue the newest unfinished run of this config.")] = False,
            resume_from: Annotated[Optional[Path], typer.Option(help="Start from this checkpoint folder.")] = None,
            stop_after: Annotated[Optional[int], typer.Option(
                help="Stop after N steps, leaving the run resumable (for preemptible slots).")] = None,
            knowledge: Annotated[Optional[str], typer.Option(
                help="online (teacher actors) or cache:PATH (a `skd cache build` folder: no teachers loaded). "
                     "Default: distill.knowledge.source.")] = None,
            register: Annotated[Optional[str], typer.Option(
                "--register", metavar="[NAME]",
                help="Register the finished student in the MLflow Model Registry, as NAME or skd-<task>-student "
                     "(default: mlflow.registered_model; unset, the model is only logged to its run).")] = None):
    """Distil a student from the teacher ensemble: each step ONE teacher, drawn from the sampling
    distribution, serves soft labels and, if configured, hidden states / attentions (strategies: skd,
    no-kd, average, single:<teacher>)."""
    from orchestrator.distill import run_distill
    from orchestrator.tracking import browse_hint

    try:
        extra = [f"distill.knowledge.source={knowledge}"] if knowledge else []
        extra += [f"mlflow.registered_model={register}"] if register else []
        cfg = load_config(config, [*(set_ or []), *extra])
        if resume_from is not None and not (resume_from / "trainer_state.json").is_file():
            raise SkdError(f"--resume-from {resume_from}: not a checkpoint folder (no trainer_state.json)")
        result = run_distill(cfg, resume=resume, resume_from=str(resume_from) if resume_from else None,
                             stop_after=stop_after, register_as=cfg.registered_model_name())
    except TeachersLostError as exc:
        console.print(f"resume with: {resume_command(config, set_)}", highlight=False)
        fail(exc)
    except KeyboardInterrupt:
        console.print(f"interrupted; continue from the last checkpoint with: {resume_command(config, set_)}",
                      highlight=False)
        raise typer.Exit(130)
    except SkdError as exc:
        fail(exc)
    table = Table(title=f"skd distill: {cfg.task}, run {result.run_name} ({result.status})")
    table.add_column("quantity")
    table.add_column("value")
    for k, v in result.dev.items():
        table.add_row(f"dev {k}", f"{v:.4f}")
    table.add_row("retention (student / best teacher)", "-" if result.retention is None else f"{result.retention:.4f}")
    table.add_row("steps", str(result.steps))
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    table.add_row("throughput", f"{result.samples_per_s:.1f} samples/s")
    t = result.timings
    if "time/loop_s" in t:
        table.add_row("time (s)", f"plan {t.get('time/plan_s', 0):.1f}, Ray {t.get('time/ray_start_s', 0):.1f}, Ray Train "
                                  f"{t['time/fit_s']:.1f} (worker set-up {t['time/setup_s']:.1f}, training "
                                  f"{t['time/train_s']:.1f}, evaluations {t['time/eval_s']:.1f}, checkpoints and "
                                  f"reports {t['time/report_s']:.1f}), outputs {t.get('time/outputs_s', 0):.1f}")
    for name, n in result.counts.items():
        table.add_row(f"samples from {name}", str(n))
    if result.probs:
        table.add_row("sampling p (learnt, final)", ", ".join(f"{n} {p:.3f}" for n, p in result.probs.items()))
    table.add_row("student", str(result.model_dir or "-"))
    table.add_row("MLflow run", result.run_id)
    console.print(table)
    if result.status == "KILLED":
        console.print(f"stopped early; continue with: {resume_command(config, set_)}", highlight=False)
    from mlflow.tracking import MlflowClient

    with contextlib.suppress(Exception):  # the summary stands without the link
        exp_id = MlflowClient(cfg.tracking_uri()).get_run(result.run_id).info.experiment_id
        console.print(f"browse: {browse_hint(cfg.tracking_uri(), exp_id, result.run_id)}", highlight=False,
                      markup=False, soft_wrap=True)
    if result.interrupted:
        raise typer.Exit(130)


@cache_app.command("build")
def cache_build(config: ConfigOpt, set_: SetOpt = None,
                out: Annotated[Optional[Path], typer.Option(
                    help="Cache folder (default: the path of distill.knowledge.source, else "
                         "<output_dir>/knowledge-cache).")] = None,
                overwrite: Annotated[bool, typer.Option(
                    help="Delete a cache built for another setup in that folder and build afresh.")] = False):
    """Run every teacher over the training set once and store its soft labels and selected hidden-state
    knowledge (distill.knowledge) as memory-mapped safetensors shards. An interrupted build resumes."""
    from orchestrator.cache_build import build_cache

    try:
        cfg = load_config(config, set_)
        summary = build_cache(cfg, out, overwrite=overwrite)
    except SkdError as exc:
        fail(exc)
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
            seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")] = (0, 1, 2),
            baseline: Annotated[Optional[str], typer.Option(
                help="The variant the others are compared with (paired bootstrap); default: the first.")] = None):
    """Run several strategies x seeds on ONE shared teacher pool; print mean and spread per strategy and each
    one's paired difference from the baseline with a 95% bootstrap interval (over seeds and dev rows)."""
    from orchestrator.compare import run_comparison

    try:
        cfg = load_config(config, set_)
        summaries = run_comparison(cfg, str(config), list(variant), list(seed), list(set_ or []), baseline)
    except SkdError as exc:
        fail(exc)
    except KeyboardInterrupt as exc:
        console.print(f"interrupted: {exc or 'stopped at once'}", highlight=False)
        raise typer.Exit(130)
    metric = summaries[0].metric
    base = baseline or summaries[0].variant
    table = Table(title=f"skd compare: {cfg.task}, seeds {list(seed)} (mean ± sample std; Δ = paired difference "
                        f"from {base}, 95% bootstrap interval over seeds and dev rows)")
    for col in ("variant", f"dev {metric}", f"Δ {metric} [95% CI]", "real?", "retention", "wall s", "samples/s"):
        table.add_column(col)
    for v in summaries:
        fmt = lambda ms, scale=1.0, d=2: f"{ms[0] * scale:.{d}f} ± {ms[1] * scale:.{d}f}"  # noqa: E731
        p = v.paired
        delta = "baseline" if v.variant == base else "-" if p is None else (
            f"{100 * p.delta:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]")
        real = "" if p is None else ("yes" if p.real else "no")
        table.add_row(v.variant, fmt(v.dev, 100), delta, real, fmt(v.retention, 100), fmt(v.wall_s, d=1),
                      fmt(v.samples_per_s, d=1))
    console.print(table)
    for v in summaries:
        console.print(f"{v.variant}: " + ", ".join(f"seed run {r.run_id[:8]} {metric}={r.dev[metric]:.4f}"
                                                    for r in v.runs), highlight=False)


@app.command()
def evaluate(model_dir: Annotated[Path, typer.Argument(help="A save_pretrained folder.")],
             task: Annotated[str, typer.Option(help="GLUE task name (cola, sst2, mrpc, stsb, ...).")],
             config: Annotated[Optional[Path], typer.Option("-c", "--config", help="Take data settings from this config.")] = None,
             glue_dir: Annotated[Optional[Path], typer.Option(help="GLUE folder (default: $GLUE_DIR, ../shared/data/glue).")] = None,
             max_length: int = 128, batch_size: int = 128):
    """The task's GLUE metric on the dev set for any saved model."""
    from orchestrator.data import encode, load_split, task_spec
    from actors.models import load_classifier, load_tokenizer
    from orchestrator.trainer import evaluate as run_eval

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
        fail(exc)
    table = Table(title=f"{model_dir} on {spec.name} dev ({len(dev)} rows)")
    table.add_column("metric")
    table.add_column("value")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
