"""`skd compare`: several strategies x seeds on one shared teacher pool, summarised as mean and spread, and
each strategy's paired difference from a baseline with a bootstrap confidence interval.

A single seed on a small dev set cannot separate methods (872 SST-2 dev rows: one standard error is
about 1.4 accuracy points), so methods are compared over seeds. Every run is an ordinary `skd distill`
run in MLflow; the pool of teacher actors is started once and shared by all of them.

The paired bootstrap (Efron and Tibshirani 1993; for NLP comparisons Koehn 2004, Dror et al. 2018): each
variant's students and the baseline's, trained with the same seeds, predict the same dev rows; a resample
draws seeds with replacement (the same for both) and dev rows with replacement (the same for both), and
the statistic is the mean over the drawn seeds of metric(variant) - metric(baseline). The 2.5th and 97.5th
percentiles of 1,000 resamples give a 95% interval; one that excludes 0 marks a difference that seed and
dev-set noise do not explain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray

from actors.errors import ConfigError
from orchestrator.config import SkdConfig
from orchestrator.config.load import load_config
from orchestrator.driver.inputs import prepare_inputs
from orchestrator.driver.views import with_views
from orchestrator.commands.distill import run_distill
from orchestrator.driver.plan import load_teachers, make_plan
from orchestrator.driver.runner import RunResult
from orchestrator import tracking
from orchestrator.common import console
from orchestrator.driver.runtime import ray_session
from orchestrator.driver.sources import open_source


class ComparisonInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a comparison; the message says where (a KeyboardInterrupt, so the command
    exits 130)."""


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
class PairedDelta:
    """A variant's paired difference from the baseline on the primary metric (metric units, e.g. accuracy
    in [0, 1]): the observed mean over seeds, the 95% bootstrap interval, and whether it excludes 0."""

    baseline: str
    delta: float
    low: float
    high: float

    @property
    def real(self) -> bool:
        """Whether the 95% interval excludes 0 (a difference seed and dev-set noise do not explain)."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(variant: list[np.ndarray], baseline: list[np.ndarray], labels: np.ndarray,
                     metric: Callable[[np.ndarray, np.ndarray], float], resamples: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over seeds and dev rows (see the module docstring).

    Args:
        variant / baseline: per seed, in the same seed order, dev predictions [N, C] (or [N]).
        labels: [N] gold labels; metric: (predictions, labels) -> value.
        resamples: bootstrap resamples; seed: the resampling generator's seed.

    Returns:
        (observed mean difference, 2.5th percentile, 97.5th percentile).

    Raises:
        ValueError: different numbers of seeds, or no seed.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired bootstrap needs the same seeds on both sides, got {len(variant)} and {len(baseline)}")
    rng = np.random.default_rng(seed)
    n, s = len(labels), len(variant)
    observed = float(np.mean([metric(a, labels) - metric(b, labels) for a, b in zip(variant, baseline)]))
    deltas = np.empty(resamples)
    for i in range(resamples):
        seeds, rows = rng.integers(s, size=s), rng.integers(n, size=n)
        deltas[i] = np.mean([metric(variant[k][rows], labels[rows]) - metric(baseline[k][rows], labels[rows])
                             for k in seeds])
    return observed, float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))


@dataclass
class VariantSummary:
    """Mean and sample standard deviation over seeds of one variant, and its paired difference from the
    baseline (None for the baseline itself, or when a student's predictions were unavailable)."""

    variant: str
    runs: list[RunResult]
    metric: str
    paired: PairedDelta | None = None

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

    def headline(self, key: str) -> float | None:
        """The mean over seeds of one headline metric (`orchestrator.commands.speed.headline`), None if unmeasured."""
        values = [r.headline[key] for r in self.runs if key in r.headline]
        return float(np.mean(values)) if values else None


def run_comparison(cfg: SkdConfig, config_path: str | None, variants: list[str], seeds: list[int],
                   overrides: list[str], baseline: str | None = None, resamples: int = 1000) -> list[VariantSummary]:
    """Run every variant with every seed, sharing one teacher pool (all teachers of the ensemble), then
    compare each variant with `baseline` (default: the first variant) by the paired bootstrap.

    Raises:
        SkdError: any variant's bad input or a baseline that is not one of the variants, before Ray starts.
        ComparisonInterrupted: Ctrl-C or SIGTERM stopped a run (the runs after it are not started).
    """
    baseline = baseline or variants[0]
    if baseline not in variants:
        raise ConfigError(f"--baseline {baseline!r} is not one of the variants ({', '.join(variants)}); add it "
                          f"with --variant {baseline} or pick one of them")
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    if cfg.manifest_path().is_file():  # every teacher tokenizer's view once, shared by all the plans
        inputs = with_views(inputs, {t.vocab: t.checkpoint for t in load_teachers(cfg, inputs)},
                            align="hidden" in cfg.distill.knowledge.outputs)
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
            for i, ((v, s), plan) in enumerate(plans.items(), 1):
                with console.context(f"compare {i} of {len(plans)}: {v} seed {s}"):
                    results[v].append(run_distill(plan.cfg, source=pool, plan=plan))
                if results[v][-1].interrupted:  # Ctrl-C / SIGTERM ends the comparison, not just this run
                    raise ComparisonInterrupted(f"stopped during {v} seed {s} (run {plan.run_name}, resumable "
                                                f"with skd distill --resume); {i - 1} of {len(plans)} runs had "
                                                f"finished, their students are saved and in MLflow")
    summaries = [VariantSummary(v, results[v], inputs.spec.metric) for v in variants]
    add_paired_deltas(summaries, baseline, inputs, cfg.distill.eval_batch_size, resamples)
    return summaries


def add_paired_deltas(summaries: list[VariantSummary], baseline: str, inputs, batch_size: int,
                      resamples: int = 1000) -> None:
    """Each summary's `paired` difference from `baseline`, from its saved students' dev predictions (runs
    without a saved student, e.g. stopped ones, leave it None)."""
    from actors.models import load_classifier
    from orchestrator.common.metrics import glue_metrics
    from orchestrator.common.evaluation import predict

    spec = inputs.spec

    def preds(runs: list[RunResult]) -> list[np.ndarray] | None:
        if any(r.model_dir is None for r in runs):
            return None
        return [predict(load_classifier(str(r.model_dir), spec.num_labels, regression=spec.is_regression),
                        inputs.dev, inputs.pad_id, batch_size) for r in runs]

    def metric(p: np.ndarray, y: np.ndarray) -> float:
        return glue_metrics(spec, p, y)[spec.metric]

    base = next(s for s in summaries if s.variant == baseline)
    base_preds = preds(base.runs)
    for s in summaries:
        if s is base or base_preds is None:
            continue
        mine = preds(s.runs)
        if mine is not None and len(mine) == len(base_preds):
            s.paired = PairedDelta(baseline, *paired_bootstrap(mine, base_preds, inputs.dev.labels, metric, resamples))
