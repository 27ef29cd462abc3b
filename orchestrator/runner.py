"""Driver side of one training run: inputs, the MLflow run, the TorchTrainer, and the run's outputs.

`prepare_inputs` reads and tokenizes the task (pure Python, before any Ray resources). `run_training`
opens (or, on resume, reopens) an MLflow run, builds a Ray Train `TorchTrainer` around
`orchestrator.train_loop.train_loop`, copies the final model out of the last checkpoint, logs it and the
plots, and always ends the run FINISHED, KILLED (stopped early on request) or FAILED.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from orchestrator.config import SkdConfig
from orchestrator.data import Encoded, TaskSpec, encode, load_split, task_spec
from actors.errors import SkdError
from actors.models import load_tokenizer, resolve_model, vocab_fingerprint
from orchestrator.train_loop import TrainSpec, train_loop
from orchestrator import tracking


@dataclass
class Inputs:
    """A task's tokenized splits and the tokenizer facts every run needs."""

    spec: TaskSpec
    train: Encoded
    dev: Encoded
    pad_id: int
    vocab: str
    tokenizer_init: str  # absolute folder or hub id (workers run in other directories)


def prepare_inputs(cfg: SkdConfig, tokenizer_init: str) -> Inputs:
    """Load, subset and tokenize the train and dev splits.

    Raises:
        DataError: unknown task, missing/malformed files, unknown labels.
        TeacherError: the tokenizer cannot be loaded.
    """
    spec = task_spec(cfg.task, cfg.data)
    train_ex = load_split(cfg.task, cfg.data, "train")
    dev_ex = load_split(cfg.task, cfg.data, "dev")
    tok = load_tokenizer(tokenizer_init)
    return Inputs(spec, encode(train_ex, tok, cfg.data.max_length), encode(dev_ex, tok, cfg.data.max_length),
                  int(tok.pad_token_id or 0), vocab_fingerprint(tok), resolve_model(tokenizer_init))


@dataclass
class RunResult:
    """What a finished (or stopped) run produced.

    Attributes:
        run_id / run_name: the MLflow run; status: FINISHED, KILLED or FAILED.
        dev: final dev metrics (e.g. {"accuracy": 0.81}); retention: student/best-teacher metric or None.
        wall_s: seconds from trainer start to end; samples_per_s: mean training throughput.
        counts: examples served per teacher name; model_dir: the final `save_pretrained` folder.
        steps: the last step trained; checkpoint: folder of the latest Ray Train checkpoint (None: none).
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


def make_spec(cfg: SkdConfig, inputs: Inputs, opt: Any, *, model_init: str, num_layers: int | None,
              strategy: str = "no-kd", probs: list[float] | None = None, pool: Any = None,
              teacher_names: list[str] | None = None, best_teacher_metric: float | None = None,
              threads: int = 1, **overrides: Any) -> TrainSpec:
    """A `TrainSpec` from the config, the inputs and an optimisation section (`DistillConfig` or
    `FinetuneConfig`: lr, batch_size, epochs, max_steps, warmup_ratio, weight_decay, seed).

    The tokenized splits go into the object store once; workers fetch them by reference.
    """
    d = cfg.distill
    fields = dict(
        model_init=resolve_model(model_init), num_layers=num_layers, tokenizer_init=inputs.tokenizer_init, spec=inputs.spec,
        train=ray.put(inputs.train), dev=ray.put(inputs.dev), pad_id=inputs.pad_id, strategy=strategy,
        probs=probs, pool=pool, teacher_names=teacher_names or [], best_teacher_metric=best_teacher_metric,
        lr=opt.lr, batch_size=opt.batch_size, epochs=opt.epochs, max_steps=opt.max_steps,
        warmup_ratio=opt.warmup_ratio, weight_decay=opt.weight_decay, seed=opt.seed, alpha=d.alpha,
        temperature=d.temperature, eval_every=d.eval_every, checkpoint_every=d.checkpoint_every,
        log_every=d.log_every, eval_batch_size=d.eval_batch_size, prefetch=d.prefetch, gsnr_every=d.gsnr_every,
        gsnr_probe_size=d.gsnr_probe_size, tracking_uri="",
        run_id="", threads=threads)
    fields.update(overrides)
    return TrainSpec(**fields)


def find_resumable_run(client, experiment_id: str, run_name: str, tag: str = "skd.ray_run") -> Any | None:
    """The newest run with this name that did not finish and carries `tag` (where its state lives), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if run.info.status != "FINISHED" and run.data.tags.get(tag):
            return run
    return None


def run_training(cfg: SkdConfig, spec: TrainSpec, *, run_name: str, tags: dict[str, str],
                 params: dict[str, str], model_out: Path, resume: bool = False,
                 figures: Any = None, register_as: str | None = None, report_to_tune: bool = False,
                 continue_run: str | None = None) -> RunResult:
    """Run one Ray Train job inside one MLflow run.

    Args:
        cfg: the validated config (Ray, MLflow and storage settings).
        spec: the worker spec; its `tracking_uri`/`run_id` are filled in here.
        run_name: MLflow run name (also the key `--resume` looks up).
        tags / params: logged on a new run.
        model_out: where the final `save_pretrained` folder is copied (replaced if present).
        resume: continue the newest unfinished run named `run_name` from its latest checkpoint.
        figures: optional callable(client, run_id, result, tmpdir) -> list of image paths to log.
        register_as: register the final model under this MLflow model name (None: log only).
        report_to_tune: forward every `ray.train.report` to the enclosing Ray Tune trial.
        continue_run: log into this existing MLflow run (a PBT trial's next segment) with a fresh Ray Train
            run, starting from `spec.resume_from`; params and tags are not logged again.

    Returns:
        `RunResult`.

    Raises:
        SkdError: `resume` with no unfinished run to continue.
        ray.train.TrainingFailedError (and others): training failed; the MLflow run is marked FAILED.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.train.torch import TorchTrainer

    uri = cfg.tracking_uri()
    client = tracking.MlflowClient(uri)
    exp_id = tracking.ensure_experiment(uri, cfg.experiment_name(), tracking.default_artifact_root(uri))
    if continue_run:
        run_id = continue_run
        ray_name = f"{run_name}-{run_id[:8]}-{uuid.uuid4().hex[:6]}"  # never restores another segment's state
        client.update_run(run_id, status="RUNNING")
    elif resume:
        previous = find_resumable_run(client, exp_id, run_name)
        if previous is None:
            raise SkdError(f"--resume: no unfinished run named {run_name!r} in experiment "
                           f"{cfg.experiment_name()!r}; start it without --resume")
        run_id, ray_name = previous.info.run_id, previous.data.tags["skd.ray_run"]
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=run_name, tags={**tags, "skd.code_version": tracking.code_version()})
        run_id = run.info.run_id
        ray_name = f"{run_name}-{run_id[:8]}"
        client.set_tag(run_id, "skd.ray_run", ray_name)
        tracking.log_params(client, run_id, params)
    spec = replace(spec, tracking_uri=uri, run_id=run_id)
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        lambda config: train_loop(config["spec"]),
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": float(spec.threads)}),
        run_config=RunConfig(name=ray_name, storage_path=str(cfg.storage_path()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="ERROR"),
                             callbacks=[TuneReportCallback()] if report_to_tune else None),
    )
    status = "FAILED"
    started = time.perf_counter()
    try:
        result = trainer.fit()
        metrics = result.metrics or {}
        done = bool(metrics.get("finished"))
        out = RunResult(run_id, run_name, "FINISHED" if done else "KILLED", wall_s=time.perf_counter() - started,
                        steps=int(metrics.get("step", 0)),
                        checkpoint=result.checkpoint.path if result.checkpoint is not None else None)
        out.dev = {k.split("/", 1)[1]: float(v) for k, v in metrics.items()
                   if k.startswith("dev/") and k != "dev/retention"}
        out.retention = metrics.get("dev/retention")
        history = tracking.metric_history(client, run_id, "train/samples_per_s")
        out.samples_per_s = sum(v for _, v in history) / len(history) if history else 0.0
        out.counts = {n: int(v[-1][1]) for n in spec.teacher_names
                      if (v := tracking.metric_history(client, run_id, f"teacher_samples/{n}"))}
        if done and result.checkpoint is not None:
            with result.checkpoint.as_directory() as ckpt:
                if model_out.exists():
                    shutil.rmtree(model_out)
                shutil.copytree(Path(ckpt) / "model", model_out)
            out.model_dir = model_out
            tracking.log_hf_model(uri, run_id, model_out, register_as)
            client.log_metric(run_id, "wall_s", out.wall_s)
        if figures is not None:
            with tempfile.TemporaryDirectory(prefix="skd-") as tmp:
                tracking.log_figures(client, run_id, figures(client, run_id, out, Path(tmp)))
        status = out.status
        return out
    finally:
        client.set_terminated(run_id, status)
