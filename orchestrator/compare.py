"""`skd compare`: several strategies x seeds on one shared teacher pool, summarised as mean and spread.

A single seed on a small dev set cannot separate methods (872 SST-2 dev rows: one standard error is
about 1.4 accuracy points), so methods are compared over seeds. Every run is an ordinary `skd distill`
run in MLflow; the pool of teacher actors is started once and shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.manifest import read_manifest, validate_teachers
from orchestrator.config import SkdConfig, load_config
from orchestrator.distill import plan_run, run_distill, start_teacher_pool
from actors.errors import ConfigError
from orchestrator.runner import RunResult, prepare_inputs
from orchestrator.runtime import ray_session


def variant_overrides(variant: str) -> list[str]:
    """`no-kd`, `average`, `single:<teacher>` or `skd:<family>` as `--set` overrides.

    Raises:
        ConfigError: an unknown variant.
    """
    if variant in ("no-kd", "average"):
        # soft labels only: no-kd has no teacher, average mixes teachers of different widths
        return [f"distill.strategy={variant}", "distill.knowledge.outputs=[]"]
    if variant.startswith("single:"):
        return [f"distill.strategy={variant}"]
    if variant.startswith("skd:"):
        return ["distill.strategy=skd", f"distill.distribution.family={variant[4:]}"]
    raise ConfigError(f"unknown variant {variant!r}; use no-kd, average, single:<teacher> or skd:<family>")


@dataclass
class VariantSummary:
    """Mean and sample standard deviation over seeds of one variant."""

    variant: str
    runs: list[RunResult]
    metric: str

    def stat(self, values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=float)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    @property
    def dev(self) -> tuple[float, float]:
        return self.stat([r.dev[self.metric] for r in self.runs])

    @property
    def retention(self) -> tuple[float, float]:
        return self.stat([r.retention or 0.0 for r in self.runs])

    @property
    def wall_s(self) -> tuple[float, float]:
        return self.stat([r.wall_s for r in self.runs])

    @property
    def samples_per_s(self) -> tuple[float, float]:
        return self.stat([r.samples_per_s for r in self.runs])


def run_comparison(cfg: SkdConfig, config_path: str | None, variants: list[str], seeds: list[int],
                   overrides: list[str]) -> list[VariantSummary]:
    """Run every variant with every seed, sharing one teacher pool.

    Raises:
        SkdError: any variant's bad input, before Ray starts.
    """
    configs = {(v, s): load_config(config_path, [*overrides, *variant_overrides(v), f"distill.seed={s}"])
               for v in variants for s in seeds}
    inputs = prepare_inputs(cfg, cfg.student.init)
    for c in configs.values():
        plan_run(c, inputs)  # validates teachers and distributions up front
    teachers = validate_teachers(read_manifest(cfg.manifest_path()), [m.name for m in cfg.teachers.members],
                                 cfg.task, inputs.spec.num_labels, inputs.vocab)
    results: dict[str, list[RunResult]] = {v: [] for v in variants}
    with ray_session(cfg.ray):
        pool = start_teacher_pool(cfg, teachers, list(range(len(teachers))), inputs.spec.is_regression)
        try:
            for (v, s), c in configs.items():
                print(f"[skd] compare: {v} seed {s}", flush=True)
                results[v].append(run_distill(c, pool=pool))
        finally:
            pool.shutdown()
    return [VariantSummary(v, results[v], inputs.spec.metric) for v in variants]
