"""The knowledge feed without Ray: a fake in-process `KnowledgeSource` records what it was asked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.knowledge import Knowledge, KnowledgeRequest, KnowledgeSource
from orchestrator.worker.feed import KnowledgeFeed
from orchestrator.common.sampling import TeacherSampler
from tests import fakes
from tests.feedkit import make_feed


def FakeSource(n: int) -> fakes.FakeSource:
    """Teacher k answers logits filled with k + 1 (average: their mean); calls are recorded as
    (kind, teacher, first example id, request)."""
    return fakes.FakeSource([f"t{k}" for k in range(n)],
                            lambda k, batch, request: Knowledge(k, np.full((batch.size, 2), k + 1.0, np.float32), 0.0),
                            lambda kind, k, batch, request: (kind, k, int(batch.ids[0]), request))


def batches(step: int) -> dict[str, np.ndarray]:
    """Batch of step s: 4 rows with ids 10s..10s+3."""
    ids = np.arange(10 * step, 10 * step + 4)
    return {"input_ids": np.ones((4, 5), np.int64), "attention_mask": np.ones((4, 5), np.int64), "ids": ids,
            "labels": np.zeros(4, np.int64)}


PROBS = [0.5, 0.3, 0.2]


def feed(source, **kw) -> KnowledgeFeed:
    args = dict(world=2, total=12, strategy="skd", probs=PROBS, seed=7)
    args.update(kw)
    return make_feed(source, batches, **args)


def test_fake_source_is_a_knowledge_source():
    assert isinstance(FakeSource(2), KnowledgeSource)


def test_skd_draws_the_seeded_sequence_and_counts_global_examples():
    source = FakeSource(3)
    f = feed(source)
    served = [f.next_knowledge(s).teacher for s in range(12)]
    sampler = TeacherSampler(PROBS, 7)
    assert served == [sampler.draw() for _ in range(12)]  # the feed's draws are the sampler's, in order
    assert f.counts == [8 * served.count(k) for k in range(3)]  # B=4 per rank x world 2
    # each step's batch went to the teacher drawn for it
    assert [(c[1], c[2]) for c in source.calls] == [(t, 10 * s) for s, t in enumerate(served)]


def test_prefetch_sends_the_next_request_before_returning():
    source = FakeSource(3)
    f = feed(source)
    f.next_knowledge(0)
    assert [c[2] for c in source.calls] == [0, 10]  # step 1 already requested
    f = feed(FakeSource(3), prefetch=False)
    f.begin(0)  # nothing ahead without prefetch
    assert f.source.calls == []
    f.next_knowledge(0)
    assert [c[2] for c in f.source.calls] == [0]
    ahead = feed(FakeSource(3))
    ahead.begin(0)  # the loop's first request, before the first forward pass
    assert [c[2] for c in ahead.source.calls] == [0]
    ahead.next_knowledge(0)
    assert [c[2] for c in ahead.source.calls] == [0, 10]  # step 0 not asked twice
    last = feed(FakeSource(3))
    for s in range(12):
        last.next_knowledge(s)
    assert len(last.source.calls) == 12  # nothing asked past the last step


@pytest.mark.parametrize("prefetch", [True, False])
def test_state_round_trip_resumes_the_same_draws(prefetch):
    full = feed(FakeSource(3), prefetch=prefetch)
    want = [full.next_knowledge(s).teacher for s in range(12)]
    first = feed(FakeSource(3), prefetch=prefetch)
    first.begin(0)
    got = [first.next_knowledge(s).teacher for s in range(5)]
    state = first.state_dict()  # after step 5 with step 6 (maybe) prefetched: the draw for 5 is not in it
    resumed = feed(FakeSource(3), prefetch=prefetch, seed=123)  # another seed: the state decides
    resumed.load_state_dict(state)
    got += [resumed.next_knowledge(s).teacher for s in range(5, 12)]
    assert got == want and resumed.counts == full.counts


def test_average_asks_every_teacher_and_counts_all():
    source = FakeSource(3)
    f = feed(source, strategy="average", probs=None)
    k = f.next_knowledge(0)
    assert k.teacher == -1 and np.allclose(k.logits, 2.0)  # mean of 1, 2, 3
    assert f.counts == [8, 8, 8] and f.state_dict()["sampler"] is None


def test_no_source_means_no_knowledge_and_soft_label_stages():
    f = make_feed(None, batches, world=1, total=3)
    assert f.next_knowledge(0) is None and f.stage(0).soft_labels and f.stage(0).layers == ()
    assert f.state_dict() == {"counts": [], "sampler": None}


def test_stages_subset_the_request_per_step():
    request = KnowledgeRequest(outputs=("logits", "hidden"), student_layers=(1, 2), student_num_layers=2)
    source = FakeSource(2)
    f = feed(source, probs=[0.5, 0.5], total=8, request=request, schedule="progressive", ir_fraction=0.5)
    for s in range(8):
        f.next_knowledge(s)
    layers = [c[3].student_layers for c in source.calls]
    assert layers == [(1,), (1,), (2,), (2,), (), (), (), ()]  # IR phase layer by layer, then soft labels
    assert all(c[3].outputs == ("logits",) for c in source.calls[4:])


def test_a_lost_teacher_is_dropped_and_p_renormalised_over_the_rest():
    source = FakeSource(3)
    f = feed(source)
    served = [f.next_knowledge(s).teacher for s in range(5)]  # step 5 is already asked (prefetch)
    source.dead.add(0)
    served += [f.next_knowledge(s).teacher for s in range(5, 12)]
    ref, lost_at, want = TeacherSampler(PROBS, 7), None, []
    for s in range(12):
        t = ref.draw([1, 2] if lost_at is not None else None)
        if t == 0 and s >= 6 and lost_at is None:  # the first draw of teacher 0 after its death
            lost_at, t = s, ref.draw([1, 2])  # the step is drawn again among the live teachers
        want.append(t)
    assert lost_at is not None and served == want
    assert f.live() == [1, 2] and f.lost == {0: (lost_at, "killed by the test")}
    assert f.drain_events() == [(lost_at, "lost", 0, "killed by the test")] and f.drain_events() == []
    assert f.counts[0] == 8 * served[:lost_at].count(0) and sum(f.counts) == 8 * 12  # every step served once


class Union:
    """`agree` for feeds in threads: the union of what each rank found at a step (a barrier per step)."""

    def __init__(self, ranks: int) -> None:
        import threading

        self.found: set[int] = set()
        self.seen = [0]
        self.lock = threading.Lock()
        self.gather = threading.Barrier(ranks)
        self.reset = threading.Barrier(ranks, action=self._clear)

        self.back: set[int] = set()

    def _clear(self) -> None:
        self.found.clear()
        self.back.clear()
        self.seen[0] = 0

    def __call__(self, lost: list[int], seen: int, back: list[int]) -> tuple[list[int], int, list[int]]:
        with self.lock:
            self.found.update(lost)
            self.back.update(back)
            self.seen[0] = max(self.seen[0], seen)
        self.gather.wait(timeout=10)
        union, newest, restarted = sorted(self.found), self.seen[0], sorted(self.back)
        self.reset.wait(timeout=10)
        return union, newest, restarted


def test_ranks_drop_the_same_teacher_at_the_same_step_when_only_one_saw_it_die():
    from concurrent.futures import ThreadPoolExecutor

    agree = Union(2)
    sources = [FakeSource(3), FakeSource(3)]
    sources[1].dead.add(0)  # rank 0's calls to teacher 0 still succeed; rank 1's fail
    feeds = [feed(src, agree=agree) for src in sources]
    with ThreadPoolExecutor(2) as pool:
        served = list(pool.map(lambda f: [f.next_knowledge(s).teacher for s in range(12)], feeds))
    assert served[0] == served[1] and 0 not in served[0]
    assert feeds[0].lost.keys() == feeds[1].lost.keys() == {0}
    assert feeds[0].lost[0][0] == feeds[1].lost[0][0]  # the same step on both ranks
    assert feeds[0].lost[0][1] == "lost on another data-parallel worker" and feeds[0].counts == feeds[1].counts


def test_a_teacher_dropped_while_its_actor_restarts_is_asked_again_once_ray_restarted_it(monkeypatch):
    """Teacher 0 is dropped while its actor is RESTARTING (its node gone) and comes back ALIVE; teacher 1 is
    dropped while ALIVE (silent past the timeout) and stays out until Ray restarts it; teacher 2 is DEAD.
    Both ranks take 0 back at the same step though only rank 1 looked it up in time."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.worker import membership

    monkeypatch.setattr(membership, "RETURN_CHECK_S", 0.0)  # look the dropped actors up at every step
    agree, sources = Union(2), [FakeSource(3), FakeSource(3)]
    feeds = [feed(src, agree=agree, total=40, probs=[1 / 3] * 3) for src in sources]

    def train(rank: int) -> list[int]:
        src, f, served = sources[rank], feeds[rank], []
        for s in range(40):
            if s == 3:
                src.dead.update({0, 1})
                src.states.update({0: ("RESTARTING", 1), 1: ("ALIVE", 0)})
            if s == 15:
                src.dead.discard(0)
                src.states[0] = ("ALIVE", 1) if rank == 1 else ("RESTARTING", 1)  # rank 0 has not seen it yet
                src.states[1] = ("ALIVE", 0)  # still silent, never restarted: not taken back
            served.append(f.next_knowledge(s).teacher)
        return served

    with ThreadPoolExecutor(2) as pool:
        served = list(pool.map(train, [0, 1]))
    assert served[0] == served[1]
    events = [feeds[r].drain_events() for r in range(2)]
    assert events[0] == events[1]
    back = [(s, k) for s, kind, k, _ in events[0] if kind == "back"]
    assert back == [(16, 0)]  # seen at step 15's agreement (0-based), asked from step 16's draw on
    lost_at = {k: s for s, kind, k, _ in events[0] if kind == "lost"}
    assert set(lost_at) == {0, 1} and all(3 <= s < 15 for s in lost_at.values())
    assert 0 not in served[0][max(lost_at.values()) + 1:16] and 0 in served[0][16:]
    assert 1 not in served[0][max(lost_at.values()) + 1:]
    assert feeds[0].live() == [0, 2] and set(feeds[0].lost) == {1}


def test_a_dropped_teacher_whose_actor_is_dead_or_silent_is_never_looked_up_again_unless_restarted(monkeypatch):
    from orchestrator.worker import membership

    monkeypatch.setattr(membership, "RETURN_CHECK_S", 0.0)
    source = FakeSource(2)
    f = feed(source, world=1, total=30, probs=[0.5, 0.5])
    source.dead.add(1)
    source.states[1] = ("DEAD", 2)  # restarts used up (or killed for good): final
    served = [f.next_knowledge(s).teacher for s in range(10)]
    source.dead.discard(1)
    source.states[1] = ("ALIVE", 3)  # cannot happen in Ray; a DEAD actor is not even looked up again
    served += [f.next_knowledge(s).teacher for s in range(10, 30)]
    assert f.live() == [0] and 1 in f.lost and served.count(1) == 0
    g = feed(FakeSource(2), world=1, total=30, probs=[0.5, 0.5])
    g.source.dead.add(1)
    g.source.states[1] = ("ALIVE", 0)  # silent past the knowledge timeout
    served = [g.next_knowledge(s).teacher for s in range(10)]
    g.source.dead.discard(1)
    assert [g.next_knowledge(s).teacher for s in range(10, 12)] and g.live() == [0]
    g.source.states[1] = ("ALIVE", 1)  # Ray restarted it since: taken back
    served = [g.next_knowledge(s).teacher for s in range(12, 30)]
    assert g.live() == [0, 1] and 1 in served and [e[1] for e in g.drain_events()] == ["lost", "back"]


def test_average_goes_on_over_the_live_teachers():
    source = FakeSource(3)
    f = feed(source, strategy="average", probs=None)
    f.next_knowledge(0)
    source.dead.add(2)
    f.next_knowledge(1)  # step 2 was asked of all three; it is asked again of teachers 0 and 1
    k = f.next_knowledge(2)
    assert k.teacher == -1 and np.allclose(k.logits, 1.5)  # mean of 1 and 2
    assert f.counts == [24, 24, 16] and f.live() == [0, 1]


@pytest.mark.parametrize("prefetch", [True, False])
def test_no_teacher_left_raises_with_the_state_to_resume_from(prefetch):
    from actors.errors import TeachersLostError

    full = feed(FakeSource(2), probs=[0.6, 0.4], prefetch=prefetch)
    want = [full.next_knowledge(s).teacher for s in range(12)]
    source = FakeSource(2)
    f = feed(source, probs=[0.6, 0.4], prefetch=prefetch)
    got = [f.next_knowledge(s).teacher for s in range(4)]
    source.dead.update({0, 1})
    with pytest.raises(TeachersLostError, match=r"t0 at step \d+ \(killed by the test\); t1 at step"):
        for s in range(4, 12):
            got.append(f.next_knowledge(s).teacher)
    stopped = len(got)  # the step that found no teacher is not trained
    resumed = feed(FakeSource(2), probs=[0.6, 0.4], prefetch=prefetch)
    resumed.load_state_dict(f.state_dict())
    got += [resumed.next_knowledge(s).teacher for s in range(stopped, 12)]
    assert got == want  # a resumed run (teachers back) draws what the uninterrupted run drew


def test_teachers_left_with_zero_probability_count_as_none_left():
    from actors.errors import TeachersLostError

    source = FakeSource(3)
    f = feed(source, probs=[1.0, 0.0, 0.0])  # e.g. single:t0
    f.next_knowledge(0)
    source.dead.add(0)
    with pytest.raises(TeachersLostError, match="have sampling probability 0"):
        f.next_knowledge(1)
        f.next_knowledge(2)


# A served pool that changes while the run trains (fakes.FakeElastic follows actors.served.ServedPool's rules)

def Elastic(versions: list[list[int]], n: int = 3) -> fakes.FakeElastic:
    return fakes.FakeElastic([fakes.FakeInfo(f"t{i}") for i in range(n)], versions,
                             lambda k, batch, request: Knowledge(k, np.full((batch.size, 2), k + 1.0, np.float32), 0.0),
                             lambda kind, k, batch, request: (kind, k, int(batch.ids[0]), request))


def uniform(live: list[int], n: int) -> list[float]:
    return [1.0 / len(live) if k in live else 0.0 for k in range(n)]


def elastic_feed(source, **kw) -> KnowledgeFeed:
    from orchestrator.config import DistributionConfig
    from orchestrator.common.sampling import Reweigh

    args = dict(world=1, total=16, strategy="skd", probs=[0.5, 0.5], seed=3, key="run-1",
                reweigh=Reweigh("uniform", DistributionConfig(), [0.5, 0.5]))
    args.update(kw)
    return make_feed(source, batches, **args)


def reference(changes: dict[int, list[int]], n_steps: int, seed: int = 3) -> list[int]:
    """The teachers an uninterrupted run draws when p becomes uniform over `changes[s]` before 0-based step s."""
    sampler, out, live = TeacherSampler([0.5, 0.5], seed), [], [0, 1]
    for s in range(n_steps):
        if s in changes:
            live = changes[s]
            sampler.set_probs(uniform(live, max(max(live) + 1, 2)))
        out.append(sampler.draw(live))
    return out


def test_a_teacher_that_joins_gets_its_share_and_one_that_leaves_takes_its_mass_away():
    source = Elastic([[0, 1], [0, 1, 2], [1, 2]])
    f = elastic_feed(source)
    got = [f.next_knowledge(s).teacher for s in range(4)]  # step 4 is already asked (prefetch)
    source.published = 1  # t2 joins: seen at step 4's agreement, so step 5 is the first drawn with it
    got += [f.next_knowledge(s).teacher for s in range(4, 9)]
    assert f.probs == pytest.approx([1 / 3] * 3) and f.names == ["t0", "t1", "t2"] and f.live() == [0, 1, 2]
    source.published = 2  # t0 leaves before step 10
    got += [f.next_knowledge(s).teacher for s in range(9, 16)]
    assert got == reference({5: [0, 1, 2], 10: [1, 2]}, 16)
    assert 2 in got[5:10] and 0 not in got[10:]
    assert f.probs == pytest.approx([0.0, 0.5, 0.5]) and f.live() == [1, 2]
    assert [(s, kind, k) for s, kind, k, _ in f.drain_events()] == [(5, "join", 2), (10, "leave", 0)]
    assert source.records == {"run-1": {5: 1, 10: 2}}  # for a resumed run to apply them at the same steps
    assert f.counts[2] == 4 * got.count(2) and sum(f.counts) == 4 * 16


def test_ranks_apply_a_change_at_the_same_step_when_they_see_it_at_different_steps():
    from concurrent.futures import ThreadPoolExecutor

    agree = Union(2)
    sources = [Elastic([[0, 1], [0, 1, 2]]), Elastic([[0, 1], [0, 1, 2]])]

    def run(rank: int) -> list[int]:
        f = elastic_feed(sources[rank], agree=agree)
        out = []
        for s in range(16):
            if s == (3 if rank == 0 else 9):  # the directory's answer reaches rank 1 much later
                sources[rank].published = 1
            out.append(f.next_knowledge(s).teacher)
        return out

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(run, [0, 1]))
    assert got[0] == got[1] == reference({4: [0, 1, 2]}, 16)
    assert sources[0].records == sources[1].records == {"run-1": {4: 1}}


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_resumed_run_applies_recorded_changes_at_their_steps_not_when_it_polls(prefetch):
    source = Elastic([[0, 1], [0, 1, 2]])
    f = elastic_feed(source, prefetch=prefetch)
    got, state = [], None
    for s in range(16):
        if s == 3:
            state = {"step": 3, **f.state_dict()}  # the checkpoint after 3 steps
        if s == 6:
            source.published = 1
        got.append(f.next_knowledge(s).teacher)
    joined_at = next(s for s, kind, k, _ in f.drain_events() if kind == "join")
    assert joined_at == 7 and got == reference({7: [0, 1, 2]}, 16)
    resumed_source = Elastic([[0, 1], [0, 1, 2]])
    resumed_source.published, resumed_source.version, resumed_source.records = 1, 1, source.records  # attached later
    resumed = elastic_feed(resumed_source, prefetch=prefetch)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints hold JSON
    assert resumed.names == ["t0", "t1"] and resumed.members.replay == {7: 1}
    assert [resumed.next_knowledge(s).teacher for s in range(3, 16)] == got[3:]


def test_a_run_stopped_with_no_teacher_left_resumes_on_the_teachers_added_since():
    from actors.errors import TeachersLostError

    source = Elastic([[0, 1], [1], []])
    f = elastic_feed(source)
    f.begin(0)
    got = [f.next_knowledge(s).teacher for s in range(2)]
    source.published = 1  # t0 leaves before step 3
    got += [f.next_knowledge(s).teacher for s in range(2, 4)]
    source.published = 2  # t1 leaves too before step 5: nothing left to ask
    got.append(f.next_knowledge(4).teacher)
    with pytest.raises(TeachersLostError, match="lost before step 6"):
        f.next_knowledge(5)
    state = json.loads(json.dumps({"step": 5, **f.state_dict()}))
    assert state["pool"]["live"] == []
    source.versions.append([2])  # `skd teachers add` t2 while the run is stopped
    source.published = 3
    resumed = elastic_feed(source)
    resumed.load_state_dict(state)  # follows the pool as it is now, recorded for later restarts
    resumed.begin(5)
    assert [resumed.next_knowledge(s).teacher for s in range(5, 8)] == [2, 2, 2]
    assert resumed.live() == [2] and source.records["run-1"][5] == 3


def test_a_run_resumed_on_a_pool_served_anew_follows_it_by_name_not_by_its_old_version():
    source = Elastic([[0, 1], [0, 1, 2], [1, 2]])
    f = elastic_feed(source)
    source.published = 2  # t2 joins and t0 leaves before step 1: version 2
    for s in range(4):
        f.next_knowledge(s)
    state = json.loads(json.dumps({"step": 4, **f.state_dict()}))
    assert state["pool"]["version"] == 2 and state["pool"]["names"] == ["t0", "t1", "t2"]
    # `skd teachers stop`, then `serve` again: a new directory at version 0, its catalogue in another order,
    # serving t1 and t0 (not t2)
    anew = fakes.FakeElastic([fakes.FakeInfo(n) for n in ("t1", "t0", "t2")], [[0, 1]], source.answer,
                             source.describe_call)
    anew.identity = "serving-2"
    resumed = elastic_feed(anew)
    resumed.load_state_dict(state)
    assert resumed.names == ["t0", "t1", "t2"] and anew.members == [1, 0, 2] and resumed.live() == [0, 1]
    assert resumed.members.replay == {} and resumed.probs == pytest.approx([0.5, 0.5, 0.0])
    assert [(s, kind, k) for s, kind, k, d in resumed.drain_events()] == [(4, "leave", 2), (4, "join", 0)]
    assert {resumed.next_knowledge(s).teacher for s in range(4, 16)} == {0, 1}


def test_begin_with_no_teacher_to_ask_leaves_the_error_to_the_step():
    from actors.errors import TeachersLostError

    source = Elastic([[0, 1], [0, 1]])
    f = elastic_feed(source, probs=[0.5, 0.5], reweigh=lambda infos, live: [0.0] * len(infos))  # e.g. weights
    f.begin(0)  # nothing sent, nothing raised: the loop's step reports it with a checkpoint
    with pytest.raises(TeachersLostError, match="sampling probability 0"):
        f.next_knowledge(0)


def test_membership_settles_a_step_and_applies_what_comes_back_from_the_next_step_only(monkeypatch):
    """`Membership` alone: the agreement drops what any rank lost, and a teacher back is live from step + 1,
    never after the run's last step."""
    from orchestrator.worker import membership
    from orchestrator.worker.membership import Membership

    monkeypatch.setattr(membership, "RETURN_CHECK_S", 0.0)
    seen_by_agree = []

    def agree(lost, seen, back):  # another rank lost teacher 2 at this step
        seen_by_agree.append((lost, seen, back))
        return sorted(set(lost) | {2}), seen, back

    source = FakeSource(3)
    m = Membership(source, agree=agree)
    source.states[0] = ("RESTARTING", 1)
    again, seen, back = m.settle(4, {0: "node gone"})
    assert again and m.live() == [1] and m.lost == {0: (4, "node gone"), 2: (4, "lost on another data-parallel worker")}
    source.states[0] = ("ALIVE", 1)
    again, seen, back = m.settle(5, {})
    assert seen_by_agree[-1] == ([], 0, [0]) and back == [0]
    m.advance(5, 6, seen, back)  # step 5 is the last: nothing changes after it
    assert m.live() == [1]
    m.advance(5, 10, seen, back)
    assert m.live() == [0, 1] and 0 not in m.lost
    assert [(s, kind, k) for s, kind, k, _ in m.drain_events()] == [(4, "lost", 0), (4, "lost", 2), (6, "back", 0)]
    assert "t2 at step 5 (lost on another data-parallel worker)" in m.all_lost_message(9)
