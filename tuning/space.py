"""The tuning search space as Ray Tune objects: a validated `tune:` section's dimensions turned into Tune
domains, and a trial's sampled values turned back into config overrides.

The section's schema (`TuneSection`, `Dimension`, the tunable `KEYS`) lives in `orchestrator.config.tune`
so that every config load validates it; this module is the Ray Tune side of it.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config.tune import DISTRIBUTION_KEYS, KEYS, Dimension, TuneSection, default_space

__all__ = ["DISTRIBUTION_KEYS", "KEYS", "Dimension", "TuneSection", "default_space", "domain", "to_overrides"]


def domain(dim: Dimension):
    """The Ray Tune sampling domain of one dimension (choice, uniform, loguniform or randint)."""
    from ray import tune

    if dim.choice is not None:
        return tune.choice(dim.choice)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    return tune.randint(*dim.randint)


def to_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as `--set` overrides (`gamma=1.7` -> `distill.distribution.gamma=1.7`)."""
    return [f"{KEYS[k]}={v}" for k, v in params.items()]
