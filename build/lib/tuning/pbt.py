"""Population based training (PBT) segments: a trial trained in pieces so Tune can exploit and explore.

PBT needs what Ray Train V2's TuneReportCallback does not pass: a Tune checkpoint. A PBT trial
(`pbt_trial_fn`) therefore trains in segments, one per perturbation interval: each segment is a Ray Train
run of the same loop from the previous segment's checkpoint (`resume_from`, `stop_after`), logged into the
trial's one MLflow run, and ends with `tune.report(..., checkpoint=...)`. When PBT exploits, the trial
restarts from a better trial's checkpoint (model, optimizer, schedule and the sampler's generator state)
with perturbed values, so the sampling distribution can change during training (a curriculum over
teachers); each segment's values are logged as `hp/<name>` metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from actors.errors import SkdError
from actors.knowledge import KnowledgeSource
from orchestrator import tracking
from orchestrator.common.checkpointing import checkpoint_step
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill
from orchestrator.worker.spec import StepPlan
from orchestrator.driver.plan import make_plan
from orchestrator.config.tune import TuneSection
from tuning.space import domain, to_overrides


def segment_stops(steps: StepPlan, interval: int) -> list[int]:
    """Steps at which a PBT trial's segments end: every `interval`-th evaluation step, and the last step."""
    evals = sorted(steps.evals)
    return sorted(set(evals[interval - 1::interval]) | {steps.total})


def pbt_scheduler(section: TuneSection):
    """Tune's `PopulationBasedTraining` for the section's space: one Tune report per segment (= the
    perturbation interval's evaluations). Choices mutate as lists (PBT shifts them to a neighbouring value);
    ranges as domains (resampled or scaled by 0.8/1.2), then clamped back into the declared bounds."""
    from ray.tune.schedulers import PopulationBasedTraining

    space = section.space

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        return {k: space[k].clamp(v) if k in space else v for k, v in config.items()}

    mutations = {k: list(d.choice) if d.choice is not None else domain(d) for k, d in space.items()}
    return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                   hyperparam_mutations=mutations, quantile_fraction=section.quantile_fraction,
                                   custom_explore_fn=explore, synch=section.synch)


def _report_segment(client, run_id: str, config: dict[str, Any], start: int, res, total: int) -> None:
    """Log the segment's values (`hp/<name>` from `start`) and report its dev metrics and checkpoint to Tune."""
    from ray import tune

    values = {f"hp/{k}": float(v) for k, v in config.items() if isinstance(v, (int, float))}
    tracking.log_metrics(client, run_id, values, step=start)  # the values in force from `start` on
    client.set_tag(run_id, f"pbt.config.step{start:06d}", json.dumps(config, sort_keys=True))
    if res.checkpoint is None:
        raise SkdError(f"PBT segment {start}->{res.steps} of run {res.run_name} left no checkpoint")
    metrics = {"step": res.steps, "finished": float(res.steps >= total), **{f"dev/{k}": v for k, v in res.dev.items()}}
    if res.retention is not None:
        metrics["dev/retention"] = res.retention
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(res.checkpoint))


def pbt_trial_fn(config: dict[str, Any], *, base: dict[str, Any], pool: KnowledgeSource | None, parent_run_id: str,
                 student_scores: list[float] | None, interval: int) -> None:
    """One PBT trial: `skd distill`'s loop in segments of `interval` evaluations (see module docstring).

    Each segment reports the dev metrics and the segment's final Ray Train checkpoint to Tune; a trial that
    PBT restarts (exploit) or a restored campaign starts from `tune.get_checkpoint()`.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    # each segment's checkpoint goes to Tune (`_report_segment`), so no segment drops it; the folders are
    # removed here once Tune holds its copy
    cfg = load_config(None, [*to_overrides(config), f"mlflow.run_name=trial-{trial_id}",
                             "ray.keep_finished_checkpoints=true"], base=base)
    plan = make_plan(cfg)  # once for all the trial's segments
    client, exp_id = tracking.open_experiment(cfg.tracking_uri(), cfg.experiment_name())
    found = client.search_runs([exp_id], f"tags.`skd.trial_id` = '{trial_id}'", max_results=1)
    run_id = found[0].info.run_id if found else None  # a restarted trial keeps its one MLflow run
    start, ckpt_dir = 0, None
    checkpoint = tune.get_checkpoint()  # own (restored campaign) or a better trial's (PBT exploit)
    if checkpoint is not None:
        ckpt_dir = checkpoint.path  # in Tune's storage, which every node of a cluster reaches
        start = max(0, checkpoint_step(Path(ckpt_dir)))  # unreadable: the worker's verification names it
        if run_id is not None:
            client.set_tag(run_id, f"pbt.restored.step{start:06d}", checkpoint.path)
    previous_segment: Path | None = None
    tags = {"mlflow.parentRunId": parent_run_id, "skd.kind": "trial", "skd.trial_id": trial_id, "skd.scheduler": "pbt"}
    try:
        for stop in [s for s in segment_stops(plan.steps, interval) if s > start]:
            res = run_distill(cfg, resume_from=ckpt_dir, stop_after=stop if stop < plan.steps.total else None,
                              source=pool, student_scores=student_scores, register_as=None, continue_run=run_id,
                              plan=plan, extra_tags=tags)
            run_id = res.run_id
            _report_segment(client, run_id, config, start, res, plan.steps.total)
            if previous_segment is not None:  # Tune keeps its own copy of every reported checkpoint
                shutil.rmtree(previous_segment, ignore_errors=True)
            previous_segment = Path(res.checkpoint).parent
            ckpt_dir, start = res.checkpoint, res.steps
    finally:
        if previous_segment is not None:  # the last segment's Ray Train folder; Tune holds its checkpoint
            shutil.rmtree(previous_segment, ignore_errors=True)
