"""`skd tune`: a Ray Tune campaign over sampling distributions and KD settings, one shared teacher pool.

Top to bottom: validate the config and every search dimension's range and make the run plan (before
Ray); open the campaign's parent MLflow run; open ONE knowledge source for all trials (a teacher pool, or
the offline cache's reader); run the student-rank pre-pass once if the space can pick that family; run Tune (ASHA or FIFO; random or seeded Optuna TPE search), where each
trial runs `skd distill`'s own code with the shared pool and reports dev metrics at each evaluation
through Ray Train's TuneReportCallback; settle child-run statuses (stopped trials end KILLED); log the
campaign report to the parent run.

Each trial's function builds its own TorchTrainer (Tune wraps a driver function, never the trainer);
trial MLflow runs are named after the Tune trial id, so a restored campaign (`--resume`) reopens them
instead of creating duplicates.

PBT campaigns train each trial in segments (`tuning.pbt`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient

from actors.errors import ConfigError, SkdError
from actors.knowledge import KnowledgeSource
from actors.models import resolve_model
from orchestrator import tracking
from orchestrator.config import SkdConfig
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill, student_rank_scores
from orchestrator.driver.plan import RunPlan, make_plan
from orchestrator.driver.runner import find_resumable_run
from orchestrator.driver.runtime import ray_session
from orchestrator.driver.sources import open_source
from tuning.pbt import pbt_scheduler, pbt_trial_fn
from tuning.space import DISTRIBUTION_KEYS, KEYS, TuneSection, domain, to_overrides


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
    shaping = sorted(DISTRIBUTION_KEYS & set(section.space))
    if shaping and cfg.distill.strategy != "skd":
        raise ConfigError(f"tune.space {shaping} shape the SKD sampling distribution, which strategy "
                          f"{cfg.distill.strategy!r} does not draw from: set distill.strategy=skd, or search only "
                          f"KD settings (alpha, temperature, lr, outputs, ...) for this strategy")
    if cfg.distill.strategy == "no-kd":
        raise ConfigError("skd tune searches distillation settings, and distill.strategy no-kd distils nothing: "
                          "set distill.strategy to skd, average or single:<teacher>")


def source_config(cfg: SkdConfig, section: TuneSection) -> SkdConfig:
    """The config the campaign's shared knowledge source is made for: the run's, asking every knowledge output
    some trial may ask (`tune.space.outputs`), so that one teacher pool (eager attention where needed) or one
    cache serves every trial, and a cache without them is refused before Ray starts."""
    if "outputs" not in section.space:
        return cfg
    union = set(cfg.distill.knowledge.outputs).union(*map(set, section.space["outputs"].choice))
    return load_config(None, [f"distill.knowledge.outputs={sorted(union)}"], base=absolute_raw(cfg))


def trial_fn(config: dict[str, Any], *, base: dict[str, Any], pool: KnowledgeSource | None, parent_run_id: str,
             student_scores: list[float] | None) -> None:
    """One Tune trial: `skd distill` with the trial's values, the shared pool and a nested MLflow run."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = load_config(None, [*to_overrides(config), f"mlflow.run_name=trial-{trial_id}"], base=base)
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment_name())
    resume = exp is not None and find_resumable_run(client, exp.experiment_id, f"trial-{trial_id}") is not None
    run_distill(cfg, source=pool, resume=resume, student_scores=student_scores, report_to_tune=True,
                extra_tags={"mlflow.parentRunId": parent_run_id, "skd.kind": "trial", "skd.trial_id": trial_id},
                register_as=None)


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
    """ASHA (time in evaluations: one Tune report per dev evaluation), PBT (`tuning.pbt`) or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if section.scheduler == "pbt":
        return pbt_scheduler(section)
    if section.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration",
                             grace_period=section.grace_period, reduction_factor=section.reduction_factor)
    return FIFOScheduler()


def _open_campaign(cfg: SkdConfig, plan: RunPlan, section: TuneSection, metric: str, client, exp_id: str,
                   resume: bool) -> tuple[str, str]:
    """(parent MLflow run id, Tune folder): a new campaign run with its search space as params, or (resume)
    the newest unfinished campaign of this name.

    Raises:
        SkdError: `resume` with no unfinished campaign of that name.
    """
    name = cfg.mlflow.run_name or "campaign"
    if resume:
        previous = find_resumable_run(client, exp_id, name, tag="skd.tune_dir")
        if previous is None:
            raise SkdError(f"--resume: no unfinished campaign named {name!r} in experiment {cfg.experiment_name()!r}")
        client.update_run(previous.info.run_id, status="RUNNING")
        return previous.info.run_id, previous.data.tags["skd.tune_dir"]
    parent_id = client.create_run(exp_id, run_name=name, tags={"skd.kind": "campaign", "skd.task": cfg.task,
                                                              "skd.code_version": tracking.code_version()}).info.run_id
    tune_dir = str(cfg.storage_path() / "tune" / f"{name}-{parent_id[:8]}")
    client.set_tag(parent_id, "skd.tune_dir", tune_dir)
    tracking.log_params(client, parent_id, {
        "search_space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in section.space.items()}),
        "scheduler": section.scheduler, "search": section.search, "num_samples": str(section.num_samples),
        "max_concurrent": str(section.max_concurrent), "metric": metric, "mode": section.mode,
        "seed": str(section.seed), "task": cfg.task, "student": f"{cfg.student.init}:{cfg.student.num_layers}",
        "teachers": ",".join(plan.names)})
    return parent_id, tune_dir


def _tuner(section: TuneSection, metric: str, trainable, tune_dir: str, resume: bool):
    """The Tune `Tuner`: restored from `tune_dir` when resuming, else a new one with the section's space,
    searcher and scheduler (a fresh actor per trial: a reused one keeps the previous trial's Ray Train
    controller and the next trainer stalls)."""
    from ray import tune

    if resume and tune.Tuner.can_restore(tune_dir):
        return tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable, param_space={k: domain(d) for k, d in section.space.items()},
        tune_config=tune.TuneConfig(metric=metric, mode=section.mode, num_samples=section.num_samples,
                                    scheduler=_scheduler(section), search_alg=_searcher(section),
                                    # random search limits concurrency itself (see _searcher)
                                    max_concurrent_trials=section.max_concurrent if section.search == "optuna" else None,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=Path(tune_dir).name, storage_path=str(Path(tune_dir).parent),
                                  # PBT trials report a checkpoint per segment: keep the newest
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=3), verbose=1))


def _check_plan(plan: RunPlan, section: TuneSection) -> None:
    """A PBT perturbation interval must leave a perturbation point in the run's evaluations.

    Raises:
        ConfigError: naming `tune.perturbation_interval` and the fix.
    """
    evaluations = len(plan.steps.evals)
    if section.scheduler == "pbt" and section.perturbation_interval >= evaluations:
        raise ConfigError(f"tune.perturbation_interval: {section.perturbation_interval} evaluations leave no "
                          f"perturbation point in a run with {evaluations} evaluations; lower it or set "
                          f"distill.eval_every smaller")


def _local_cpus(cfg: SkdConfig, section: TuneSection):
    """The Ray settings of the campaign. Measured on 2 cores: with only 2 logical CPUs the second trial's Ray
    Train worker never started (its placement group stayed pending). Logical CPUs are scheduling tokens
    here (torch threads are set explicitly), so a local campaign cluster gets headroom."""
    if cfg.ray.address is None and cfg.ray.num_cpus is None:
        return cfg.ray.model_copy(update={"num_cpus": max(os.cpu_count() or 1, 2 * section.max_concurrent + 2)})
    return cfg.ray


def run_campaign(cfg: SkdConfig, *, resume: bool = False) -> CampaignResult:
    """Run (or with `resume`, continue) a tuning campaign; see the module docstring.

    Raises:
        SkdError: bad config, search space, data or teachers (before Ray), or `resume` with nothing to resume.
    """
    from ray import tune

    section = cfg.tune or TuneSection()
    validate_space(cfg, section)
    plan = make_plan(source_config(cfg, section))  # a bad request or a missing/mismatched cache fails here, before Ray
    _check_plan(plan, section)
    metric = section.metric or f"dev/{plan.inputs.spec.metric}"
    client, exp_id = tracking.open_experiment(cfg.tracking_uri(), cfg.experiment_name())
    parent_id, tune_dir = _open_campaign(cfg, plan, section, metric, client, exp_id, resume)
    name = cfg.mlflow.run_name or "campaign"
    status, started = "FAILED", time.perf_counter()
    try:
        with ray_session(_local_cpus(cfg, section)):
            everyone = list(range(len(plan.teachers)))
            resources = plan.resources(ray.cluster_resources(), len(everyone) if plan.uses_teacher_actors else 0,
                                       cfg.ray.num_workers * section.max_concurrent)
            print(f"[skd] campaign {name}: knowledge from "
                  f"{plan.knowledge.cache or 'one teacher pool shared by all trials'}", flush=True)
            with open_source(plan, resources, everyone) as pool:
                families = section.space["family"].extremes() if "family" in section.space else [plan.family]
                scores = student_rank_scores(plan, pool, resources) if "student-rank" in families else None
                fn, extra = (pbt_trial_fn, {"interval": section.perturbation_interval}) \
                    if section.scheduler == "pbt" else (trial_fn, {})
                trainable = tune.with_resources(  # the trial driver only waits
                    tune.with_parameters(fn, base=absolute_raw(cfg), pool=pool, parent_run_id=parent_id,
                                         student_scores=scores, **extra), {"CPU": 0.01})
                grid = _tuner(section, metric, trainable, tune_dir, resume).fit()
        trials = settle_trials(client, exp_id, grid, metric, section.mode)
        if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < section.num_samples:
            # Tune returns normally after Ctrl-C with its state saved; the campaign is not over
            status = "KILLED"
            raise SkdError(f"campaign {name} was interrupted after {grid.num_terminated} of "
                           f"{section.num_samples} trials; continue it with `skd tune -c CONFIG --resume`")
        best = _best(trials, section.mode)
        from tuning.report import log_campaign_report

        log_campaign_report(client, parent_id, trials, best, section, metric, plan.teachers)
        status = "FINISHED"
        return CampaignResult(parent_id, exp_id, metric, trials, best, time.perf_counter() - started)
    finally:
        client.set_terminated(parent_id, status)


def _best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best scored trial (ties: the earliest trial id)."""
    scored = sorted((t for t in trials if t["metric"] is not None), key=lambda t: t["trial_id"])
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda t: sign * t["metric"], default=None)


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
