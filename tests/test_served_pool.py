"""A served, elastic teacher pool on a real local Ray cluster (4 logical CPUs) with tiny random BERTs and a real
MLflow store: `skd teachers serve/status/add/remove/stop`, runs attaching with `teachers.pool`, a teacher
joining and one leaving while two data-parallel ranks train, and the run resumed with the pool's state."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import ray
from mlflow.tracking import MlflowClient

from actors.errors import SkdError
from actors.served import pool_names
from orchestrator.driver import runtime
from orchestrator.commands import serving
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill
from orchestrator.common.sampling import TeacherSampler
from tests.conftest import tiny_raw
from tests.faultkit import step_of, when
from tests.test_faults import history
from tests.tiny import make_tiny_teachers


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    address = runtime.start_local_ray(4, dashboard=False, log_to_driver=False)
    try:
        tmp = tmp_path_factory.mktemp("served")
        # untrained tiny teachers (serving is what is tested): t4, t2 served first; t3 joins later
        _, section = make_tiny_teachers(tmp / "teachers", {"t4": (4, 32, 2), "t2": (2, 32, 2), "t3": (3, 32, 2)})
        three = tiny_raw(tmp, tiny_model, teachers=section)
        two = tiny_raw(tmp, tiny_model, teachers={**section, "members": section["members"][:2]})

        def cfg(*overrides: str, base=two):  # the pool's config: t4, t2; base=three also lists t3
            return load_config(None, [f"ray.address={address}", "teachers.pool=p", "distill.log_every=5", *overrides],
                               base=base)

        serving.serve(cfg())
        yield {"cfg": cfg, "three": three, "address": address, "client": MlflowClient(cfg().tracking_uri())}
    finally:
        ray.shutdown()


def pool_status():
    (pool,) = serving.status("p")
    return {t["name"]: t for t in pool["teachers"]}


def test_a_served_pool_lists_its_teachers_and_refuses_what_it_cannot_serve(env):
    cfg = env["cfg"]
    teachers = pool_status()
    assert set(teachers) == {"t4", "t2"}
    assert all(t["status"] == "serving" and t["device"] == "cpu" and t["queued"] == 0 for t in teachers.values())
    node = ray.get_runtime_context().get_node_id()[:8]
    assert all(node in t["node"] for t in teachers.values())
    with pytest.raises(SkdError, match="already serves"):
        serving.serve(cfg())
    with pytest.raises(SkdError, match=r"no teacher pool named 'nope'.*pools here: p"):
        run_distill(cfg("teachers.pool=nope"))
    with pytest.raises(SkdError, match="does not serve 't3'"):
        run_distill(cfg(base=env["three"]))
    with pytest.raises(SkdError, match="set ray.address"):
        load_config(None, ["teachers.pool=p"], base=env["three"])


def test_the_cli_shows_the_pool(env):
    out = subprocess.run([sys.executable, "-m", "tuning.cli", "teachers", "status", "--address", env["address"]],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "teacher pool p (version" in out.stdout and "t4" in out.stdout and "serving" in out.stdout


def expected_teachers(steps: int, changes: dict[int, list[float]]) -> list[int]:
    """What a run with seed 0 and uniform p over t4, t2 draws when p becomes `changes[s]` from 1-based step s."""
    sampler, out, p = TeacherSampler([0.5, 0.5], 0), [], [0.5, 0.5]
    for s in range(1, steps + 1):
        if s in changes:
            p = changes[s]
            sampler.set_probs(p)
        out.append(sampler.draw([k for k, q in enumerate(p) if q > 0]))
    return out


def test_a_teacher_joins_and_one_leaves_while_two_ranks_train_and_resume_keeps_the_pool_state(env):
    cfg = env["cfg"]("distill.max_steps=700", "distill.eval_every=700", "ray.num_workers=2",
                     "mlflow.run_name=elastic")
    result = {}
    run = threading.Thread(target=lambda: result.update(out=run_distill(cfg, stop_after=600)))
    run.start()
    try:
        served = lambda: sum(t.get("requests", 0) for t in pool_status().values())  # noqa: E731
        assert when(lambda: served() >= 40, run.is_alive, every_s=0.2), "the run ended before t3 could join"
        serving.add(env["cfg"](base=env["three"]), ["t3"])
        assert when(lambda: pool_status()["t3"]["requests"] >= 10, run.is_alive, every_s=0.2), \
            "the run ended before t3 served"
        with serving.connect(None, env["address"]):
            serving.remove(None, ["t4"], "p", drain_s=5.0)
    finally:
        run.join(timeout=600)
    out, client = result["out"], env["client"]
    assert out.status == "KILLED" and out.steps == 600
    tags = client.get_run(out.run_id).data.tags
    joined, left = step_of(tags["skd.pool.join.t3"]), step_of(tags["skd.pool.leave.t4"])
    assert 1 < joined < left <= 600 and "pool version 1" in tags["skd.pool.join.t3"]
    teachers = [int(v) for _, v in history(client, out.run_id, "train/teacher")]
    changes = {joined: [1 / 3] * 3, left: [0.0, 0.5, 0.5]}
    assert teachers == expected_teachers(600, changes)  # every rank drew the same teacher at every step
    p = dict(history(client, out.run_id, "sampler/p/t3"))
    assert p[joined] == pytest.approx(1 / 3) and p[left] == pytest.approx(0.5)
    assert [v for _, v in history(client, out.run_id, "pool/version")][-1] == 2.0
    assert out.counts["t3"] == 16 * teachers.count(2)  # a joiner's samples reach the summary (8 x 2 ranks)

    resumed = run_distill(cfg, resume=True)  # the checkpoint holds the pool's version, the run's teachers, p
    assert resumed.status == "FINISHED" and resumed.run_id == out.run_id and resumed.steps == 700
    teachers = [int(v) for _, v in history(client, out.run_id, "train/teacher")]
    assert teachers == expected_teachers(700, changes) and set(teachers[600:]) <= {1, 2}
    assert resumed.counts["t4"] == out.counts["t4"]


def test_compare_attaches_to_the_served_pool_without_starting_teachers(env, tmp_path):
    import json

    import yaml

    from orchestrator.commands.compare import run_comparison

    cfg = env["cfg"]("distill.max_steps=4", "distill.eval_every=4")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json(exclude_none=True, exclude={"tune"}))))
    actors = len(ray.util.list_named_actors(all_namespaces=True))
    before = sum(t["requests"] for t in pool_status().values())
    summaries = run_comparison(cfg, str(path), ["skd:uniform", "single:t2"], [0], [])
    assert [len(v.runs) for v in summaries] == [1, 1] and all(v.runs[0].steps == 4 for v in summaries)
    assert sum(t["requests"] for t in pool_status().values()) == before + 8  # t4 left before: t2 and t3 serve
    assert summaries[1].runs[0].counts["t2"] == 32 and len(ray.util.list_named_actors(all_namespaces=True)) == actors
    # the paired difference from the baseline (the first variant), from the saved students' dev predictions
    assert summaries[0].paired is None and summaries[1].paired.baseline == "skd:uniform"
    assert summaries[1].paired.low <= summaries[1].paired.delta <= summaries[1].paired.high
    # the headline (parameters and speed against the best teacher) is measured once for the comparison's
    # one student architecture and best teacher: the same numbers for both variants
    speedups = [v.headline("headline/speedup") for v in summaries]
    assert speedups[0] is not None and speedups[0] == speedups[1]


def test_ctrl_c_ends_the_whole_comparison_not_just_its_current_run(env, tmp_path):
    """The first SIGINT stops the running variant with a checkpoint, and no later variant starts."""
    import json
    import os
    import signal

    import yaml

    from orchestrator.commands.compare import ComparisonInterrupted, run_comparison
    from tests.faultkit import checkpoint_written

    cfg = env["cfg"]("distill.max_steps=400", "distill.checkpoint_every=10", "distill.eval_every=400",
                     "distill.log_every=5", "distill.seed=7")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json(exclude_none=True, exclude={"tune"}))))
    first = threading.Thread(target=lambda: when(checkpoint_written(cfg.storage_path(), "skd-uniform-s7"),
                                                lambda: True, timeout_s=300) and os.kill(os.getpid(), signal.SIGINT))
    first.start()
    with pytest.raises(ComparisonInterrupted, match=r"stopped during skd:uniform seed 7 .* 0 of 2 runs had finished"):
        run_comparison(cfg, str(path), ["skd:uniform", "single:t2"], [7], [])
    first.join()
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.experiment_name()).experiment_id
    [stopped] = client.search_runs([exp], "attributes.run_name = 'skd-uniform-s7'")
    assert stopped.info.status == "KILLED"
    assert client.search_runs([exp], "attributes.run_name = 'single-t2-s7'") == []


def test_stop_removes_the_pool_and_a_run_resumes_on_the_pool_served_again(env):
    cfg = env["cfg"]("distill.max_steps=20", "distill.eval_every=20", "distill.checkpoint_every=10",
                     "mlflow.run_name=served-again")
    first = run_distill(cfg, stop_after=10)  # on t2 (t4 left in an earlier test): pool version 2
    assert first.status == "KILLED" and first.steps == 10
    with serving.connect(None, env["address"]):
        assert sorted(serving.stop("p")) == ["t2", "t3"]
    assert "p" not in pool_names()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "skd-pool-p"]
    serving.serve(env["cfg"]())  # t4 and t2 again: a new directory, its versions from 0
    resumed = run_distill(cfg, resume=True)
    assert resumed.status == "FINISHED" and resumed.run_id == first.run_id and resumed.steps == 20
    tags = env["client"].get_run(first.run_id).data.tags
    assert tags["skd.pool.join.t4"] == "step 11: pool served anew, version 0"
    assert set(int(v) for _, v in history(env["client"], first.run_id, "train/teacher")[10:]) <= {0, 1}
    with serving.connect(None, env["address"]):
        assert sorted(serving.stop("p")) == ["t2", "t4"]
