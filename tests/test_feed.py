"""The knowledge feed without Ray: a fake in-process `KnowledgeSource` records what it was asked."""

from __future__ import annotations

import numpy as np
import pytest

from actors.knowledge import Knowledge, KnowledgeRequest, KnowledgeSource
from orchestrator.feed import KnowledgeFeed
from orchestrator.sampling import TeacherSampler
from tests import fakes


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
    return KnowledgeFeed(source, batches, **args)


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
    f = KnowledgeFeed(None, batches, world=1, total=3)
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
