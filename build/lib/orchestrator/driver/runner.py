"""Driver side of one training run: the MLflow run, the TorchTrainer, and the run's outputs.

`run_training` opens (or, on resume, reopens) an MLflow run, builds a Ray Train `TorchTrainer` around
`orchestrator.worker.train_loop.train_loop`, builds the run's summary from the Ray Train result (the last report
carries dev metrics, per-teacher counts and throughput), copies the final model out of the last
checkpoint, logs it and the plots, and always ends the run FINISHED, KILLED (stopped early on request)
or FAILED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from actors.errors import NonFiniteError, SkdError, TeachersLostError
from actors.knowledge import KnowledgeSource
from orchestrator import tracking
from orchestrator.common import console
from orchestrator.driver import lineage
from orchestrator.config import SkdConfig
from orchestrator.common.control import run_interruptible, start_control
from orchestrator.worker.spec import AdaptiveSettings
from orchestrator.driver.outputs import RUN_FILE, check_output, save_model
from orchestrator.driver.plan import RunPlan
from orchestrator.common.sampling import Reweigh
from orchestrator.worker.spec import KnowledgeSpec, Optimisation, RunSettings, TrainTask, WorkerSpec
from orchestrator.worker.train_loop import train_loop


@dataclass
class RunResult:
    """What a finished (or stopped) run produced.

    Attributes:
        run_id / run_name: the MLflow run; status: FINISHED, KILLED or FAILED.
        dev: final dev metrics (e.g. {"accuracy": 0.81}); retention: student/best-teacher metric or None.
        wall_s: seconds from trainer start to end (driver clock).
        samples_per_s: training throughput of this Ray Train run: total samples / total seconds of the
            worker's step loop (evaluations and checkpoints included).
        counts: examples served per teacher name (the whole run, resumed parts included).
        model_dir: the final `save_pretrained` folder; steps: the last step trained;
        checkpoint: folder of the latest Ray Train checkpoint (None: none, or removed after the run finished:
            `ray.keep_finished_checkpoints`).
        interrupted: stopped by SIGINT/SIGTERM on the driver (status KILLED, resumable).
        probs: the adaptive family's learnt p in force at the end, by teacher name ({} for fixed families).
        headline: the saved student against the best teacher (`orchestrator.commands.speed.headline`: retention,
            parameter ratio, speed-up); {} when not measured.
        timings: where the time went, seconds ({"time/fit_s": Ray Train's fit, controller and worker start
            included; "time/outputs_s": saving and logging the student and plots, removing
            a finished run's Ray Train folder; rank 0's "time/setup_s",
            "time/loop_s", "time/eval_s", "time/report_s", "time/gsnr_s", "time/train_s" of the last Ray
            Train run; the command adds "time/plan_s" and "time/ray_start_s"}); logged to MLflow.
    """

    run_id: str
    run_name: str
    status: str
    dev: dict[str, float] = field(default_factory=dict)
    retention: float | None = None
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    model_dir: Path | None = None
    steps: int = 0
    checkpoint: str | None = None
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    probs: dict[str, float] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)


def _warn_on_failure(client, run_id: str, what: str, action: Callable[[], Any]) -> None:
    """Run a post-training step (model logging, plots); a failure is a warning and a run tag, not a failed run."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001  (the training result stands whatever logging raised)
        print(f"[skd] warning: {what} failed: {exc!r}; the run keeps its training status", flush=True)
        client.set_tag(run_id, f"skd.warning.{what.replace(' ', '_')}", repr(exc)[:500])


def distill_spec(plan: RunPlan, source: KnowledgeSource | None, *, stop_after: int | None = None,
                 resume_from: str | None = None) -> WorkerSpec:
    """The worker spec of a distill run (or pre-pass) from its plan; the splits go into the object store once.

    Raises:
        SkdError: the plan needs knowledge (skd/average) but no source was given.
    """
    cfg, d = plan.cfg, plan.cfg.distill
    if plan.knowledge is not None and source is None:
        raise SkdError(f"run {plan.run_name}: strategy {plan.strategy} needs a knowledge source (teachers or cache)")
    inputs = plan.inputs
    from actors.models import resolve_model

    task = TrainTask(resolve_model(cfg.student.init), cfg.student.num_layers, inputs.tokenizer_init, inputs.spec,
                     ray.put(inputs.train), ray.put(inputs.dev), inputs.pad_id)
    reweigh = Reweigh(plan.family, d.distribution, plan.probs) if plan.probs is not None else None
    dist = d.distribution
    adaptive = (AdaptiveSettings(dist.every, dist.step_size, dist.eps, dist.probe_size)
                if plan.family == "adaptive" else None)
    knowledge = None if plan.knowledge is None else KnowledgeSpec(
        source, plan.strategy, plan.probs, plan.names, plan.knowledge, d.alpha, d.temperature, d.prefetch, reweigh,
        adaptive, d.transfer_weight)
    run = RunSettings(plan.steps, int(cfg.ray.cpus_per_worker), d.log_every, d.eval_batch_size, d.gsnr_every,
                      d.gsnr_probe_size, stop_after, resume_from, plan.best_teacher_metric, nonfinite=d.nonfinite)
    return WorkerSpec(task, Optimisation(d.lr, d.batch_size, d.warmup_ratio, d.weight_decay, d.seed), knowledge, run)


def find_resumable_run(client, experiment_id: str, run_name: str, tag: str = "skd.ray_run") -> Any | None:
    """The newest run with this name that did not finish and carries `tag` (where its state lives), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.info.status != "FINISHED" and run.data.tags.get(tag):
            return run
    return None


def _open_run(cfg: SkdConfig, client, exp_id: str, run_name: str, tags: dict[str, str], params: dict[str, str],
              resume: bool, continue_run: str | None) -> tuple[str, str]:
    """(MLflow run id, Ray Train run name): a new run, the newest unfinished one (`resume`), or `continue_run`
    with a fresh Ray Train name (a PBT segment never restores another segment's state).

    Raises:
        SkdError: `resume` with no unfinished run of that name.
    """
    if continue_run:
        client.update_run(continue_run, status="RUNNING")
        return continue_run, f"{run_name}-{continue_run[:8]}-{uuid.uuid4().hex[:6]}"
    if resume:
        previous = find_resumable_run(client, exp_id, run_name)
        if previous is None:
            raise SkdError(f"--resume: no unfinished run named {run_name!r} in experiment "
                           f"{cfg.experiment_name()!r}; start it without --resume")
        client.update_run(previous.info.run_id, status="RUNNING")
        return previous.info.run_id, previous.data.tags["skd.ray_run"]
    run_id = client.create_run(exp_id, run_name=run_name, tags={**tags, "skd.code_version": tracking.code_version()}
                               ).info.run_id
    ray_name = f"{run_name}-{run_id[:8]}"
    client.set_tag(run_id, "skd.ray_run", ray_name)
    tracking.log_params(client, run_id, params)
    return run_id, ray_name


def _summary(run_id: str, run_name: str, result, names: list[str], wall_s: float) -> RunResult:
    """A `RunResult` from the Ray Train result's last reported metrics."""
    metrics = result.metrics or {}
    done = bool(metrics.get("finished"))
    return RunResult(
        run_id, run_name, "FINISHED" if done else "KILLED",
        dev={k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("dev/") and k != "dev/retention"},
        retention=metrics.get("dev/retention"), wall_s=wall_s, samples_per_s=float(metrics.get("samples_per_s", 0.0)),
        counts={n: int(metrics[f"teacher_samples/{n}"])  # the plan's teachers, then any that joined a served pool
                for n in [*names, *(k.split("/", 1)[1] for k in metrics if k.startswith("teacher_samples/"))]
                if f"teacher_samples/{n}" in metrics},
        steps=int(metrics.get("step", 0)),
        checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
        timings={"time/fit_s": wall_s, **{k: float(v) for k, v in metrics.items() if k.startswith("time/")}},
        probs={k.split("/", 2)[2]: float(v) for k, v in metrics.items() if k.startswith("sampler/p/")})


def _trainer(cfg: SkdConfig, spec: WorkerSpec, ray_name: str, use_gpu: bool, report_to_tune: bool):
    """The Ray Train `TorchTrainer` of one run: workers and their resources, checkpoints (2 kept), restarts
    after a worker failure (`ray.max_failures`), Tune reporting inside a trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    return TorchTrainer(
        lambda config: train_loop(config["spec"]), train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": float(spec.run.threads),
                                                           **cfg.ray.resources_per_worker}),
        run_config=RunConfig(name=ray_name, storage_path=str(cfg.storage_path()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             logging_config=LoggingConfig(log_level="ERROR"),
                             callbacks=[TuneReportCallback()] if report_to_tune else None))


def _outputs(client, uri: str, out: RunResult, result, model_out: Path,
             figures: Callable[..., list[Path]] | None, register_as: str | None,
             card: Callable[[RunResult], str] | None, example: Callable[[], str | dict[str, str] | None],
             headline: Callable[[RunResult], dict[str, float]] | None = None) -> None:
    """After training: a finished run's student copied to `model_out`, its headline measured (`out.headline`,
    logged as metrics), its model card, the model logged (registered as `register_as` when given), and the
    plots; a failure of any is a warning (`_warn_on_failure`)."""
    run_id = out.run_id
    if out.status == "FINISHED" and result.checkpoint is not None:
        with result.checkpoint.as_directory() as ckpt:
            save_model(Path(ckpt) / "model", model_out)
        (model_out / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
        out.model_dir = model_out
        if headline is not None:
            def measure() -> None:
                out.headline = headline(out)
                tracking.log_metrics(client, run_id, out.headline, out.steps)
            _warn_on_failure(client, run_id, "headline (size and speed against the best teacher)", measure)
        if card is not None:
            _warn_on_failure(client, run_id, "model card", lambda: (model_out / "README.md").write_text(card(out)))
        _warn_on_failure(client, run_id, "wall time", lambda: client.log_metric(run_id, "wall_s", out.wall_s))
        _warn_on_failure(client, run_id, "model logging",
                         lambda: tracking.log_hf_model(uri, run_id, model_out, register_as, example()))
    if figures is not None:
        def plots() -> None:
            with tempfile.TemporaryDirectory(prefix="skd-") as tmp:
                tracking.log_figures(client, run_id, figures(client, run_id, out, Path(tmp)))
        _warn_on_failure(client, run_id, "plots", plots)


def _fit(cfg: SkdConfig, trainer, control, ray_name: str, run_id: str, who: str):
    """(result, interrupted) of `trainer.fit()`. A worker's failure, raised (`TrainingFailedError`) or left
    with `control` as one a restart cannot fix (`failures.fatal_report`), becomes one `WorkerFailedError`
    line naming the cause and the log file with the tracebacks (`<output_dir>/logs/<ray run>.log`);
    checkpoint folders this attempt cut off mid-write are removed first. `who`: "student" or "teacher"."""
    from ray.train import TrainingFailedError

    from orchestrator.common import failures
    from orchestrator.common.checkpointing import verify_checkpoint

    folder, log = cfg.storage_path() / ray_name, cfg.out_dir() / "logs" / f"{ray_name}.log"
    began = time.time() - 1.0  # folders this attempt wrote are at least this new

    def resumable() -> bool:
        """Cut-off checkpoints removed; whether one that verifies is left for --resume."""
        failures.drop_unfinished_checkpoints(folder, verify_checkpoint, began)
        return any(p.is_dir() and verify_checkpoint(p) is None for p in folder.glob("checkpoint_*"))

    try:
        result, interrupted = run_interruptible(trainer.fit, control)
    except TrainingFailedError as exc:
        if (reported := ray.get(control.failure.remote())) is None:  # else: ray.max_failures was 0
            raise failures.worker_failure(exc, log, run_id, resumable, folder, who) from None
        raise failures.fatal_failure(reported, log, run_id, resumable, folder, who) from None
    reported = ray.get(control.failure.remote())
    if reported:
        raise failures.fatal_failure(reported, log, run_id, resumable, folder, who)
    return result, interrupted


def _drop_checkpoints(cfg: SkdConfig, ray_name: str, out: RunResult) -> None:
    """Remove a finished run's Ray Train folder (`<ray.storage_path>/<ray_name>`, created by this run: its name
    carries the MLflow run id) once its model is saved to `out.model_dir`; `out.checkpoint` becomes None.
    Nothing happens for a run that did not finish or whose model was not saved (it stays resumable). A folder
    that cannot be removed is a warning: the run's outcome stands.
    """
    folder = cfg.storage_path() / ray_name
    if out.status != "FINISHED" or out.model_dir is None or not folder.is_dir():
        return
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        print(f"[skd] warning: could not remove the finished run's checkpoints at {folder} ({exc})", flush=True)
        return
    out.checkpoint = None
    print(f"[skd] removed the finished run's Ray Train checkpoints ({size / 2**20:.0f} MiB, {folder}); its model is "
          f"in {out.model_dir}. Keep them with --set ray.keep_finished_checkpoints=true", flush=True)


def _raise_if_stopped_by_knowledge(metrics: dict[str, Any], steps: int, run_id: str) -> None:
    """Raise the error of a run that stopped itself with a checkpoint: every teacher lost, or a non-finite
    step under `distill.nonfinite: stop` (the last report carries the reason)."""
    lost = metrics.get("teachers_lost")
    if lost:
        raise TeachersLostError(f"{lost}. The run stopped with a checkpoint after step {steps} (MLflow run "
                                f"{run_id}, marked FAILED); once the teachers can run again, continue it with "
                                f"--resume")
    nonfinite = metrics.get("nonfinite")
    if nonfinite:
        raise NonFiniteError(f"{nonfinite}. The run stopped with a checkpoint of its last finite state, after "
                             f"step {steps} (MLflow run {run_id}, marked FAILED); lower distill.lr, fix or "
                             f"rebuild what the message names, or set distill.nonfinite=skip, then continue it "
                             f"with --resume")


def run_training(cfg: SkdConfig, spec: WorkerSpec, *, run_name: str, tags: dict[str, str], params: dict[str, str],
                 model_out: Path, use_gpu: bool, resume: bool = False,
                 figures: Callable[..., list[Path]] | None = None, register_as: str | None = None,
                 report_to_tune: bool = False, continue_run: str | None = None,
                 timings: dict[str, float] | None = None, card: Callable[[RunResult], str] | None = None,
                 headline: Callable[[RunResult], dict[str, float]] | None = None) -> RunResult:
    """Run one Ray Train job inside one MLflow run.

    Args:
        cfg: the validated config (Ray, MLflow and storage settings).
        spec: the worker spec; its run's `tracking_uri`/`run_id` are filled in here.
        run_name: MLflow run name (also the key `--resume` looks up).
        tags / params: logged on a new run.
        model_out: where the final `save_pretrained` folder is copied (an earlier skd output there is
            replaced; any other existing folder is refused before training).
        use_gpu: student workers train on a GPU (from the plan's resolved `Resources`).
        resume: continue the newest unfinished run named `run_name` from its latest checkpoint.
        figures: optional callable(client, run_id, result, tmpdir) -> list of image paths to log.
        register_as: register the final model in the MLflow Model Registry under this name (None: log the
            model to the run only).
        card: optional callable(result) -> the Hugging Face model card (README.md) written beside the weights.
        headline: optional callable(result) -> the saved student's headline metrics (size and speed against
            the best teacher, `orchestrator.commands.speed.headline`), measured before the card is written.
        report_to_tune: forward every `ray.train.report` to the enclosing Ray Tune trial.
        continue_run: log into this existing MLflow run (a PBT trial's next segment) with a fresh Ray Train
            run, starting from `spec.run.resume_from`; params and tags are not logged again.
        timings: more `time/*` seconds of the command (plan, Ray start), logged with the run's own.

    Returns:
        `RunResult`.

    The first SIGINT/SIGTERM (in the main thread) stops the workers at the next `log_every` boundary with a
    checkpoint and flushed metrics (status KILLED, `interrupted`); a second raises KeyboardInterrupt at once
    (status KILLED).

    Raises:
        SkdError: `resume` with no unfinished run to continue, or `model_out` exists and skd did not write it.
        TeachersLostError: every teacher was lost; the run wrote a checkpoint and is marked FAILED.
        NonFiniteError: a non-finite step under `distill.nonfinite: stop`; checkpoint written, run FAILED.
        WorkerFailedError: a student worker failed (one line: the cause, the traceback's log file); the MLflow
            run is marked FAILED.
    """
    check_output(model_out)  # before the MLflow run and the trainer: refuse a folder skd did not create
    uri = cfg.tracking_uri()
    client, exp_id = tracking.open_experiment(uri, cfg.experiment_name())
    run_id, ray_name = _open_run(cfg, client, exp_id, run_name, tags, params, resume, continue_run)
    if not resume and continue_run is None:
        _warn_on_failure(client, run_id, "dataset inputs", lambda: lineage.log_datasets(client, run_id, cfg))
    status, control = "FAILED", None
    try:
        control = start_control()
        spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, tracking_uri=uri, run_id=run_id,
                                                                 spill_dir=str(cfg.out_dir() / "metrics-spill"),
                                                                 control=control,
                                                                 system_metrics_s=cfg.mlflow.system_metrics_s))
        trainer = _trainer(cfg, spec, ray_name, use_gpu, report_to_tune)
        started = time.perf_counter()
        with console.display().phase(run_name, total=spec.run.steps.total):
            result, interrupted = _fit(cfg, trainer, control, ray_name, run_id,
                                       "teacher" if tags.get("skd.kind") == "teacher" else "student")
        names = spec.knowledge.names if spec.knowledge is not None else []
        out = _summary(run_id, run_name, result, names, time.perf_counter() - started)
        out.interrupted = interrupted and out.status != "FINISHED"  # a signal in the last steps: finished
        _raise_if_stopped_by_knowledge(result.metrics or {}, out.steps, run_id)
        began = time.perf_counter()
        _outputs(client, uri, out, result, model_out, figures, register_as, card, lambda: lineage.input_example(cfg),
                 headline)
        if not cfg.ray.keep_finished_checkpoints:
            _drop_checkpoints(cfg, ray_name, out)
        out.timings.update({**(timings or {}), "time/outputs_s": time.perf_counter() - began})
        _warn_on_failure(client, run_id, "timings", lambda: tracking.log_timings(client, run_id, out.timings))
        status = out.status
        return out
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, resumable from the last checkpoint
        status = "KILLED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status)
        except Exception as exc:  # noqa: BLE001  (never hide the run's own outcome or error)
            print(f"[skd] warning: could not mark MLflow run {run_id} {status} ({exc!r}); it shows RUNNING "
                  f"until the store is reachable and the run is resumed or ended", flush=True)
        if control is not None:
            with contextlib.suppress(Exception):  # Ray may already be going down (second Ctrl-C)
                ray.kill(control)
