"""An adaptive SKD sampling distribution: a bandit over teachers that learns which ones the student gains from.

SKDBERT (Ding et al., AAAI 2023) fixes p before training. `distill.distribution.family: adaptive` instead
updates p online with EXP3 (Auer, Cesa-Bianchi, Freund and Schapire, "The nonstochastic multiarmed bandit
problem", SIAM J. Comput. 2002), the bandit for rewards that need not be stationary (what a teacher is worth
changes as the student learns):

    p_k = (1 - eps) * softmax(eta * G)_k + eps / N        over the live teachers
    G_k += r_hat_k  after every interval of `every` steps, r_hat_k = r * (n_k / n) / p_k

where n_k of the interval's n steps were taught by teacher k (r_hat_k: the interval's reward credited to k
in proportion to its steps, importance-weighted by the p in force) and r is the interval's reward:
the drop of the student's loss on a fixed probe batch of training examples (labels, not a teacher;
eval mode, no dropout), measured at the interval's start and end. That is the student's improvement the
interval produced, the signal the issue asks for. The student improves whatever it is taught early on, so r
is centred and scaled by running (exponential, decay 0.9) estimates of its mean and mean absolute deviation,
then clipped to [-3, 3]: teachers are rewarded for improvement above the usual, and `eta` means the same at
every loss scale. eps is EXP3's exploration floor: every live teacher keeps at least eps / N. Intervals mix
teachers, so the credit each update gives is weak; a shorter `every` sharpens it at the probe's cost.

Ordering, so every data-parallel rank and a resumed run draw the same teachers: the probe after 0-based
step t (1-based `done` = t + 1) sees the same loss on every rank (the caller averages it over ranks); the p it
computes applies to draws of steps >= done + 1 (0-based), because step `done`'s teacher was already drawn
(the knowledge feed sends step t+1's request before step t's update). Its state (gains, interval counts,
running statistics, last probe loss, the p in force and the one queued) goes into every checkpoint with the
generator's, so `--resume` continues the same sequence.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from orchestrator.common.sampling import TeacherSampler
from orchestrator.worker.spec import AdaptiveSettings

CLIP = 3.0  # standardised rewards are clipped to [-CLIP, CLIP]
DECAY = 0.9  # running mean / mean absolute deviation of the raw reward


class AdaptiveSampler(TeacherSampler):
    """A `TeacherSampler` whose p is learnt online by EXP3 from probe-loss rewards (see the module docstring).

    Args:
        n: teachers in the run, N (p starts uniform).
        seed: the draw generator's seed (the same on every rank).
        settings: interval, step size, floor, probe size.
    """

    def __init__(self, n: int, seed: int, settings: AdaptiveSettings) -> None:
        super().__init__(np.full(n, 1.0 / n), seed)
        self.settings = settings
        self.gains = np.zeros(n)  # G: summed importance-weighted standardised rewards
        self.window = np.zeros(n)  # steps each teacher taught in the current interval
        self.mean: float | None = None  # running mean of the raw reward
        self.spread: float | None = None  # running mean absolute deviation of the raw reward
        self.last_loss: float | None = None
        self.queued: tuple[int, list[float]] | None = None  # (first 0-based step it applies to, p)
        self.support = list(range(n))  # the teachers p may put mass on (live, with mass under the family rule)

    # -- the draw side -------------------------------------------------------------------------------------
    def activate(self, step: int) -> None:
        """Put the queued p in force when 0-based `step` is the one it applies to (or later); call before
        drawing for `step`."""
        if self.queued is not None and step >= self.queued[0]:
            self.probs = np.asarray(self.queued[1], dtype=np.float64)
            self.queued = None

    def taught(self, k: int) -> None:
        """Teacher k served one step of the current interval."""
        self._grow(k + 1)
        self.window[k] += 1

    def set_probs(self, probs: Sequence[float]) -> None:
        """The live set changed (a served pool's join or leave): p, and a queued p, become the bandit's rule
        over the teachers `probs` gives mass to, at once (joining teachers start with G = 0)."""
        p = np.asarray(probs, dtype=np.float64)
        self._grow(len(p))
        self.support = [k for k in range(len(p)) if p[k] > 0]
        self.probs = self._rule()
        if self.queued is not None:
            self.queued = (self.queued[0], self.probs.tolist())

    def padded(self, n: int) -> np.ndarray:
        """p extended with zeros to n teachers (the bandit's state grows with it)."""
        self._grow(n)
        return super().padded(n)

    # -- the learning side ---------------------------------------------------------------------------------
    def update(self, done: int, probe_loss: float) -> dict[str, float]:
        """End of an interval: the reward from the probe loss after 1-based step `done`, the gains, and the
        p queued for draws of 0-based steps >= done + 1. The first call only records the loss.

        Returns:
            Metrics for this update: {"sampler/reward": standardised reward r, "sampler/probe_loss",
            "sampler/gain/<k>" per teacher index k} ({} on the first call).
        """
        if self.last_loss is None:
            self.last_loss = float(probe_loss)
            self.window[:] = 0
            return {}
        raw = self.last_loss - float(probe_loss)  # the interval's improvement on the probe batch
        self.last_loss = float(probe_loss)
        if self.mean is None:
            self.mean, self.spread = raw, abs(raw)
        r = float(np.clip((raw - self.mean) / max(self.spread, 1e-12), -CLIP, CLIP))
        self.mean = DECAY * self.mean + (1 - DECAY) * raw
        self.spread = DECAY * self.spread + (1 - DECAY) * abs(raw - self.mean)
        taught = self.window.sum()
        if taught > 0:
            used = np.maximum(TeacherSampler.padded(self, len(self.gains)), 1e-12)  # p in force (most of the interval)
            self.gains += np.where(self.window > 0, r * (self.window / taught) / used, 0.0)
        self.window[:] = 0
        self.queued = (done + 1, self._rule().tolist())
        return {"sampler/reward": r, "sampler/probe_loss": float(probe_loss),
                **{f"sampler/gain/{k}": float(g) for k, g in enumerate(self.gains)}}

    def _rule(self) -> np.ndarray:
        """p = (1 - eps) softmax(eta G) + eps / N over the support, 0 elsewhere."""
        p = np.zeros(len(self.gains))
        live = self.support
        if not live:
            return p
        z = self.settings.step_size * self.gains[live]
        w = np.exp(z - z.max())
        p[live] = (1 - self.settings.eps) * w / w.sum() + self.settings.eps / len(live)
        return p

    def _grow(self, n: int) -> None:
        """More teachers (joined a served pool): G 0, no steps taught."""
        extra = n - len(self.gains)
        if extra > 0:
            self.gains = np.concatenate([self.gains, np.zeros(extra)])
            self.window = np.concatenate([self.window, np.zeros(extra)])

    # -- checkpoints -----------------------------------------------------------------------------------------
    def adaptive_state(self) -> dict[str, Any]:
        """JSON-serialisable bandit state (the generator's is `state_dict`)."""
        return {"gains": self.gains.tolist(), "window": self.window.tolist(), "mean": self.mean,
                "spread": self.spread, "last_loss": self.last_loss, "probs": self.probs.tolist(),
                "queued": None if self.queued is None else [self.queued[0], list(self.queued[1])],
                "support": list(self.support)}

    def load_adaptive_state(self, state: dict[str, Any]) -> None:
        """Restore what `adaptive_state` returned."""
        self.gains = np.asarray(state["gains"], dtype=np.float64)
        self.window = np.asarray(state["window"], dtype=np.float64)
        self.mean, self.spread, self.last_loss = state["mean"], state["spread"], state["last_loss"]
        self.probs = np.asarray(state["probs"], dtype=np.float64)
        queued = state.get("queued")
        self.queued = None if queued is None else (int(queued[0]), list(queued[1]))
        self.support = list(state.get("support", range(len(self.gains))))
