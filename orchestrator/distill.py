"""`skd distill`: the main job.

Top to bottom: validate everything (config, data, teachers manifest, tokenizer vocabularies, sampling
distribution) before Ray; connect to Ray; start the teacher pool (only the teachers this strategy asks);
for student-rank, run or reuse the single-teacher pre-pass; train the student under Ray Train with
stochastic teacher sampling; log the distribution plot and learning curves; stop the pool.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.knowledge import KnowledgeRequest
from actors.manifest import TeacherInfo, read_manifest, validate_teachers
from actors.pool import PlacementPlan, TeacherPool
from orchestrator import tracking
from orchestrator.config import SkdConfig, flatten
from actors.errors import ConfigError
from orchestrator.runner import Inputs, RunResult, make_spec, prepare_inputs, run_training
from orchestrator.runtime import cluster_gpus, ray_session
from orchestrator.sampling import TeacherSampler, sampling_distribution


@dataclass
class Plan:
    """What a distill run will do, resolved and validated before Ray starts.

    Attributes:
        strategy: "skd", "average" or "no-kd" (single:<name> becomes skd with a one-hot p).
        teachers: the ensemble (manifest entries in config order), [] for no-kd without a manifest.
        probs: [N] sampling distribution (None until the student-rank pre-pass for that family).
        active: teacher indices whose actors must run.
        run_name: MLflow run name (and the `--resume` key).
    """

    strategy: str
    teachers: list[TeacherInfo]
    probs: list[float] | None
    active: list[int]
    run_name: str
    family: str


def default_run_name(cfg: SkdConfig) -> str:
    """e.g. skd-uniform-s0, skd-teacher-rank-s1, single-minilm-l6-s0, average-s0, no-kd-s2."""
    if cfg.mlflow.run_name:
        return cfg.mlflow.run_name
    d = cfg.distill
    base = f"skd-{d.distribution.family}" if d.strategy == "skd" else d.strategy.replace(":", "-")
    return f"{base}-s{d.seed}"


def plan_run(cfg: SkdConfig, inputs: Inputs) -> Plan:
    """Resolve strategy, teachers and distribution; every input error surfaces here, before Ray.

    Raises:
        TeacherError: manifest or checkpoints missing, task/label/vocabulary mismatch.
        ConfigError: an invalid distribution (negative or all-zero weights).
    """
    d = cfg.distill
    names = [m.name for m in cfg.teachers.members]
    path = cfg.manifest_path()
    if d.strategy == "no-kd" and not path.is_file():
        teachers: list[TeacherInfo] = []  # no teachers needed; retention is not reported
    else:
        teachers = validate_teachers(read_manifest(path), names, cfg.task, inputs.spec.num_labels, inputs.vocab)
    probs, active, family = None, [], d.distribution.family
    if d.strategy.startswith("single:"):
        k = names.index(d.strategy[7:])
        probs, active, family = [float(i == k) for i in range(len(names))], [k], "single"
    elif d.strategy == "average":
        active, family = list(range(len(names))), "average"
    elif d.strategy == "skd":
        if family != "student-rank":
            probs = sampling_distribution(d.distribution, names, [t.dev_metric for t in teachers],
                                          [t.parameters for t in teachers]).tolist()
            TeacherSampler(probs, d.seed)  # validates p
            active = [i for i, p in enumerate(probs) if p > 0]
        else:
            active = list(range(len(names)))
    else:
        family = "none"
    return Plan("skd" if d.strategy.startswith("single:") else d.strategy, teachers, probs, active,
                default_run_name(cfg), family)


def knowledge_fields(cfg: SkdConfig, inputs: Inputs, plan: Plan, soft_labels_only: bool = False) -> dict[str, Any]:
    """`TrainSpec` settings for the run's knowledge: the request, IR schedule and weights, teacher widths,
    and, with `distill.knowledge.source: cache:PATH`, the cache and its expected fingerprint.

    The schedule and the cache are checked here, on the driver, so a schedule too long for the run or a
    missing, partial or mismatched cache is a clear error before any Ray resources are taken. A cache
    holding more outputs than the run uses (e.g. hidden + attentions + cls for a soft-label run) serves it.

    Args:
        soft_labels_only: ask for logits only (student-rank pre-passes score soft-label distillation).

    Raises:
        ConfigError: an invalid request or schedule; CacheError: the cache is missing, partial or built for
            another setup.
    """
    from actors.cache import KnowledgeCache
    from orchestrator.knowledge_cache import cache_fingerprint, knowledge_request
    from orchestrator.schedule import stage_at
    from orchestrator.train_loop import plan_steps

    if plan.strategy not in ("skd", "average"):
        return {}
    kn = cfg.distill.knowledge
    request = KnowledgeRequest(wire_dtype=kn.wire_dtype) if soft_labels_only else knowledge_request(cfg, inputs)
    if request.needs_layers:
        d = cfg.distill
        _, total = plan_steps(len(inputs.train), d.batch_size, cfg.ray.num_workers, d.epochs, d.max_steps)
        try:
            stage_at(0, total, kn.schedule, request.student_layers, kn.ir_fraction)
        except ValueError as exc:
            raise ConfigError(f"distill.knowledge: {exc}") from None
    fields: dict[str, Any] = {
        "request": request, "schedule": kn.schedule if request.needs_layers else "none",
        "ir_fraction": kn.ir_fraction,
        "ir_weights": {"hidden": kn.hidden_weight, "attentions": kn.attention_weight, "cls": kn.cls_weight},
        "teacher_widths": [t.hidden_size for t in plan.teachers]}
    if kn.cache_path is not None:
        fingerprint = cache_fingerprint(cfg, inputs, plan.teachers, request)
        built = KnowledgeCache.open(kn.cache_path)  # missing or partial caches fail here
        cached = built.manifest["fingerprint"].get("request", {})
        built.close()
        wanted = fingerprint["request"]
        if not request.needs_layers and cached.get("wire_dtype") == wanted["wire_dtype"]:
            fingerprint["request"] = cached  # soft labels only: any cache of these teachers and rows serves
        elif set(wanted["outputs"]) <= set(cached.get("outputs", [])):
            wanted["outputs"] = list(cached["outputs"])  # fewer outputs; every selection setting must match
        KnowledgeCache.open(kn.cache_path, fingerprint).close()
        fields.update(knowledge_cache=str(kn.cache_path), cache_fingerprint=fingerprint)
    return fields


def _prepass_key(cfg: SkdConfig, teacher: TeacherInfo) -> str:
    """Identifies a student-rank pre-pass result: same teacher checkpoint, student, data and steps."""
    blob = json.dumps({"teacher": teacher.checkpoint, "metric": teacher.dev_metric, "student": cfg.student.model_dump(),
                       "data": cfg.data.model_dump(mode="json"), "steps": cfg.distill.distribution.prepass_steps,
                       "alpha": cfg.distill.alpha, "T": cfg.distill.temperature, "lr": cfg.distill.lr,
                       "seed": cfg.distill.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def student_rank_scores(cfg: SkdConfig, inputs: Inputs, plan: Plan, pool: TeacherPool) -> list[float]:
    """Dev metric of a short student run distilled from each teacher alone (the student-rank scores).

    Each pre-pass is an MLflow run tagged `skd.prepass_key`; a FINISHED run with the same key is reused
    instead of retrained.
    """
    uri = cfg.tracking_uri()
    client = tracking.MlflowClient(uri)
    exp_id = tracking.ensure_experiment(uri, cfg.experiment_name(), tracking.default_artifact_root(uri))
    metric = inputs.spec.metric
    scores = []
    for k, t in enumerate(plan.teachers):
        key = _prepass_key(cfg, t)
        found = client.search_runs([exp_id], f"tags.`skd.prepass_key` = '{key}' and attributes.status = 'FINISHED'",
                                   max_results=1)
        if found and f"dev/{metric}" in found[0].data.metrics:
            score = found[0].data.metrics[f"dev/{metric}"]
            print(f"[skd] student-rank pre-pass for {t.name}: reusing run {found[0].info.run_id} ({metric} {score:.4f})")
        else:
            probs = [float(i == k) for i in range(len(plan.teachers))]
            spec = make_spec(cfg, inputs, cfg.distill, model_init=cfg.student.init, num_layers=cfg.student.num_layers,
                             strategy="skd", probs=probs, pool=pool, teacher_names=[x.name for x in plan.teachers],
                             threads=int(cfg.ray.cpus_per_worker), max_steps=cfg.distill.distribution.prepass_steps,
                             eval_every=cfg.distill.distribution.prepass_steps,
                             **knowledge_fields(cfg, inputs, plan, soft_labels_only=True))
            res = run_training(cfg, spec, run_name=f"prepass-{t.name}", model_out=cfg.out_dir() / "prepass" / t.name,
                               params={"prepass.teacher": t.name, "prepass.steps": str(spec.max_steps)},
                               tags={"skd.kind": "prepass", "skd.prepass_key": key, "skd.task": cfg.task,
                                     "skd.teacher": t.name})
            score = res.dev[metric]
        scores.append(score)
    return scores


def _figures(plan: Plan, metric: str):
    def make(client, run_id: str, result: RunResult, tmp: Path) -> list[Path]:
        figs = []
        names = [t.name for t in plan.teachers]
        if plan.probs is not None and names:
            counts = [result.counts.get(n, 0) for n in names]
            figs.append(tracking.plot_distribution(names, plan.probs, counts, tmp / "sampling_distribution.png"))
        curves = {k: tracking.metric_history(client, run_id, k)
                  for k in ("train/loss", f"dev/{metric}", "train/samples_per_s")}
        figs.append(tracking.plot_learning_curves(curves, tmp / "learning_curves.png"))
        return figs
    return make


def start_teacher_pool(cfg: SkdConfig, teachers: list[TeacherInfo], active: list[int], regression: bool,
                       student_workers: int | None = None, wait: bool = True) -> TeacherPool:
    """Start the actors of `active` teachers with the config's resources (one GPU each when the cluster
    has GPUs and `teachers.num_gpus` is auto), after checking the placement of teachers and student workers.
    With wait=False the teachers load in the background (see `TeacherPool.start`).

    Raises:
        SkdError: the cluster cannot hold the teachers plus `student_workers` (default `ray.num_workers`), or
            (wait=True) a teacher failed to load.
    """
    tc = cfg.teachers
    gpus = (1.0 if cluster_gpus() > 0 else 0.0) if tc.num_gpus == "auto" else float(tc.num_gpus)
    worker_gpus = 1.0 if cfg.ray.use_gpu is True or (cfg.ray.use_gpu == "auto" and cluster_gpus() > 0) else 0.0
    workers = cfg.ray.num_workers if student_workers is None else student_workers
    placement = PlacementPlan(len(active), tc.num_cpus, gpus, workers, cfg.ray.cpus_per_worker, worker_gpus)
    print(f"[skd] starting {len(active)} teacher actor(s): {', '.join(teachers[i].name for i in active)}", flush=True)
    return TeacherPool.start(teachers, active, num_cpus=tc.num_cpus, num_gpus=gpus, threads=tc.threads,
                             regression=regression, plan=placement,
                             attn_implementation="eager" if cfg.distill.knowledge.needs_attentions else None,
                             wait=wait)


def run_distill(cfg: SkdConfig, *, resume: bool = False, resume_from: str | None = None,
                stop_after: int | None = None, pool: TeacherPool | None = None,
                student_scores: list[float] | None = None, report_to_tune: bool = False,
                extra_tags: dict[str, str] | None = None, register_as: str | None = "default",
                continue_run: str | None = None, inputs: Inputs | None = None) -> RunResult:
    """The main job (see module docstring).

    Args:
        cfg: validated config.
        resume: continue the newest unfinished run of this name from its latest checkpoint.
        resume_from: start from this checkpoint folder instead (a new MLflow run).
        stop_after: stop after this many steps, leaving the run resumable (status KILLED).
        pool: an existing teacher pool to use (Tune campaigns share one); default: start and stop one.
        student_scores: precomputed student-rank scores (a campaign computes them once for all trials).
        report_to_tune: forward dev metrics to the enclosing Ray Tune trial.
        extra_tags: more MLflow tags (a trial's parent run, trial id).
        register_as: MLflow registered-model name for the student; "default" = skd-<task>-student, None = log only.
        continue_run: log into this existing MLflow run with a fresh Ray Train run from `resume_from` (the
            next segment of a PBT trial); params are not logged again.
        inputs: already tokenized inputs (a PBT trial prepares them once for all its segments).

    Returns:
        `RunResult` with dev metrics, retention, wall time, throughput and per-teacher counts.

    Raises:
        SkdError (ConfigError, DataError, TeacherError): bad input, before any Ray resources are taken.
    """
    inputs = inputs or prepare_inputs(cfg, cfg.student.init)
    plan = plan_run(cfg, inputs)
    best = max((t.dev_metric for t in plan.teachers), default=None)
    knowledge = knowledge_fields(cfg, inputs, plan)  # opens and checks a cache before Ray starts
    with ray_session(cfg.ray):
        own_pool = pool is None and plan.active and "knowledge_cache" not in knowledge
        if own_pool:  # teachers load while Ray Train starts the student's workers
            pool = start_teacher_pool(cfg, plan.teachers, plan.active, inputs.spec.is_regression, wait=False)
        try:
            if plan.family == "student-rank":
                scores = student_scores or student_rank_scores(cfg, inputs, plan, pool)
                plan.probs = sampling_distribution(cfg.distill.distribution, [t.name for t in plan.teachers],
                                                   [t.dev_metric for t in plan.teachers],
                                                   [t.parameters for t in plan.teachers], scores).tolist()
            spec = make_spec(cfg, inputs, cfg.distill, model_init=cfg.student.init,
                             num_layers=cfg.student.num_layers, strategy=plan.strategy, probs=plan.probs,
                             pool=pool, teacher_names=[t.name for t in plan.teachers], best_teacher_metric=best,
                             threads=int(cfg.ray.cpus_per_worker), stop_after=stop_after, resume_from=resume_from,
                             **knowledge)
            params = flatten(cfg)
            params["distill.probs"] = json.dumps([round(p, 6) for p in plan.probs]) if plan.probs else "none"
            tags = {"skd.kind": "distill", "skd.task": cfg.task, "skd.strategy": cfg.distill.strategy,
                    "skd.distribution": plan.family, **(extra_tags or {})}
            return run_training(cfg, spec, run_name=plan.run_name, tags=tags, params=params, resume=resume,
                                model_out=cfg.out_dir() / "students" / plan.run_name,
                                figures=_figures(plan, inputs.spec.metric), report_to_tune=report_to_tune,
                                register_as=f"skd-{cfg.task}-student" if register_as == "default" else register_as,
                                continue_run=continue_run)
        except Exception:
            if own_pool:  # a teacher that failed to load explains a failed pre-pass or training run best
                pool.check_loaded(timeout_s=5.0)
            raise
        finally:
            if own_pool:
                pool.shutdown()

