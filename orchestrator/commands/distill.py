"""`skd distill`: the main job.

Top to bottom: make the run plan (config, data, teachers manifest, tokenizer vocabularies, sampling
distribution, steps, knowledge request and cache: every input error surfaces here, before Ray); connect to
Ray; open the knowledge source (the teachers this strategy asks for, or the offline cache); for
student-rank, run or reuse the single-teacher pre-passes; train the student under Ray Train with
stochastic teacher sampling; log the distribution plot and learning curves; release the source.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import ray

from actors.knowledge import KnowledgeSource
from actors.manifest import TeacherInfo
from orchestrator import tracking
from orchestrator.tracking import plots
from orchestrator.driver import lineage
from orchestrator.config import SkdConfig, flatten
from orchestrator.driver.plan import Resources, RunPlan, make_plan
from orchestrator.driver.runner import RunResult, distill_spec, run_training
from orchestrator.driver.runtime import ray_session
from orchestrator.driver.sources import open_source


def _prepass_key(cfg: SkdConfig, teacher: TeacherInfo) -> str:
    """Identifies a student-rank pre-pass result: same teacher checkpoint, student, data and steps."""
    blob = json.dumps({"teacher": teacher.checkpoint, "metric": teacher.dev_metric, "student": cfg.student.model_dump(),
                       "data": cfg.data.model_dump(mode="json"), "steps": cfg.distill.distribution.prepass_steps,
                       "alpha": cfg.distill.alpha, "T": cfg.distill.temperature, "lr": cfg.distill.lr,
                       "seed": cfg.distill.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def student_rank_scores(plan: RunPlan, source: KnowledgeSource | None, resources: Resources | None) -> list[float]:
    """Dev metric of a short student run distilled from each teacher alone (the student-rank scores of
    SKDBERT's student-rank distribution), [N] in ensemble order.

    Each pre-pass is an MLflow run tagged `skd.prepass_key`; a FINISHED run with the same key is reused
    instead of retrained (then `source` and `resources` are not needed).
    """
    cfg, metric = plan.cfg, plan.inputs.spec.metric
    client, exp_id = tracking.open_experiment(cfg.tracking_uri(), cfg.experiment_name())
    scores = []
    for k, t in enumerate(plan.teachers):
        key = _prepass_key(cfg, t)
        found = client.search_runs([exp_id], f"tags.`skd.prepass_key` = '{key}' and attributes.status = 'FINISHED'",
                                   max_results=1)
        if found and f"dev/{metric}" in found[0].data.metrics:
            score = found[0].data.metrics[f"dev/{metric}"]
            print(f"[skd] student-rank pre-pass for {t.name}: reusing run {found[0].info.run_id} ({metric} {score:.4f})")
        else:
            prepass = plan.prepass(k)
            res = run_training(cfg, distill_spec(prepass, source), run_name=prepass.run_name,
                               model_out=cfg.out_dir() / "prepass" / t.name, use_gpu=resources.use_gpu,
                               params={"prepass.teacher": t.name, "prepass.steps": str(prepass.steps.total)},
                               tags={"skd.kind": "prepass", "skd.prepass_key": key, "skd.task": cfg.task,
                                     "skd.teacher": t.name})
            score = res.dev[metric]
        scores.append(score)
    warning = tied_scores_warning(scores, metric, cfg.distill.distribution.prepass_steps)
    if warning:
        print(f"[skd] warning: {warning}", flush=True)
    return scores


def tied_scores_warning(scores: list[float], metric: str, steps: int) -> str | None:
    """The warning for student-rank pre-pass scores that are all equal (to 6 decimals): rank ties make p
    uniform, typically because `steps` were too few for any student to leave the majority class. None when
    the scores differ or there is one teacher."""
    if len(scores) < 2 or len({round(s, 6) for s in scores}) > 1:
        return None
    return (f"every student-rank pre-pass scored {metric} {scores[0]:.4f} after {steps} steps, so the ranks tie "
            f"and p is uniform; raise distill.distribution.prepass_steps (e.g. one epoch) for pre-passes that "
            f"tell the teachers apart")


def _headline(plan: RunPlan):
    """The saved student's headline against the best teacher (`orchestrator.commands.speed.headline`), or None for
    an ensemble without teachers."""
    best = plan.best_teacher
    if best is None:
        return None

    def measure(result) -> dict[str, float]:
        from orchestrator.commands.speed import headline

        return headline(result.model_dir, Path(best.checkpoint), best.parameters, result.retention, plan.cfg.task,
                        plan.cfg.data, plan.inputs.spec.num_labels)
    return measure


def _figures(plan: RunPlan):
    """The run's plots: sampling distribution vs observed teacher shares, p over the steps (adaptive), and
    learning curves."""
    metric = plan.inputs.spec.metric

    def make(client, run_id: str, result: RunResult, tmp: Path) -> list[Path]:
        figs = []
        if plan.probs is not None and plan.teachers:
            counts = [result.counts.get(n, 0) for n in plan.names]
            figs.append(plots.plot_distribution(plan.names, plan.probs, counts, tmp / "sampling_distribution.png"))
        if plan.family == "adaptive":
            history = {n: tracking.metric_history(client, run_id, f"sampler/p/{n}") for n in [*plan.names, *(
                n for n in result.probs if n not in plan.names)]}
            figs.append(plots.plot_p_over_time(history, tmp / "sampling_p_over_time.png"))
        curves = {k: tracking.metric_history(client, run_id, k)
                  for k in ("train/loss", f"dev/{metric}", "train/samples_per_s")}
        figs.append(plots.plot_learning_curves(curves, tmp / "learning_curves.png"))
        return figs
    return make


def run_distill(cfg: SkdConfig, *, resume: bool = False, resume_from: str | None = None,
                stop_after: int | None = None, source: KnowledgeSource | None = None,
                student_scores: list[float] | None = None, report_to_tune: bool = False,
                extra_tags: dict[str, str] | None = None, register_as: str | None = None,
                continue_run: str | None = None, plan: RunPlan | None = None) -> RunResult:
    """The main job (see module docstring).

    Args:
        cfg: validated config.
        resume: continue the newest unfinished run of this name from its latest checkpoint.
        resume_from: start from this checkpoint folder instead (a new MLflow run).
        stop_after: stop after this many steps, leaving the run resumable (status KILLED).
        source: a knowledge source to share (a campaign's or comparison's teacher pool); default: open the
            plan's own (teacher pool or cache) and release it at the end.
        student_scores: precomputed student-rank scores (a campaign computes them once for all trials).
        report_to_tune: forward dev metrics to the enclosing Ray Tune trial.
        extra_tags: more MLflow tags (a trial's parent run, trial id).
        register_as: register the finished student in the MLflow Model Registry under this name (`skd distill`
            passes `cfg.registered_model_name()`); None: log the model to its run only.
        continue_run: log into this existing MLflow run with a fresh Ray Train run from `resume_from` (the
            next segment of a PBT trial); params are not logged again.
        plan: the run plan, already made from `cfg` (a PBT trial makes it once for all its segments).

    Returns:
        `RunResult` with dev metrics, retention, wall time, throughput and per-teacher counts.

    Raises:
        SkdError (ConfigError, DataError, TeacherError, CacheError): bad input, before any Ray resources are taken.
    """
    began = time.perf_counter()
    plan = plan or make_plan(cfg)
    timings = {"time/plan_s": time.perf_counter() - began}
    tracking.check_store(cfg.tracking_uri())  # an unreachable store fails here, before any Ray resource
    began = time.perf_counter()
    with ray_session(cfg.ray):
        timings["time/ray_start_s"] = time.perf_counter() - began
        own_pool = source is None and plan.uses_teacher_actors
        resources = plan.resources(ray.cluster_resources(), len(plan.active) if own_pool else 0)
        # teachers load while Ray Train starts the student's workers
        with open_source(plan, resources, shared=source, wait=False,
                         resuming=resume or resume_from is not None) as knowledge:
            if plan.family == "student-rank":
                plan = plan.with_student_scores(student_scores or student_rank_scores(plan, knowledge, resources))
            params = flatten(cfg)
            params["distill.probs"] = json.dumps([round(p, 6) for p in plan.probs]) if plan.probs else "none"
            params.update({**lineage.teacher_params(plan), **lineage.data_params(plan)})
            tags = {"skd.kind": "distill", "skd.task": cfg.task, "skd.strategy": cfg.distill.strategy,
                    "skd.distribution": plan.family, **lineage.lineage_tags(plan),
                    "mlflow.note.content": lineage.description(plan), **(extra_tags or {})}
            return run_training(cfg, distill_spec(plan, knowledge, stop_after=stop_after, resume_from=resume_from),
                                run_name=plan.run_name, tags=tags, params=params, resume=resume,
                                model_out=plan.student_dir, use_gpu=resources.use_gpu,
                                figures=_figures(plan), report_to_tune=report_to_tune,
                                register_as=register_as, continue_run=continue_run, timings=timings,
                                card=lambda result: lineage.model_card(plan, result),
                                headline=None if report_to_tune else _headline(plan))  # not per Tune trial
