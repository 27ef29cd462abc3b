"""The adaptive sampling family (EXP3 over teachers, probe-loss rewards) without Ray: synthetic students where
one teacher is useful, equal teachers, the step its p applies from, checkpoints and resume through the feed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.worker.adaptive import AdaptiveSampler
from orchestrator.worker.spec import AdaptiveSettings
from tests.feedkit import make_feed
from tests.test_feed import FakeSource, batches

SETTINGS = AdaptiveSettings(every=10, step_size=0.1, eps=0.1, probe_size=8)


def synthetic(useful: set[int], steps: int, seed: int, n: int = 3, gain: float = 0.02) -> AdaptiveSampler:
    """A student whose probe loss falls 0.002 a step, `gain` more on steps a useful teacher taught, with
    N(0, 0.01) noise per step; the sampler draws, is told who taught, and updates every 10 steps."""
    sampler = AdaptiveSampler(n, seed, SETTINGS)
    noise = np.random.default_rng(seed + 1000)
    loss = 2.0
    sampler.update(0, loss)
    for t in range(steps):
        sampler.activate(t)
        k = sampler.draw()
        sampler.taught(k)
        loss -= 0.002 + (gain if k in useful else 0.0) + noise.normal(0, 0.01)
        if (t + 1) % SETTINGS.every == 0:
            sampler.update(t + 1, loss)
    sampler.activate(steps)
    return sampler


@pytest.mark.parametrize("seed", range(5))
def test_p_moves_to_the_useful_teacher_within_60_updates(seed):
    p = synthetic({1}, 600, seed).probs
    assert p.argmax() == 1 and p[1] > 0.6, p
    assert p.min() >= SETTINGS.eps / 3 - 1e-12  # the exploration floor holds


@pytest.mark.parametrize("seed", range(5))
def test_equal_teachers_stay_near_uniform(seed):
    p = synthetic({0, 1, 2}, 600, seed).probs
    assert np.abs(p - 1 / 3).max() < 0.2, p


def test_a_learnt_p_applies_after_the_step_already_drawn():
    s = AdaptiveSampler(2, 0, SETTINGS)
    s.update(0, 1.0)
    for _ in range(10):
        s.taught(1)
    s.update(10, 0.99)  # teacher 1's interval: the loss fell a little (the first reward sets the baseline)
    s.activate(11)
    for _ in range(10):
        s.taught(0)
    s.update(20, 0.5)  # teacher 0's interval: it fell much more
    before = s.probs.copy()
    s.activate(20)  # step 20 (0-based) was drawn before this update: it keeps the old p
    assert np.allclose(s.probs, before)
    s.activate(21)
    assert s.probs[0] > before[0] and s.probs[1] < before[1]


def test_state_round_trip_reproduces_the_draws():
    a = synthetic({0}, 95, 3)
    saved = json.loads(json.dumps({"rng": a.state_dict(), "adaptive": a.adaptive_state()}))  # as in a checkpoint
    b = AdaptiveSampler(3, 99, SETTINGS)
    b.load_state_dict(saved["rng"])
    b.load_adaptive_state(saved["adaptive"])
    draws = []
    for s in (a, b):
        seq, loss = [], 1.0
        for t in range(95, 200):
            s.activate(t)
            k = s.draw()
            s.taught(k)
            seq.append(k)
            loss -= 0.01 * (k == 0)
            if (t + 1) % 10 == 0:
                s.update(t + 1, loss)
        draws.append(seq)
    assert draws[0] == draws[1]


def run_feed(prefetch: bool, stop_at: int | None = None, state: dict | None = None, total: int = 40):
    """An adaptive feed over 3 fake teachers for `total` steps; the probe loss falls with teacher 2's steps.
    Returns (the teachers served from the start or resume, the state after step `stop_at`)."""
    f = make_feed(FakeSource(3), batches, world=1, total=total, strategy="skd", probs=[1 / 3] * 3, seed=5,
                  prefetch=prefetch, adaptive=SETTINGS)
    start = 0
    if state is not None:
        f.load_state_dict(state)
        start = state["step"]
    else:
        f.adapt(0, 10.0)
    f.begin(start)
    served, saved = [], None
    for step in range(start, total):
        k = f.next_knowledge(step).teacher
        served.append(k)
        done = step + 1
        if done % SETTINGS.every == 0:
            f.adapt(done, 10.0 - f.counts[2] / 4 - 0.1 * done)
        if done == stop_at:
            saved = json.loads(json.dumps({"step": done, **f.state_dict()}))
    return served, saved


def test_feed_resume_and_prefetch_draw_the_same_sequence():
    full, saved = run_feed(True, stop_at=25)
    assert run_feed(False)[0] == full  # the learnt p applies at the same step with or without prefetch
    assert "adaptive" in saved
    resumed, _ = run_feed(True, state=saved)
    assert resumed == full[25:]
    f = make_feed(FakeSource(3), batches, world=1, total=40, strategy="skd", probs=[1 / 3] * 3, seed=5,
                  adaptive=SETTINGS)
    assert f.adapt(0, 1.0) == {}  # the first probe only records the loss


def test_adapt_reports_metrics_by_teacher_name():
    f = make_feed(FakeSource(2), batches, world=1, total=20, strategy="skd", probs=[0.5, 0.5], seed=1,
                  adaptive=SETTINGS)
    f.adapt(0, 1.0)
    for step in range(10):
        f.next_knowledge(step)
    stats = f.adapt(10, 0.8)
    assert {"sampler/reward", "sampler/probe_loss", "sampler/gain/t0", "sampler/gain/t1", "sampler/p/t0",
            "sampler/p/t1"} <= set(stats)
    assert abs(stats["sampler/p/t0"] + stats["sampler/p/t1"] - 1) < 1e-9


def test_adaptive_needs_an_exploration_floor():
    from actors.errors import ConfigError
    from orchestrator.config.load import load_config

    with pytest.raises(ConfigError, match="eps"):
        load_config("configs/sst2.yaml", ["distill.distribution.family=adaptive", "distill.distribution.eps=0"])
    cfg = load_config("configs/sst2.yaml", ["distill.distribution.family=adaptive", "distill.distribution.eps=0.1"])
    assert cfg.distill.distribution.every == 10


def test_paired_bootstrap_tells_a_real_difference_from_noise():
    from orchestrator.commands.compare import paired_bootstrap

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)

    def accuracy(p, y):
        return float((p.argmax(-1) == y).mean())

    def preds(correct: float, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        right = r.random(400) < correct
        cls = np.where(right, labels, 1 - labels)
        return np.eye(2)[cls]

    better = [preds(0.85, s) for s in range(3)]
    base = [preds(0.70, 10 + s) for s in range(3)]
    delta, low, high = paired_bootstrap(better, base, labels, accuracy, resamples=300)
    assert 0.1 < delta < 0.2 and 0 < low < delta < high
    same = [preds(0.75, 20 + s) for s in range(3)]
    other = [preds(0.75, 30 + s) for s in range(3)]
    delta, low, high = paired_bootstrap(same, other, labels, accuracy, resamples=300)
    assert low < 0 < high  # two equally good methods: the interval holds 0
    assert paired_bootstrap(base, base, labels, accuracy, resamples=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(base, base[:2], labels, accuracy)
