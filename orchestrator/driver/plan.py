"""The run plan: what a run will do, resolved and validated once on the driver before Ray starts.

`make_plan` reads the teachers manifest, checks it against the task, tokenizes for each teacher tokenizer, turns
the strategy into a sampling distribution (SKDBERT, Ding et al. 2023), counts the steps, evaluations and
checkpoints, and plans the knowledge (request, schedule, cache). `distill`, `compare`, every `tune`
trial, `cache build` and the student-rank pre-pass consume a `RunPlan`; nothing downstream recomputes
any of it. `RunPlan.resources` turns the resource settings into a `PlacementPlan` once a cluster is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from actors.knowledge import KnowledgeRequest
from actors.manifest import TeacherInfo, read_manifest, validate_teachers
from actors.pool import PlacementPlan
from orchestrator.config import RayConfig, SkdConfig
from actors.models import check_cut
from orchestrator.driver.inputs import Inputs, prepare_inputs
from orchestrator.driver.views import with_views
from orchestrator.worker.spec import KnowledgePlan, StepPlan
from orchestrator.driver.knowledge_plan import plan_knowledge
from orchestrator.driver.outputs import check_output
from orchestrator.common.sampling import TeacherSampler, capacities, sampling_distribution


@dataclass(frozen=True)
class Resources:
    """Resources resolved against a cluster: per teacher actor, per student worker, and the placement check.

    Attributes:
        teacher_cpus / teacher_gpus: logical CPUs and GPUs per teacher actor; teacher_threads: torch threads.
        worker_gpus: GPUs per student worker (1.0 with `ray.use_gpu` true, or auto on a cluster with GPUs).
        placement: teachers plus student workers, checked before any actor starts.
        attn_implementation: "eager" when teachers must return attentions, else None (sdpa).
    """

    teacher_cpus: float
    teacher_gpus: float
    teacher_threads: int
    worker_gpus: float
    placement: PlacementPlan
    attn_implementation: str | None

    @property
    def use_gpu(self) -> bool:
        """Whether student workers train on a GPU."""
        return self.worker_gpus > 0


def student_gpus(ray_cfg: RayConfig, cluster: dict[str, float]) -> float:
    """GPUs per student worker: 1.0 with `ray.use_gpu: true`, or with `auto` on a cluster that has GPUs."""
    return 1.0 if ray_cfg.use_gpu is True or (ray_cfg.use_gpu == "auto" and cluster.get("GPU", 0.0) > 0) else 0.0


@dataclass(frozen=True)
class RunPlan:
    """What a distill run will do, resolved before Ray starts.

    Attributes:
        cfg: the validated config; inputs: the tokenized splits.
        strategy: "skd", "average" or "no-kd" (`single:<name>` becomes skd with a one-hot p).
        family: the distribution family ("uniform", ..., "single", "average", "none").
        teachers: the ensemble (manifest entries in config order); [] for no-kd without a manifest.
        probs: [N] sampling distribution; None for average/no-kd and until the student-rank pre-pass.
        active: teacher indices whose actors must run.
        run_name: MLflow run name (and the `--resume` key).
        steps: the step arithmetic; knowledge: None for no-kd.
    """

    cfg: SkdConfig
    inputs: Inputs
    strategy: str
    family: str
    teachers: list[TeacherInfo]
    probs: list[float] | None
    active: list[int]
    run_name: str
    steps: StepPlan
    knowledge: KnowledgePlan | None

    @property
    def names(self) -> list[str]:
        """Teacher names in ensemble order."""
        return [t.name for t in self.teachers]

    @property
    def student_dir(self) -> Path:
        """Where the final student's `save_pretrained` folder goes: <output_dir>/students/<run name>."""
        return self.cfg.out_dir() / "students" / self.run_name

    @property
    def best_teacher(self):
        """The `TeacherInfo` with the best dev metric (the reference of retention and the headline); None
        without teachers."""
        return max(self.teachers, key=lambda t: t.dev_metric, default=None)

    @property
    def best_teacher_metric(self) -> float | None:
        """The best teacher's dev metric (the denominator of retention); None without teachers."""
        return None if self.best_teacher is None else self.best_teacher.dev_metric

    @property
    def uses_teacher_actors(self) -> bool:
        """Whether the run starts teacher actors of its own (some teacher is active, knowledge is neither
        cached nor served by a pool the run attaches to)."""
        return (bool(self.active) and self.knowledge is not None and self.knowledge.cache is None
                and not self.cfg.teachers.pool)

    def with_student_scores(self, scores: list[float]) -> "RunPlan":
        """The plan with the student-rank distribution computed from pre-pass scores, [N]."""
        d = self.cfg.distill.distribution
        probs = sampling_distribution(d, self.names, [t.dev_metric for t in self.teachers],
                                      capacities(d, self.teachers), scores).tolist()
        return dataclasses.replace(self, probs=probs)

    def resources(self, cluster: dict[str, float], teachers: int, student_workers: int | None = None) -> Resources:
        """Resolve the resource settings against `cluster` (`ray.cluster_resources()`).

        Args:
            teachers: teacher actors to place (0 when the run uses a shared pool or the cache).
            student_workers: student workers running beside the teachers (default `ray.num_workers`; a
                campaign passes workers x concurrent trials, a cache build 0).
        """
        tc, rc = self.cfg.teachers, self.cfg.ray
        teacher_gpus = (1.0 if cluster.get("GPU", 0.0) > 0 else 0.0) if tc.num_gpus == "auto" else float(tc.num_gpus)
        worker_gpus = student_gpus(rc, cluster)
        workers = rc.num_workers if student_workers is None else student_workers
        placement = PlacementPlan(teachers, tc.num_cpus, teacher_gpus, workers, rc.cpus_per_worker, worker_gpus,
                                  dict(tc.resources), dict(rc.resources_per_worker), tc.placement)
        return Resources(tc.num_cpus, teacher_gpus, tc.threads, worker_gpus, placement,
                         "eager" if self.cfg.distill.knowledge.needs_attentions else None)

    def prepass(self, k: int) -> "RunPlan":
        """The student-rank pre-pass of teacher k: soft labels from k alone for `prepass_steps` steps, one
        evaluation at the end, run name `prepass-<teacher>`. The knowledge plan keeps this plan's checked
        cache fingerprint (a cache that serves the run serves its soft labels)."""
        cfg, d = self.cfg, self.cfg.distill
        n = d.distribution.prepass_steps
        steps = StepPlan.make(len(self.inputs.train), d.batch_size, cfg.ray.num_workers, d.epochs, n, n,
                              d.checkpoint_every)
        soft = KnowledgeRequest(wire_dtype=self.knowledge.request.wire_dtype)
        return dataclasses.replace(self, strategy="skd", family="single", active=[k], steps=steps,
                                   probs=[float(i == k) for i in range(len(self.teachers))],
                                   knowledge=dataclasses.replace(self.knowledge, request=soft, schedule="none"),
                                   run_name=f"prepass-{self.teachers[k].name}")


def default_run_name(cfg: SkdConfig) -> str:
    """e.g. skd-uniform-s0, skd-teacher-rank-s1, single-minilm-l6-s0, average-s0, no-kd-s2."""
    if cfg.mlflow.run_name:
        return cfg.mlflow.run_name
    d = cfg.distill
    base = f"skd-{d.distribution.family}" if d.strategy == "skd" else d.strategy.replace(":", "-")
    return f"{base}-s{d.seed}"


def load_teachers(cfg: SkdConfig, inputs: Inputs) -> list[TeacherInfo]:
    """The configured teachers from the manifest, checked against the task.

    Raises:
        TeacherError: manifest or checkpoints missing, task/label mismatch.
    """
    names = [m.name for m in cfg.teachers.members]
    return validate_teachers(read_manifest(cfg.manifest_path()), names, cfg.task, inputs.spec.num_labels)


def _distribution(cfg: SkdConfig, teachers: list[TeacherInfo]) -> tuple[str, str, list[float] | None, list[int]]:
    """(strategy, family, p, active teachers) of the config's strategy; p is checked by `TeacherSampler`."""
    d = cfg.distill
    names = [m.name for m in cfg.teachers.members]
    if d.strategy.startswith("single:"):
        k = names.index(d.strategy[7:])
        return "skd", "single", [float(i == k) for i in range(len(names))], [k]
    if d.strategy == "average":
        return "average", "average", None, list(range(len(names)))
    if d.strategy != "skd":
        return "no-kd", "none", None, []
    if d.distribution.family == "student-rank":
        return "skd", "student-rank", None, list(range(len(names)))
    probs = sampling_distribution(d.distribution, names, [t.dev_metric for t in teachers],
                                  capacities(d.distribution, teachers)).tolist()
    TeacherSampler(probs, d.seed)  # validates p
    return "skd", d.distribution.family, probs, [i for i, p in enumerate(probs) if p > 0]


def make_plan(cfg: SkdConfig, inputs: Inputs | None = None) -> RunPlan:
    """Resolve strategy, teachers, distribution, steps and knowledge; every input error surfaces here.

    Args:
        cfg: the validated config.
        inputs: already tokenized splits (a PBT trial or `compare` prepares them once); default: read them.

    Raises:
        DataError / TeacherError: bad data, manifest or checkpoints.
        ConfigError: an invalid distribution, knowledge request or schedule.
        CacheError: a missing, partial or mismatched knowledge cache.
        SkdError: the student's folder exists and was not written by skd.
    """
    check_cut(cfg.student.init, cfg.student.num_layers, "student.num_layers")
    inputs = inputs or prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    d = cfg.distill
    no_teachers = d.strategy == "no-kd" and not cfg.manifest_path().is_file()
    teachers = [] if no_teachers else load_teachers(cfg, inputs)  # no-kd needs none; retention is not reported
    if d.strategy != "no-kd":  # each teacher reads the rows in its own tokenizer's tokens
        inputs = with_views(inputs, {t.vocab: t.checkpoint for t in teachers},
                            align="hidden" in cfg.distill.knowledge.outputs)
    else:  # transfer rows teach through teachers only: a student without one trains on the labelled rows
        inputs = inputs.labelled_only()
    strategy, family, probs, active = _distribution(cfg, teachers)
    steps = StepPlan.make(len(inputs.train), d.batch_size, cfg.ray.num_workers, d.epochs, d.max_steps,
                          d.eval_every, d.checkpoint_every)
    knowledge = plan_knowledge(cfg, inputs, teachers, steps.total) if strategy != "no-kd" else None
    plan = RunPlan(cfg, inputs, strategy, family, teachers, probs, active, default_run_name(cfg), steps, knowledge)
    check_output(plan.student_dir)  # a folder skd did not create is refused before Ray starts
    return plan
