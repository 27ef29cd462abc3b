"""`skd tune`: a Ray Tune campaign over sampling distributions and KD settings, one shared teacher pool.

Top to bottom: validate the config and every search dimension's range (before Ray); start ONE teacher
pool for all trials; run the student-rank pre-pass once if the space can pick that family; open the
campaign's parent MLflow run; run Tune (ASHA or FIFO; random or seeded Optuna TPE search), where each
trial runs `skd distill`'s own code with the shared pool and reports dev metrics at each evaluation
through Ray Train's TuneReportCallback; settle child-run statuses (stopped trials end KILLED); log the
campaign report to the parent run.

Each trial's function builds its own TorchTrainer (Tune wraps a driver function, never the trainer);
trial MLflow runs are named after the Tune trial id, so a restored campaign (`--resume`) reopens them
instead of creating duplicates.

PBT (population based training) needs what Ray Train V2's TuneReportCallback does not pass: a Tune
checkpoint. A PBT trial (`pbt_trial_fn`) therefore trains in segments, one per perturbation interval:
each segment is a Ray Train run of the same loop from the previous segment's checkpoint (`resume_from`,
`stop_after`), logged into the trial's one MLflow run, and ends with `tune.report(..., checkpoint=...)`.
When PBT exploits, the trial restarts from a better trial's checkpoint (model, optimizer, schedule and
the sampler's generator state) with perturbed values, so the sampling distribution can change during
training (a curriculum over teachers); each segment's values are logged as `hp/<name>` metrics.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.manifest import read_manifest, validate_teachers
from actors.pool import TeacherPool
from orchestrator import tracking
from orchestrator.config import SkdConfig, load_config
from orchestrator.distill import knowledge_fields, plan_run, run_distill, start_teacher_pool, student_rank_scores
from actors.errors import ConfigError, SkdError
from actors.models import resolve_model
from orchestrator.checkpointing import STATE_FILE
from orchestrator.runner import find_resumable_run, prepare_inputs
from orchestrator.runtime import ray_session
from tuning.space import KEYS, TuneSection, domain, to_overrides


def absolute_raw(cfg: SkdConfig) -> dict[str, Any]:
    """The config as a dict with every path absolute (Tune trials run in their own working directory)."""
    raw = cfg.model_dump(mode="json", exclude={"tune"})
    raw["output_dir"] = str(cfg.out_dir())
    raw["teachers"]["manifest"] = str(cfg.manifest_path())
    raw["ray"]["storage_path"] = str(cfg.storage_path())
    raw["mlflow"]["tracking_uri"] = cfg.tracking_uri()
    raw["data"]["glue_dir"] = str(cfg.data.resolved_glue_dir())
    if cfg.distill.knowledge.cache_path is not None:
        raw["distill"]["knowledge"]["source"] = f"cache:{cfg.distill.knowledge.cache_path}"
    raw["student"]["init"] = resolve_model(cfg.student.init)
    for m in raw["teachers"]["members"]:
        m["init"] = resolve_model(m["init"])
    return raw


def validate_space(cfg: SkdConfig, section: TuneSection) -> None:
    """Check every value each dimension can take against the config model.

    Raises:
        ConfigError: naming the dimension, e.g. "tune.space.alpha: 1.5 gives invalid config ...".
    """
    base = absolute_raw(cfg)
    for name, dim in section.space.items():
        for value in dim.extremes():
            try:
                load_config(None, to_overrides({name: value}), base=base)
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{name}: value {value!r} is not valid for {KEYS[name]}: {exc}") from None
    if cfg.distill.strategy != "skd":
        raise ConfigError(f"skd tune searches sampling distributions: set distill.strategy=skd "
                          f"(got {cfg.distill.strategy!r})")


def trial_fn(config: dict[str, Any], *, base: dict[str, Any], pool: TeacherPool, parent_run_id: str,
             student_scores: list[float] | None) -> None:
    """One Tune trial: `skd distill` with the trial's values, the shared pool and a nested MLflow run."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = load_config(None, [*to_overrides(config), f"mlflow.run_name=trial-{trial_id}"], base=base)
    client = tracking.MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment_name())
    resume = exp is not None and find_resumable_run(client, exp.experiment_id, f"trial-{trial_id}") is not None
    run_distill(cfg, pool=pool, resume=resume, student_scores=student_scores, report_to_tune=True,
                extra_tags={"mlflow.parentRunId": parent_run_id, "skd.kind": "trial", "skd.trial_id": trial_id},
                register_as=None)


def segment_stops(total: int, eval_every: int | None, interval: int) -> list[int]:
    """Steps at which a PBT trial's segments end: every `interval`-th evaluation step, and the last step."""
    from orchestrator.train_loop import eval_steps

    evals = sorted(eval_steps(total, eval_every))
    return sorted(set(evals[interval - 1::interval]) | {total})


def pbt_trial_fn(config: dict[str, Any], *, base: dict[str, Any], pool: TeacherPool, parent_run_id: str,
                 student_scores: list[float] | None, interval: int) -> None:
    """One PBT trial: `skd distill`'s loop in segments of `interval` evaluations (see module docstring).

    Each segment reports the dev metrics and the segment's final Ray Train checkpoint to Tune; a trial that
    PBT restarts (exploit) or a restored campaign starts from `tune.get_checkpoint()`.
    """
    from ray import tune
    from orchestrator.train_loop import plan_steps

    trial_id = tune.get_context().get_trial_id()
    run_name = f"trial-{trial_id}"
    cfg = load_config(None, [*to_overrides(config), f"mlflow.run_name={run_name}"], base=base)
    inputs = prepare_inputs(cfg, cfg.student.init)
    d = cfg.distill
    _, total = plan_steps(len(inputs.train), d.batch_size, cfg.ray.num_workers, d.epochs, d.max_steps)
    client = tracking.MlflowClient(cfg.tracking_uri())
    exp_id = tracking.ensure_experiment(cfg.tracking_uri(), cfg.experiment_name(),
                                        tracking.default_artifact_root(cfg.tracking_uri()))
    found = client.search_runs([exp_id], f"tags.`skd.trial_id` = '{trial_id}'", max_results=1)
    run_id = found[0].info.run_id if found else None  # a restarted trial keeps its one MLflow run
    start, ckpt_dir = 0, None
    checkpoint = tune.get_checkpoint()  # own (restored campaign) or a better trial's (PBT exploit)
    if checkpoint is not None:
        ckpt_dir = checkpoint.path  # in Tune's storage, which every node of a cluster reaches
        start = int(json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["state"]["step"])
        if run_id is not None:
            client.set_tag(run_id, f"pbt.restored.step{start:06d}", checkpoint.path)
    previous_segment: Path | None = None
    try:
        for stop in [s for s in segment_stops(total, d.eval_every, interval) if s > start]:
            res = run_distill(cfg, resume_from=ckpt_dir, stop_after=stop if stop < total else None, pool=pool,
                              student_scores=student_scores, register_as=None, continue_run=run_id, inputs=inputs,
                              extra_tags={"mlflow.parentRunId": parent_run_id, "skd.kind": "trial",
                                          "skd.trial_id": trial_id, "skd.scheduler": "pbt"})
            run_id = res.run_id
            values = {f"hp/{k}": float(v) for k, v in config.items() if isinstance(v, (int, float))}
            tracking.log_metrics(client, run_id, values, step=start)  # the values in force from `start` on
            client.set_tag(run_id, f"pbt.config.step{start:06d}", json.dumps(config, sort_keys=True))
            if res.checkpoint is None:
                raise SkdError(f"PBT segment {start}->{stop} of {run_name} left no checkpoint")
            metrics = {"step": res.steps, "finished": float(res.steps >= total),
                       **{f"dev/{k}": v for k, v in res.dev.items()}}
            if res.retention is not None:
                metrics["dev/retention"] = res.retention
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(res.checkpoint))
            if previous_segment is not None:  # Tune keeps its own copy of every reported checkpoint
                shutil.rmtree(previous_segment, ignore_errors=True)
            previous_segment = Path(res.checkpoint).parent
            ckpt_dir, start = res.checkpoint, res.steps
    finally:
        if previous_segment is not None:  # the last segment's Ray Train folder; Tune holds its checkpoint
            shutil.rmtree(previous_segment, ignore_errors=True)


@dataclass
class CampaignResult:
    """The campaign's parent run, its trials (one dict each: id, params, metric, status, run id) and the best."""

    parent_run_id: str
    experiment_id: str
    metric: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    wall_s: float


def _searcher(section: TuneSection):
    if section.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=section.seed))  # metric/mode come from TuneConfig
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=section.seed, max_concurrent=section.max_concurrent)


def _scheduler(section: TuneSection):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if section.scheduler == "pbt":
        space = section.space

        def explore(config: dict[str, Any]) -> dict[str, Any]:
            return {k: space[k].clamp(v) if k in space else v for k, v in config.items()}

        # one Tune report per segment (= perturbation_interval evaluations), see pbt_trial_fn. Choices go
        # as lists (PBT shifts them to a neighbouring value); ranges as domains (resampled or scaled by
        # 0.8/1.2, then clamped by `explore`).
        mutations = {k: list(d.choice) if d.choice is not None else domain(d) for k, d in space.items()}
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                       hyperparam_mutations=mutations, quantile_fraction=section.quantile_fraction,
                                       custom_explore_fn=explore, synch=section.synch)

    if section.scheduler == "asha":
        # time in evaluations (Tune's training_iteration = one report per dev evaluation)
        return ASHAScheduler(time_attr="training_iteration",
                             grace_period=section.grace_period, reduction_factor=section.reduction_factor)
    return FIFOScheduler()


def run_campaign(cfg: SkdConfig, *, resume: bool = False) -> CampaignResult:
    """Run (or with `resume`, continue) a tuning campaign; see the module docstring.

    Raises:
        SkdError: bad config, search space, data or teachers (before Ray), or `resume` with nothing to resume.
    """
    import time

    from ray import tune

    section = cfg.tune or TuneSection()
    validate_space(cfg, section)
    inputs = prepare_inputs(cfg, cfg.student.init)
    plan = plan_run(cfg, inputs)
    knowledge_fields(cfg, inputs, plan)  # a bad request or a missing/mismatched cache fails here, before Ray
    if section.scheduler == "pbt":
        from orchestrator.train_loop import eval_steps, plan_steps

        d = cfg.distill
        _, total = plan_steps(len(inputs.train), d.batch_size, cfg.ray.num_workers, d.epochs, d.max_steps)
        evaluations = len(eval_steps(total, d.eval_every))
        if section.perturbation_interval >= evaluations:
            raise ConfigError(f"tune.perturbation_interval: {section.perturbation_interval} evaluations leave no "
                              f"perturbation point in a run with {evaluations} evaluations; lower it or set "
                              f"distill.eval_every smaller")
    teachers = validate_teachers(read_manifest(cfg.manifest_path()), [m.name for m in cfg.teachers.members],
                                 cfg.task, inputs.spec.num_labels, inputs.vocab)
    metric = section.metric or f"dev/{inputs.spec.metric}"
    uri = cfg.tracking_uri()
    client = tracking.MlflowClient(uri)
    exp_id = tracking.ensure_experiment(uri, cfg.experiment_name(), tracking.default_artifact_root(uri))
    name = cfg.mlflow.run_name or "campaign"
    if resume:
        previous = find_resumable_run(client, exp_id, name, tag="skd.tune_dir")
        if previous is None:
            raise SkdError(f"--resume: no unfinished campaign named {name!r} in experiment {cfg.experiment_name()!r}")
        parent_id, tune_dir = previous.info.run_id, previous.data.tags["skd.tune_dir"]
        client.update_run(parent_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=name, tags={"skd.kind": "campaign", "skd.task": cfg.task,
                                                             "skd.code_version": tracking.code_version()})
        parent_id = run.info.run_id
        tune_dir = str(cfg.storage_path() / "tune" / f"{name}-{parent_id[:8]}")
        client.set_tag(parent_id, "skd.tune_dir", tune_dir)
        tracking.log_params(client, parent_id, {
            "search_space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in section.space.items()}),
            "scheduler": section.scheduler, "search": section.search, "num_samples": str(section.num_samples),
            "max_concurrent": str(section.max_concurrent), "metric": metric, "mode": section.mode,
            "seed": str(section.seed), "task": cfg.task, "student": f"{cfg.student.init}:{cfg.student.num_layers}",
            "teachers": ",".join(t.name for t in teachers)})
    status = "FAILED"
    started = time.perf_counter()
    ray_cfg = cfg.ray
    if ray_cfg.address is None and ray_cfg.num_cpus is None:
        # Measured on 2 cores: with only 2 logical CPUs the second trial's Ray Train worker never started
        # (its placement group stayed pending). Logical CPUs are scheduling tokens here (torch threads are
        # set explicitly), so give a local campaign cluster headroom.
        ray_cfg = ray_cfg.model_copy(update={"num_cpus": max(os.cpu_count() or 1, 2 * section.max_concurrent + 2)})
    with ray_session(ray_cfg):
        if cfg.distill.knowledge.cache_path is not None:  # trials read the offline cache: no teachers at all
            print(f"[skd] campaign {name}: knowledge from {cfg.distill.knowledge.cache_path}", flush=True)
            pool = None
        else:
            print(f"[skd] campaign {name}: one teacher pool shared by all trials", flush=True)
            pool = start_teacher_pool(cfg, teachers, list(range(len(teachers))), inputs.spec.is_regression,
                                      student_workers=cfg.ray.num_workers * section.max_concurrent)
        try:
            families = section.space["family"].extremes() if "family" in section.space else [plan.family]
            scores = student_rank_scores(cfg, inputs, plan, pool) if "student-rank" in families else None
            fn, extra = (pbt_trial_fn, {"interval": section.perturbation_interval}) \
                if section.scheduler == "pbt" else (trial_fn, {})
            trainable = tune.with_resources(
                tune.with_parameters(fn, base=absolute_raw(cfg), pool=pool, parent_run_id=parent_id,
                                     student_scores=scores, **extra), {"CPU": 0.01})  # the trial driver only waits
            if resume and tune.Tuner.can_restore(tune_dir):
                tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space={k: domain(d) for k, d in section.space.items()},
                    tune_config=tune.TuneConfig(metric=metric, mode=section.mode, num_samples=section.num_samples,
                                                scheduler=_scheduler(section),
                                                search_alg=_searcher(section),
                                                # random search limits concurrency itself (see _searcher)
                                                max_concurrent_trials=section.max_concurrent
                                                if section.search == "optuna" else None,
                                                # a fresh actor per trial: a reused one keeps the previous
                                                # trial's Ray Train controller and the next trainer stalls
                                                reuse_actors=False),
                    run_config=tune.RunConfig(name=Path(tune_dir).name, storage_path=str(Path(tune_dir).parent),
                                              # PBT trials report a checkpoint per segment: keep the newest
                                              checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
                                              verbose=1))
            grid = tuner.fit()
            trials = settle_trials(client, exp_id, grid, metric, section.mode)
            if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < section.num_samples:
                # Tune returns normally after Ctrl-C with its state saved; the campaign is not over
                status = "KILLED"
                raise SkdError(f"campaign {name} was interrupted after {grid.num_terminated} of "
                               f"{section.num_samples} trials; continue it with `skd tune -c CONFIG --resume`")
            scored = sorted((t for t in trials if t["metric"] is not None), key=lambda t: t["trial_id"])
            sign = 1.0 if section.mode == "max" else -1.0
            best = max(scored, key=lambda t: sign * t["metric"], default=None)  # ties: the earliest trial
            from tuning.report import log_campaign_report

            log_campaign_report(client, parent_id, trials, best, section, metric, teachers)
            status = "FINISHED"
            return CampaignResult(parent_id, exp_id, metric, trials, best, time.perf_counter() - started)
        finally:
            client.set_terminated(parent_id, status)
            if pool is not None:
                pool.shutdown()


def settle_trials(client, exp_id: str, grid, metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial, and child MLflow runs set to their true end: FINISHED (ran to the end), KILLED
    (stopped early by the scheduler) or FAILED (errored)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name.split("_")[1]
        runs = client.search_runs([exp_id], f"tags.`skd.trial_id` = '{trial_id}'", max_results=1)
        run = runs[0] if runs else None
        if result.error is not None:
            status = "FAILED"
        elif m.get("finished") or (run is not None and run.info.status == "FINISHED"):
            status = "FINISHED"  # ran to its last step (not Tune's "done": Tune sets it for stopped trials too)
        else:
            status = "KILLED"
        if run is not None and run.info.status != status:
            client.set_terminated(run.info.run_id, status)
        value = m.get(metric)
        gsnr = None
        if run is not None:
            hist = tracking.metric_history(client, run.info.run_id, "gsnr/all/mean")
            gsnr = hist[-1][1] if hist else None
        rows.append({"trial_id": trial_id, "run_id": run.info.run_id if run else "", "status": status,
                     "metric": value, "evaluations": m.get("training_iteration", 0), "step": m.get("step", 0),
                     "gsnr_mean": gsnr, "probs": run.data.params.get("distill.probs") if run else None,
                     **{f"param.{k}": v for k, v in (result.config or {}).items()}})
    return rows
