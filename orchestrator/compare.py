"""`skd compare`: several strategies x seeds on one shared teacher pool, summarised as mean and spread.

A single seed on a small dev set cannot separate methods (872 SST-2 dev rows: one standard error is
about 1.4 accuracy points), so methods are compared over seeds. Every run is an ordinary `skd distill`
run in MLflow; the pool of teacher actors is started once and shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from actors.errors import ConfigError
from orchestrator.config import SkdConfig
from orchestrator.config_load import load_config
from orchestrator.data import prepare_inputs
from orchestrator.distill import run_distill
from orchestrator.plan import make_plan
from orchestrator.runner import RunResult
from orchestrator import tracking
from orchestrator.runtime import ray_session
from orchestrator.sources import open_source


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
    """Run every variant with every seed, sharing one teacher pool (all teachers of the ensemble).

    Raises:
        SkdError: any variant's bad input, before Ray starts.
    """
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    plans = {(v, s): make_plan(load_config(config_path, [*overrides, *variant_overrides(v), f"distill.seed={s}"]),
                               inputs) for v in variants for s in seeds}  # every variant validated up front
    # one pool of the whole ensemble for every variant (or the cache they read); none when all are no-kd
    shared = next((p for p in plans.values() if p.knowledge is not None), next(iter(plans.values())))
    results: dict[str, list[RunResult]] = {v: [] for v in variants}
    tracking.check_store(cfg.tracking_uri())  # before Ray
    with ray_session(cfg.ray):
        everyone = list(range(len(shared.teachers)))
        resources = shared.resources(ray.cluster_resources(), len(everyone) if shared.uses_teacher_actors else 0)
        with open_source(shared, resources, everyone) as pool:
            for (v, s), plan in plans.items():
                print(f"[skd] compare: {v} seed {s}", flush=True)
                results[v].append(run_distill(plan.cfg, source=pool, plan=plan))
    return [VariantSummary(v, results[v], inputs.spec.metric) for v in variants]
