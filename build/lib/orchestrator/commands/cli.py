"""The `skd` command line, orchestrator part: distill, cache build and verify, compare, evaluate, export and
benchmark; `skd teachers` is `cli_teachers`, the shared options and the user-error exit are `options`.

`tuning.cli` adds the campaign commands (`tune`, `runs`) to this app and is the console entry point, so
the layers stay one-way (tuning imports orchestrator, never the reverse).

Every command validates its config before touching Ray; user errors print one readable message and
exit with status 2.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from actors.errors import SkdError, TeachersLostError
from orchestrator.driver import runtime  # noqa: F401  (sets quiet Ray/MLflow environment defaults first)
from orchestrator.config import DataConfig
from orchestrator.config.load import load_config
from orchestrator.commands.cli_teachers import teachers_app
from orchestrator.commands.options import ConfigOpt, SetOpt, console, fail, resume_command

app = typer.Typer(help="Stochastic knowledge distillation (SKDBERT) of BERT-style models on Ray, tracked in MLflow.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(teachers_app, name="teachers")
cache_app = typer.Typer(help="The offline knowledge cache (train without loading teachers).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


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
    from actors.errors import CheckpointError, NonFiniteError
    from orchestrator.common.checkpointing import verify_checkpoint
    from orchestrator.common.failures import WorkerFailedError
    from orchestrator.commands.distill import run_distill
    from orchestrator.tracking import browse_hint

    try:
        extra = [f"distill.knowledge.source={knowledge}"] if knowledge else []
        extra += [f"mlflow.registered_model={register}"] if register else []
        cfg = load_config(config, [*(set_ or []), *extra])
        if resume_from is not None and not (resume_from / "trainer_state.json").is_file():
            raise SkdError(f"--resume-from {resume_from}: not a checkpoint folder (no trainer_state.json)")
        if resume_from is not None and (problem := verify_checkpoint(resume_from)):
            raise CheckpointError(f"--resume-from {resume_from}: the checkpoint cannot be trusted: {problem}; "
                                  f"point it at another checkpoint folder")
        result = run_distill(cfg, resume=resume, resume_from=str(resume_from) if resume_from else None,
                             stop_after=stop_after, register_as=cfg.registered_model_name())
    except (TeachersLostError, NonFiniteError) as exc:
        console.print(f"resume with: {resume_command(config, set_)}", highlight=False)
        fail(exc)
    except WorkerFailedError as exc:
        if exc.resumable:
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
    if result.headline:
        h = result.headline
        table.add_row("parameters / best teacher's", f"{h['headline/parameter_ratio']:.3f}")
        table.add_row("speed-up over the best teacher", f"{h['headline/speedup']:.2f}x (PyTorch fp32, batch 32, "
                      f"{h['headline/student_samples_per_s']:.1f} vs {h['headline/teacher_samples_per_s']:.1f} samples/s)")
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
    from orchestrator.commands.cache_build import build_cache

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


@cache_app.command("verify")
def cache_verify(path: Annotated[Path, typer.Argument(help="The cache folder (the one holding manifest.json).")]):
    """Check every shard of a finished cache against the size and SHA-256 `skd cache build` recorded (reads
    every byte). Exit status 2 names each damaged shard; `skd cache build` with the same config rewrites them."""
    import time

    from actors.cache import KnowledgeCache

    try:
        began = time.perf_counter()
        cache = KnowledgeCache.open(path)
        cache.verify(contents=True)
    except SkdError as exc:
        fail(exc)
    digest = cache.manifest.get("content_sha256")
    shards = cache.manifest["num_shards"] * len(cache.teacher_names)
    console.print(f"knowledge cache {path}: {shards} shard(s) of {len(cache.teacher_names)} teacher(s), "
                  f"{(cache.manifest.get('total_bytes') or 0) / 2 ** 20:,.1f} MiB verified in "
                  f"{time.perf_counter() - began:.1f} s"
                  + (f"; content digest {digest[:16]}" if digest else
                     " (only that every shard is there: built before skd recorded digests; rebuild it with --overwrite)"),
                  highlight=False, markup=False)


@app.command()
def compare(config: ConfigOpt, set_: SetOpt = None,
            variant: Annotated[list[str], typer.Option(
                help="no-kd | average | single:<teacher> | skd:<family> (repeatable).")] = ("no-kd", "skd:uniform"),
            seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")] = (0, 1, 2),
            baseline: Annotated[Optional[str], typer.Option(
                help="The variant the others are compared with (paired bootstrap); default: the first.")] = None):
    """Run several strategies x seeds on ONE shared teacher pool; print mean and spread per strategy and each
    one's paired difference from the baseline with a 95% bootstrap interval (over seeds and dev rows)."""
    from orchestrator.commands.compare import run_comparison

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
    for col in ("variant", f"dev {metric}", f"Δ {metric} [95% CI]", "real?", "retention", "params x", "speed-up",
                "wall s", "samples/s"):
        table.add_column(col)
    for v in summaries:
        fmt = lambda ms, scale=1.0, d=2: f"{ms[0] * scale:.{d}f} ± {ms[1] * scale:.{d}f}"  # noqa: E731
        p = v.paired
        delta = "baseline" if v.variant == base else "-" if p is None else (
            f"{100 * p.delta:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]")
        real = "" if p is None else ("yes" if p.real else "no")
        ratio, speedup = v.headline("headline/parameter_ratio"), v.headline("headline/speedup")
        table.add_row(v.variant, fmt(v.dev, 100), delta, real, fmt(v.retention, 100),
                      "-" if ratio is None else f"{ratio:.3f}", "-" if speedup is None else f"{speedup:.2f}x",
                      fmt(v.wall_s, d=1), fmt(v.samples_per_s, d=1))
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
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.common.task import task_spec
    from actors.models import load_classifier, load_tokenizer
    from orchestrator.common.evaluation import evaluate as run_eval

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


def _task_data(task: Optional[str], config: Optional[Path], max_length: int):
    """(task, DataConfig, SkdConfig or None) from `--task` and/or `-c`: the config's data settings and task,
    `--task` overriding its task.

    Raises:
        SkdError: neither is given.
    """
    if config is None and task is None:
        raise SkdError("name the task: --task sst2 (or -c CONFIG, whose task and data settings are used)")
    cfg = load_config(config) if config else None
    data = cfg.data if cfg else DataConfig(max_length=max_length)
    return (task or cfg.task).lower().replace("-", ""), data, cfg


TaskOpt = Annotated[Optional[str], typer.Option(help="GLUE task name (default: the config's task).")]
ModelCfgOpt = Annotated[Optional[Path], typer.Option(
    "-c", "--config", help="Take the task, data settings and MLflow store from this config.")]


@app.command("export")
def export(model_dir: Annotated[Path, typer.Argument(help="A save_pretrained folder (a student or teacher).")],
           task: TaskOpt = None, config: ModelCfgOpt = None,
           onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Write the fp32 ONNX file.")] = True,
           int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also write an int8 ONNX file.")] = False,
           tolerance: Annotated[float, typer.Option(
               min=0, help="Refuse an export whose primary dev metric is more than this below PyTorch's "
                           "(absolute: 0.01 = 1 accuracy point).")] = 0.01,
           atol: Annotated[float, typer.Option(
               min=0, help="Refuse an fp32 export whose logits differ from PyTorch's by more than this.")] = 1e-3,
           run_id: Annotated[Optional[str], typer.Option(
               help="MLflow run to log the export into (default: the run that wrote MODEL_DIR, with -c).")] = None,
           threads: int = 1, max_length: int = 128):
    """Export a saved model to ONNX (and int8) in MODEL_DIR/onnx/, verified on the task's dev set: largest
    logit difference and dev metric against PyTorch; a failed check writes nothing. With -c, the files and
    their metrics also go into the MLflow run that wrote the model."""
    from actors.models import load_tokenizer
    from orchestrator.driver.inputs import encode, load_split
    from orchestrator.common.task import task_spec
    from orchestrator.commands.export import check_target, export_model, log_export, run_of

    try:
        if not onnx:
            raise SkdError("--no-onnx leaves nothing to export: ONNX is the only format (add --int8 for int8)")
        name, data, cfg = _task_data(task, config, max_length)
        spec = task_spec(name, data)
        check_target(model_dir)  # a model folder whose onnx/ skd may write, before loading anything
        tok = load_tokenizer(str(model_dir))
        dev = encode(load_split(spec.name, data, "dev"), tok, data.max_length)
        report = export_model(model_dir, spec, dev, int(tok.pad_token_id or 0), int8=int8, tolerance=tolerance,
                              atol=atol, threads=threads)
    except SkdError as exc:
        fail(exc)
    table = Table(title=f"{model_dir} exported to {report.folder} (verified on {spec.name} dev, {len(dev.labels)} rows)")
    for col in ("backend", "file", "MB", "max |Δ logit|", f"dev {spec.metric}", "Δ vs PyTorch"):
        table.add_column(col)
    table.add_row("torch-fp32", "-", "-", "-", f"{report.torch_metrics[spec.metric]:.4f}", "-")
    for c in report.checks:
        table.add_row(c.backend, c.file, f"{c.bytes / 1e6:.1f}", f"{c.max_abs_diff:.2e}", f"{c.metrics[spec.metric]:.4f}",
                      f"{c.delta:+.4f}")
    console.print(table)
    run = run_id or run_of(model_dir)
    if cfg is not None and run:
        try:
            log_export(cfg.tracking_uri(), run, report)
            console.print(f"[skd] logged the export into MLflow run {run} (artifacts onnx/, metrics export/*)", markup=False)
        except Exception as exc:  # the files are written and verified; the store is a copy of them
            console.print(f"[skd] warning: could not log the export into MLflow run {run}: {exc}", markup=False)
    elif run:
        console.print(f"[skd] not logged to MLflow run {run}: pass -c CONFIG to name its store", markup=False)


@app.command()
def benchmark(model_dirs: Annotated[list[Path], typer.Argument(help="save_pretrained folders: students, teachers.")],
              task: TaskOpt = None, config: ModelCfgOpt = None,
              backend: Annotated[Optional[list[str]], typer.Option(
                  help="torch-fp32, onnx-fp32, onnx-int8 (repeatable; default: all three).")] = None,
              threads: Annotated[int, typer.Option(min=1, help="Threads for every backend.")] = 1,
              latency_rows: Annotated[int, typer.Option(min=1, help="Dev rows timed one by one (batch 1).")] = 64,
              batch_rows: Annotated[int, typer.Option(min=1, help="Dev rows timed in batches of 32.")] = 256,
              max_seconds: Annotated[float, typer.Option(min=0, help="Stop adding rounds after this long.")] = 300.0,
              rel_ci: Annotated[float, typer.Option(
                  min=0, help="Target half-width of the 95% intervals, as a fraction of the mean.")] = 0.05,
              json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the rows as JSON lines.")] = None,
              max_length: int = 128):
    """Inference speed of saved models side by side: parameters, MB, batch-1 latency p50/p95 and batch-32
    samples/s, for PyTorch fp32, ONNX Runtime fp32 and int8, on the task's real dev sentences."""
    import json
    from dataclasses import asdict

    from orchestrator.commands.speed import BACKENDS, benchmark as run_benchmark

    try:
        name, data, _ = _task_data(task, config, max_length)
        console.print(f"[skd] benchmark: {len(model_dirs)} model(s) x {len(backend or BACKENDS)} backend(s), "
                      f"{threads} thread(s), interleaved rounds until the 95% intervals are within "
                      f"{rel_ci:.0%} (at most {max_seconds:.0f} s)", markup=False)
        rows = run_benchmark(model_dirs, name, data, backends=tuple(backend or BACKENDS), threads=threads,
                             latency_rows=latency_rows, batch_rows=batch_rows, max_seconds=max_seconds, rel_ci=rel_ci,
                             progress=lambda r, s: console.print(f"[skd] round {r} ({s:.0f} s)", markup=False))
    except SkdError as exc:
        fail(exc)
    table = Table(title=f"inference speed on {name} dev ({threads} thread(s))")
    for col in ("model", "backend", "parameters", "MB", "p50 ms [95% CI]", "p95 ms", "samples/s @32 [95% CI]",
                "rounds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.model, r.backend, f"{r.parameters / 1e6:.1f}M", f"{r.bytes / 1e6:.1f}",
                      f"{r.p50_ms:.2f} [{r.p50_ci[0]:.2f}, {r.p50_ci[1]:.2f}]", f"{r.p95_ms:.2f}",
                      f"{r.samples_per_s:.1f} [{r.sps_ci[0]:.1f}, {r.sps_ci[1]:.1f}]",
                      f"{r.rounds}{'' if r.tight else ' (not tight)'}")
    console.print(table)
    if json_out is not None:
        json_out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
