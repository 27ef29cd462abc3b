"""The teacher pool on a real Ray cluster: actor answers equal in-process ones; placement is checked."""

import numpy as np
import pytest

from actors.knowledge import KnowledgeRequest, KnowledgeSource, TokenBatch
from actors.manifest import TeacherInfo
from actors.pool import PlacementPlan, TeacherPool
from actors.teacher import Teacher
from actors.errors import SkdError


@pytest.fixture(scope="module")
def teachers(tiny_model):
    return [TeacherInfo(name=n, checkpoint=str(tiny_model), num_layers=4, hidden_size=32, parameters=1, dev_metric=0.5,
                        metric="accuracy", vocab="", num_labels=2, task="sst2") for n in ("a", "b")]


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 2000, size=(4, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return TokenBatch(ids, mask, np.arange(4))


def test_actor_knowledge_equals_in_process(ray_cluster, teachers):
    pool = TeacherPool.start(teachers, [0, 1], num_cpus=0.25, num_gpus=0, threads=1, regression=False)
    try:
        assert isinstance(pool, KnowledgeSource) and pool.live() == [0, 1] and pool.names == ["a", "b"]
        local = Teacher(0, teachers[0].checkpoint, 2, device="cpu")
        want = local.knowledge(batch()).logits
        got = pool.knowledge(0, batch())
        assert got.teacher == 0 and got.logits.shape == (4, 2) and got.wait_s >= 0
        np.testing.assert_allclose(got.logits, want, rtol=1e-5, atol=1e-6)
        avg = pool.submit_average(batch()).result()
        assert avg.teacher == -1
        np.testing.assert_allclose(avg.logits, want, rtol=1e-5, atol=1e-6)  # two copies of one model
    finally:
        pool.close()


def test_average_is_the_mean_of_every_teacher(ray_cluster, tmp_path):
    """Two teachers with different weights: the average equals the mean of both answers, so a pool that
    asked only one teacher (or returned one answer) fails."""
    from tests.tiny import make_tiny_teachers

    infos, _ = make_tiny_teachers(tmp_path, {"a": (2, 32, 2), "b": (2, 32, 2)})
    pool = TeacherPool.start(infos, [0, 1], num_cpus=0.25, num_gpus=0, threads=1, regression=False)
    try:
        answers = [Teacher(k, t.checkpoint, 2, device="cpu").knowledge(batch()).logits for k, t in enumerate(infos)]
        assert not np.allclose(answers[0], answers[1], atol=1e-4)  # the test can tell the teachers apart
        avg = pool.submit_average(batch()).result()
        np.testing.assert_allclose(avg.logits, (answers[0] + answers[1]) / 2, rtol=1e-5, atol=1e-6)
        half = pool.knowledge(1, batch(), KnowledgeRequest(wire_dtype="float16"))
        assert half.logits.dtype == np.float16
    finally:
        pool.close()


def test_placement_is_checked_before_actors_start():
    plan = PlacementPlan(teachers=4, teacher_cpus=1, teacher_gpus=1, workers=1, worker_cpus=1, worker_gpus=0)
    with pytest.raises(SkdError, match="need 4 GPUs: 4 for 4 teachers .* cluster has 2"):
        plan.check({"CPU": 16, "GPU": 2})
    plan.check({"CPU": 16, "GPU": 4})


def test_token_batch_consistency_check():
    with pytest.raises(ValueError, match="must both be"):
        TokenBatch(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.int64), np.arange(2)).check()
    with pytest.raises(ValueError, match="integer"):
        TokenBatch(np.zeros((2, 3)), np.zeros((2, 3)), np.arange(2)).check()


def test_a_teacher_that_fails_to_load_is_named(ray_cluster, teachers, tmp_path):
    """Teachers load in the background (wait=False, as `skd distill` starts them); a broken checkpoint is
    reported with the teacher's name, whether the caller waits at start or checks later."""
    import dataclasses
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(teachers[0].checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    ensemble = [teachers[0], dataclasses.replace(teachers[1], name="bad", checkpoint=str(broken))]
    pool = TeacherPool.start(ensemble, [0, 1], num_cpus=0.25, num_gpus=0, threads=1, regression=False, wait=False)
    try:
        with pytest.raises(SkdError, match=r"teacher bad \(.*broken\) failed to load"):
            pool.check_loaded()
        assert pool.knowledge(0, batch()).logits.shape == (4, 2)  # the healthy teacher still serves
    finally:
        pool.close()
    with pytest.raises(SkdError, match="teacher bad"):
        TeacherPool.start(ensemble, [1], num_cpus=0.25, num_gpus=0, threads=1, regression=False)
