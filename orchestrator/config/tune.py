"""The `tune:` section of a config: which knobs a campaign varies, as validated data (no Ray here).

A `tune:` section names each dimension by its short name and one distribution:

    tune:
      space:
        family: {choice: [uniform, teacher-rank, softmax, capacity-gaussian]}
        gamma: {uniform: [0.5, 3.0]}
        lr: {loguniform: [5.0e-5, 3.0e-4]}

Short names map to config keys (`gamma` -> `distill.distribution.gamma`); every value a dimension can
take is checked against the config model before the campaign starts, so a bad range is an error here,
not a failed trial. `tuning.space` turns a validated section into Ray Tune domains; the schema lives
here, beside the rest of the config, so that loading any config validates its `tune:` section too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

KEYS: dict[str, str] = {
    "family": "distill.distribution.family",
    "gamma": "distill.distribution.gamma",
    "tau": "distill.distribution.tau",
    "capacity": "distill.distribution.capacity",
    "mu": "distill.distribution.mu",
    "sigma": "distill.distribution.sigma",
    "eps": "distill.distribution.eps",
    "every": "distill.distribution.every",
    "step_size": "distill.distribution.step_size",
    "temperature": "distill.temperature",
    "alpha": "distill.alpha",
    "lr": "distill.lr",
    "outputs": "distill.knowledge.outputs",
    "hidden_weight": "distill.knowledge.hidden_weight",
    "attention_weight": "distill.knowledge.attention_weight",
    "cls_weight": "distill.knowledge.cls_weight",
}
"""Tunable short names and the config keys they set."""

DISTRIBUTION_KEYS = frozenset(k for k, v in KEYS.items() if v.startswith("distill.distribution."))
"""The short names that shape the SKD sampling distribution (they mean something only for strategy skd)."""


class Dimension(BaseModel):
    """One search dimension: exactly one of choice, uniform [low, high], loguniform [low, high], randint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        kinds = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {list(self.loguniform)}")
        return self

    def extremes(self) -> list[Any]:
        """Values to validate: every choice, or both bounds."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.uniform or self.loguniform or self.randint)

    def clamp(self, value: Any) -> Any:
        """`value` moved back into the dimension's range (PBT's explore multiplies values by 0.8 or 1.2,
        which can leave it); choices pass through."""
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is None:
            return value
        value = min(max(value, bounds[0]), bounds[1] if self.randint is None else bounds[1] - 1)
        return int(round(value)) if self.randint is not None else float(value)

def default_space() -> dict[str, Dimension]:
    """A sensible default: the distribution family and its shapes, KD temperature, alpha and learning rate."""
    return {
        "family": Dimension(choice=["uniform", "teacher-rank", "softmax", "capacity-gaussian"]),
        "gamma": Dimension(uniform=(0.5, 3.0)),
        "tau": Dimension(loguniform=(0.01, 0.5)),
        "sigma": Dimension(uniform=(0.05, 1.0)),
        "eps": Dimension(uniform=(0.0, 0.3)),
        "temperature": Dimension(uniform=(1.0, 4.0)),
        "alpha": Dimension(uniform=(0.2, 0.8)),
        "lr": Dimension(loguniform=(5e-5, 3e-4)),
    }


class TuneSection(BaseModel):
    """The `tune:` section of a config: the campaign's space, objective and scheduling defaults.

    CLI options (`--num-samples`, `--scheduler`, `--search`, `--max-concurrent`) override these.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: dict[str, Dimension] = Field(default_factory=default_space)
    metric: str | None = Field(None, description="Reported metric to optimise. Default: dev/<task metric>.")
    mode: str = Field("max", pattern="^(max|min)$")
    num_samples: int = Field(8, gt=0)
    scheduler: str = Field("asha", pattern="^(asha|fifo|pbt)$",
                           description="asha (stop weak trials early) | fifo | pbt (population based training)")
    search: str = Field("random", pattern="^(random|optuna)$")
    max_concurrent: int = Field(1, gt=0)
    seed: int = 0
    grace_period: int = Field(1, gt=0, description="ASHA: evaluations a trial always gets before it can stop.")
    reduction_factor: float = Field(2.0, gt=1)
    perturbation_interval: int = Field(1, gt=0, description="PBT: evaluations between exploit/explore steps.")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5,
                                     description="PBT: bottom fraction of trials that copy a top trial's checkpoint.")
    synch: bool = Field(False, description="PBT: wait for every trial at each perturbation point (deterministic "
                                            "exploits; slower when trials run at different speeds).")

    @model_validator(mode="after")
    def _known_names(self) -> "TuneSection":
        unknown = sorted(set(self.space) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown search dimensions {unknown}; tunable: {', '.join(KEYS)}")
        if "outputs" in self.space and self.space["outputs"].choice is None:
            raise ValueError("space.outputs takes a choice of output lists, e.g. {choice: [[], [hidden], [cls]]}")
        if self.scheduler == "pbt" and self.search != "random":
            raise ValueError("scheduler pbt samples and mutates the space itself: use search random "
                             "(--search random), not optuna")
        if self.scheduler == "pbt" and self.max_concurrent < 2:
            raise ValueError("scheduler pbt compares trials that train at the same time: set max_concurrent >= 2 "
                             "(--max-concurrent 4); with one trial at a time PBT never exploits")
        return self
