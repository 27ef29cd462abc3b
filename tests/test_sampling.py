"""Sampling distributions against their formulas, and the sampler's frequencies and state."""

import numpy as np
import pytest
from scipy.stats import chisquare

from orchestrator.config import DistributionConfig
from actors.errors import ConfigError
from orchestrator.common.sampling import TeacherSampler, capacities, sampling_distribution

NAMES = ["big", "mid", "small"]
SCORES = [0.86, 0.83, 0.79]  # dev accuracy: big best
PARAMS = [22.7e6, 19.5e6, 17.9e6]


def dist(**kw):
    return sampling_distribution(DistributionConfig(**kw), NAMES, SCORES, PARAMS, student_scores=[0.70, 0.78, 0.76])


def test_uniform():
    np.testing.assert_allclose(dist(family="uniform"), [1 / 3] * 3)


def test_teacher_rank_linear_and_gamma():
    # ascending ranks: small=1, mid=2, big=3
    np.testing.assert_allclose(dist(family="teacher-rank"), [3 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(dist(family="teacher-rank", gamma=2), [9 / 14, 4 / 14, 1 / 14])
    np.testing.assert_allclose(dist(family="teacher-rank", gamma=0), [1 / 3] * 3)


def test_student_rank_uses_student_scores():
    # student scores 0.70, 0.78, 0.76 -> ranks big=1, mid=3, small=2
    np.testing.assert_allclose(dist(family="student-rank"), [1 / 6, 3 / 6, 2 / 6])


def test_rank_ties_share_average_rank():
    p = sampling_distribution(DistributionConfig(family="teacher-rank"), NAMES, [0.8, 0.8, 0.7], PARAMS)
    np.testing.assert_allclose(p, [2.5 / 6, 2.5 / 6, 1 / 6])


def test_softmax_over_scores():
    tau = 0.05
    z = np.exp(np.array(SCORES) / tau)
    np.testing.assert_allclose(dist(family="softmax", tau=tau), z / z.sum())


def test_capacity_gaussian_prefers_teachers_near_mu():
    mu = np.log(17.9e6)
    p = dist(family="capacity-gaussian", mu=mu, sigma=0.1)
    w = np.exp(-((np.log(PARAMS) - mu) ** 2) / (2 * 0.1 ** 2))
    np.testing.assert_allclose(p, w / w.sum())
    assert p.argmax() == 2


def _info(name, parameters, flops):
    from actors.manifest import TeacherInfo

    return TeacherInfo(name=name, checkpoint="/x", num_layers=6, hidden_size=384, parameters=parameters,
                       dev_metric=0.8, metric="accuracy", vocab="v", num_labels=2, task="sst2", flops_per_token=flops)


def test_capacity_by_flops_reorders_teachers():
    # an MPNet-like teacher: more parameters (embeddings) but fewer FLOPs than a deeper, narrower one
    infos = [_info("wide", 110e6, 1.7e8), _info("deep", 60e6, 2.5e8)]
    by_params = capacities(DistributionConfig(family="capacity-gaussian"), infos)
    by_flops = capacities(DistributionConfig(family="capacity-gaussian", capacity="flops"), infos)
    assert by_params == [110e6, 60e6] and by_flops == [1.7e8, 2.5e8]
    p = sampling_distribution(DistributionConfig(family="capacity-gaussian", capacity="flops", mu=np.log(2.5e8),
                                                 sigma=0.2), ["wide", "deep"], [0.8, 0.8], by_flops)
    assert p.argmax() == 1
    with pytest.raises(ConfigError, match="no FLOPs for old"):
        capacities(DistributionConfig(family="capacity-gaussian", capacity="flops"), [_info("old", 1e6, 0)])


def test_weights_and_uniform_mixing():
    p = dist(family="weights", weights={"big": 3, "small": 1}, eps=0.2)
    np.testing.assert_allclose(p, 0.8 * np.array([0.75, 0.0, 0.25]) + 0.2 / 3)


@pytest.mark.parametrize("weights, fragment", [({"big": -1, "mid": 2}, ">= 0"), ({"big": 0, "mid": 0}, "all zero")])
def test_bad_weights_are_clear_errors(weights, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dist(family="weights", weights=weights)


@pytest.mark.parametrize("probs", [[-0.1, 1.1], [0.0, 0.0], [float("nan"), 1.0]])
def test_sampler_rejects_bad_probabilities(probs):
    with pytest.raises(ConfigError):
        TeacherSampler(probs, seed=0)


def test_sampler_frequencies_match_p():
    p = np.array([0.5, 0.3, 0.2])
    sampler = TeacherSampler(p, seed=1234)
    draws = np.array([sampler.draw() for _ in range(20000)])
    observed = np.bincount(draws, minlength=3)
    # a wrong sampler (e.g. uniform) gives p ~ 0; the right one passes at the 0.1% level with this seed
    assert chisquare(observed, p * len(draws)).pvalue > 1e-3
    assert chisquare(observed, np.full(3, len(draws) / 3)).pvalue < 1e-6


def test_sampler_state_round_trip_reproduces_sequence():
    a = TeacherSampler([0.2, 0.5, 0.3], seed=7)
    [a.draw() for _ in range(13)]
    state = a.state_dict()
    expected = [a.draw() for _ in range(50)]
    b = TeacherSampler([0.2, 0.5, 0.3], seed=999)
    b.load_state_dict(state)
    assert [b.draw() for _ in range(50)] == expected


def _infos(scores: list[float]):
    from tests.fakes import FakeInfo

    return [FakeInfo(f"t{i}", dev_metric=s, parameters=10 ** (i + 3)) for i, s in enumerate(scores)]


@pytest.mark.parametrize("family, settings, live, want", [
    ("uniform", {}, [0, 1, 2], [1 / 3, 1 / 3, 1 / 3]),  # a joiner gets its share
    ("uniform", {}, [1, 2], [0.0, 0.5, 0.5]),  # a teacher that left takes its mass away
    ("teacher-rank", {"gamma": 1.0}, [0, 2], [1 / 3, 0.0, 2 / 3]),  # ranks over the live teachers (0.7 < 0.9)
    ("weights", {"weights": {"t0": 1.0, "t2": 3.0}}, [0, 1, 2], [0.25, 0.0, 0.75]),  # t1 has no weight
    ("weights", {"weights": {"t1": 1.0}}, [0, 2], [0.0, 0.0, 0.0]),  # nothing left to draw: the feed stops
    ("student-rank", {}, [0, 1, 2], [0.4, 0.6, 0.0]),  # no pre-pass score for a joiner: 0
    ("single", {}, [1, 2], [0.0, 1.0, 0.0]),
])
def test_reweigh_follows_the_family_rule_over_the_live_teachers(family, settings, live, want):
    from orchestrator.config import DistributionConfig
    from orchestrator.common.sampling import Reweigh

    base = {"student-rank": [0.4, 0.6], "single": [0.0, 1.0]}.get(family, [0.5, 0.5])
    p = Reweigh(family, DistributionConfig(family="uniform" if family in ("student-rank", "single") else family,
                                           **settings), base)(_infos([0.7, 0.8, 0.9]), live)
    assert p == pytest.approx(want)


def test_tied_student_rank_scores_are_reported():
    from orchestrator.commands.distill import tied_scores_warning

    # the SST-2 evidence: 100-step pre-passes left every student at the majority class
    text = tied_scores_warning([0.5091743, 0.5091743, 0.5091743], "accuracy", 100)
    assert "0.5092 after 100 steps" in text and "distill.distribution.prepass_steps" in text
    assert tied_scores_warning([0.51, 0.62, 0.5091743], "accuracy", 100) is None
    assert tied_scores_warning([0.5], "accuracy", 100) is None
