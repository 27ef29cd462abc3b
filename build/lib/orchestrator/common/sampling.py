"""SKD sampling distributions over the teacher ensemble and the seeded teacher sampler.

Stochastic KD (SKDBERT, Ding et al., AAAI 2023): every training step the student distils from ONE
teacher k ~ p. The paper names uniform, teacher-rank and student-rank distributions without formulas;
ours (from the design notes) are, for N teachers with scores s_i and ascending ranks r_i in 1..N
(best gets N; ties share the average rank):

- uniform:            p_i = 1 / N
- teacher-rank:       p_i = r_i^gamma / sum_j r_j^gamma, s_i = teacher i's own dev metric
- student-rank:       same formula, s_i = dev metric of a student distilled from teacher i alone
- softmax:            p_i = exp(s_i / tau) / sum_j exp(s_j / tau)
- capacity-gaussian:  p_i ∝ exp(-(ln c_i - mu)^2 / (2 sigma^2)), c_i = teacher i's capacity:
                      parameter count, or forward FLOPs per token (`distribution.capacity`)
- weights:            p_i = w_i / sum_j w_j (explicit)
- adaptive:           starts uniform; learnt online by a bandit (`orchestrator.worker.adaptive`)

and any family mixed with uniform: p = (1 - eps) p + eps / N.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from actors.errors import ConfigError
from actors.manifest import TeacherInfo
from orchestrator.config import DistributionConfig


def rank_probs(scores: Sequence[float], gamma: float) -> np.ndarray:
    """p_i = r_i^gamma / sum_j r_j^gamma with r = ascending rank of `scores` (best = N). Shape [N]."""
    from scipy.stats import rankdata  # here, not at import: scipy.stats costs ~1 s in every Ray worker

    ranks = rankdata(np.asarray(scores, dtype=np.float64), method="average")
    weights = ranks ** gamma
    return weights / weights.sum()


def softmax_probs(scores: Sequence[float], tau: float) -> np.ndarray:
    """p_i = softmax(s / tau)_i. Shape [N]."""
    z = np.asarray(scores, dtype=np.float64) / tau
    z = np.exp(z - z.max())
    return z / z.sum()


def capacities(dist: DistributionConfig, teachers: Sequence[TeacherInfo]) -> list[float]:
    """Each teacher's capacity c_i for capacity-gaussian, [N]: `parameters`, or `flops_per_token` (forward FLOPs
    per token at `data.max_length`, `actors.models.forward_flops_per_token`) when `dist.capacity` is "flops".

    Raises:
        ConfigError: capacity "flops" with a teacher whose manifest entry predates FLOPs (0), for a
            capacity-gaussian distribution.
    """
    if dist.capacity == "parameters":
        return [float(t.parameters) for t in teachers]
    unknown = [t.name for t in teachers if t.flops_per_token <= 0]
    if unknown and dist.family == "capacity-gaussian":
        raise ConfigError(f"distill.distribution.capacity: flops, but the manifest has no FLOPs for {', '.join(unknown)} "
                          f"(prepared before skd measured them): re-run `skd teachers prepare --force` or use "
                          f"capacity: parameters")
    return [float(t.flops_per_token or t.parameters) for t in teachers]


def capacity_gaussian_probs(params: Sequence[float], mu: float | None, sigma: float) -> np.ndarray:
    """p_i ∝ exp(-(ln c_i - mu)^2 / (2 sigma^2)); mu defaults to the mean of ln c. Shape [N]."""
    logc = np.log(np.asarray(params, dtype=np.float64))
    centre = logc.mean() if mu is None else mu
    w = np.exp(-((logc - centre) ** 2) / (2 * sigma ** 2))
    if w.sum() <= 0:
        raise ConfigError(f"distill.distribution: capacity-gaussian with mu={mu}, sigma={sigma} gives every teacher "
                          f"zero probability (ln c are {np.round(logc, 2).tolist()}); widen sigma")
    return w / w.sum()


def weight_probs(names: Sequence[str], weights: dict[str, float]) -> np.ndarray:
    """Normalise explicit weights (missing teachers get 0).

    Raises:
        ConfigError: a negative weight, or all weights zero.
    """
    w = np.asarray([float(weights.get(n, 0.0)) for n in names], dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        bad = {n: weights[n] for n in names if n in weights and not (float(weights[n]) >= 0)}
        raise ConfigError(f"distill.distribution.weights must be finite and >= 0; got {bad}")
    if w.sum() == 0:
        raise ConfigError("distill.distribution.weights are all zero; give at least one teacher a positive weight")
    return w / w.sum()


def mix_uniform(p: np.ndarray, eps: float) -> np.ndarray:
    """p = (1 - eps) p + eps / N."""
    return (1.0 - eps) * p + eps / len(p)


def sampling_distribution(dist: DistributionConfig, names: Sequence[str], teacher_scores: Sequence[float],
                          params: Sequence[float], student_scores: Sequence[float] | None = None) -> np.ndarray:
    """The probabilities p over teachers (in `names` order) for a distribution config.

    Args:
        dist: family and shape parameters.
        names: teacher names, [N].
        teacher_scores: the teachers' dev metrics, [N] (teacher-rank, softmax).
        params: capacities c_i, [N] (capacity-gaussian; `capacities`).
        student_scores: pre-pass student dev metrics per teacher, [N] (student-rank only).

    Returns:
        float64 [N], non-negative, sums to 1.

    Raises:
        ConfigError: bad weights, or student-rank without pre-pass scores.
    """
    n = len(names)
    if dist.family in ("uniform", "adaptive"):  # adaptive: the start; its sampler learns p from there
        p = np.full(n, 1.0 / n)
    elif dist.family == "teacher-rank":
        p = rank_probs(teacher_scores, dist.gamma)
    elif dist.family == "student-rank":
        if student_scores is None:
            raise ConfigError("student-rank needs the pre-pass student scores (run through `skd distill`)")
        p = rank_probs(student_scores, dist.gamma)
    elif dist.family == "softmax":
        p = softmax_probs(teacher_scores, dist.tau)
    elif dist.family == "capacity-gaussian":
        p = capacity_gaussian_probs(params, dist.mu, dist.sigma)
    else:
        p = weight_probs(names, dist.weights or {})
    return mix_uniform(p, dist.eps)


class TeacherSampler:
    """Draws one teacher index per step from p with its own seeded generator (numpy PCG64).

    Every data-parallel rank builds it with the same seed, so all ranks ask the same teacher at a step.
    Its state goes into every checkpoint, so a resumed run draws the same sequence as an uninterrupted one.

    Args:
        probs: [N] probabilities (validated: finite, >= 0, positive sum; renormalised).
        seed: generator seed.

    Raises:
        ConfigError: negative, non-finite or all-zero probabilities.
    """

    def __init__(self, probs: Sequence[float], seed: int) -> None:
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or not np.isfinite(p).all() or (p < 0).any():
            raise ConfigError(f"sampling probabilities must be finite and >= 0, got {p.tolist()}")
        if p.sum() <= 0:
            raise ConfigError("sampling probabilities are all zero; give at least one teacher a positive weight")
        self.probs = p / p.sum()
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def draw(self, among: Sequence[int] | None = None) -> int:
        """The next teacher index in [0, N), drawn from p, or from p restricted to the teachers `among` and
        renormalised (teachers lost during a run); the generator advances the same way either way.

        Raises:
            ValueError: `among` gives every remaining teacher zero probability.
        """
        p = self.probs
        if among is not None and len(among) < len(p):
            q = np.zeros_like(p)
            q[list(among)] = p[list(among)]
            if q.sum() <= 0:
                raise ValueError(f"no probability left on teachers {list(among)}")
            p = q / q.sum()
        return int(self._rng.choice(len(p), p=p))

    def set_probs(self, probs: Sequence[float]) -> None:
        """Replace p (an elastic pool's membership changed; N may grow); the generator goes on as it was.
        All zeros is allowed: the feed then finds no teacher with probability left.

        Raises:
            ConfigError: negative or non-finite probabilities.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or not np.isfinite(p).all() or (p < 0).any():
            raise ConfigError(f"sampling probabilities must be finite and >= 0, got {p.tolist()}")
        self.probs = p / p.sum() if p.sum() > 0 else p

    def padded(self, n: int) -> np.ndarray:
        """p extended with zeros to n teachers (teachers that joined get no probability)."""
        return np.concatenate([self.probs, np.zeros(max(0, n - len(self.probs)))])

    def mass(self, among: Sequence[int]) -> float:
        """Probability of the teachers `among` under p (0: none of them is ever drawn)."""
        return float(self.probs[list(among)].sum()) if len(among) else 0.0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable generator state (for checkpoints)."""
        return self._rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state


class Reweigh:
    """The sampling distribution after a served pool's membership changed: p over the live teachers by the
    family's rule, so a teacher that left takes its mass with it and one that joined gets its share
    (uniform: 1/N_live each; teacher-rank, softmax, capacity-gaussian: the rule over the live teachers'
    dev scores or sizes; weights: the configured weight of each live teacher by name). Families with
    nothing to say about a newcomer (student-rank: no pre-pass score; single:<teacher>) keep the plan's p
    over the live teachers, renormalised, and give a joining teacher 0.

    Args:
        family: the plan's family ("uniform", ..., "student-rank", "single").
        dist: the distribution settings (gamma, tau, eps, weights, ...).
        base: [N0] the plan's p over the run's first teachers.
    """

    def __init__(self, family: str, dist: DistributionConfig, base: Sequence[float]) -> None:
        self.family, self.dist, self.base = family, dist, list(base)

    def __call__(self, infos: Sequence[TeacherInfo], live: Sequence[int]) -> np.ndarray:
        """[N] p over `infos` (zero outside `live`; all zero when no live teacher may be drawn)."""
        p = np.zeros(len(infos))
        live = sorted(live)
        if not live:
            return p
        if self.family in ("student-rank", "single"):
            base = np.concatenate([self.base, np.zeros(max(0, len(infos) - len(self.base)))])
            p[live] = base[live]
            return p / p.sum() if p.sum() > 0 else p
        chosen = [infos[i] for i in live]
        try:
            p[live] = sampling_distribution(self.dist, [t.name for t in chosen], [t.dev_metric for t in chosen],
                                            capacities(self.dist, chosen))
        except ConfigError:  # e.g. weights naming none of the live teachers
            return np.zeros(len(infos))
        return p
