"""Faults on a real local Ray cluster with a real MLflow store and tiny random BERTs: teachers lost for
good, a student worker killed, the driver interrupted. One module cluster (4 logical CPUs, so two student
workers and two teachers fit on the 2-core machine); teachers are untrained tiny BERTs written as if
prepared (`tests.tiny.make_tiny_teachers`): the faults are in serving and training, not in fine-tuning."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from actors.errors import TeachersLostError
from orchestrator.driver import runtime
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill
from orchestrator.driver.plan import make_plan
from orchestrator.driver.sources import start_pool
from tests.conftest import tiny_raw
from tests.faultkit import (checkpoint_registered, checkpoint_written, history, kill_workers, start_mlflow_server,
                            step_of, stop, teacher_requests, when)
from tests.tiny import make_tiny_teachers


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    runtime.start_local_ray(4, dashboard=False, log_to_driver=False)
    tmp = tmp_path_factory.mktemp("faults")
    # untrained tiny teachers, as if prepared: the faults are in serving and training, not in fine-tuning
    section = make_tiny_teachers(tmp / "teachers", {"t4": (4, 32, 2), "t2": (2, 32, 2)})[1]

    def cfg(*overrides: str):
        return load_config(None, ["distill.log_every=5", *overrides], base=tiny_raw(tmp, tiny_model, teachers=section))

    yield {"cfg": cfg, "client": MlflowClient(cfg().tracking_uri()), "tmp": tmp}
    ray.shutdown()


def shared_pool(cfg):
    plan = make_plan(cfg)
    resources = plan.resources(ray.cluster_resources(), len(plan.active))
    return start_pool(plan, resources, plan.active)


def test_a_teacher_lost_for_good_mid_run_is_dropped_on_every_rank_and_the_run_finishes(env):
    cfg = env["cfg"]("distill.max_steps=60", "distill.eval_every=30", "ray.num_workers=2",
                     "mlflow.run_name=teacher-lost")
    pool = shared_pool(cfg)
    result, killed_after = {}, []
    worker = threading.Thread(target=lambda: result.update(out=run_distill(cfg, source=pool)))
    worker.start()
    try:  # once the run is well under way (2 ranks x 15 steps), kill t2 (index 1) for good
        if when(lambda: teacher_requests(pool) >= 30, worker.is_alive, every_s=0.05):
            killed_after.append(teacher_requests(pool))
            ray.kill(pool.actors[1], no_restart=True)
        worker.join(timeout=600)
    finally:
        pool.close()
    out, client = result["out"], env["client"]
    assert killed_after and out.status == "FINISHED" and out.steps == 60
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    tag = run.data.tags["skd.teacher_lost.t2"]
    lost_step = step_of(tag)
    assert killed_after[0] // 2 <= lost_step <= 60 and "ActorDiedError" in tag
    teachers = history(client, out.run_id, "train/teacher")
    assert [s for s, _ in teachers] == list(range(1, 61))
    assert all(v == 0.0 for s, v in teachers if s >= lost_step)  # p renormalised onto t4 alone
    assert any(v == 1.0 for s, v in teachers if s < lost_step)  # t2 did teach before
    alive = history(client, out.run_id, "teachers/alive")
    assert alive[0][1] == 2.0 and alive[-1][1] == 1.0
    assert sum(out.counts.values()) == 60 * 16  # every step served once, 8 examples x 2 ranks


def test_every_teacher_lost_checkpoints_fails_clearly_and_resume_finishes(env):
    cfg = env["cfg"]("distill.max_steps=12", "distill.eval_every=6", "mlflow.run_name=all-lost")
    pool = shared_pool(cfg)
    for actor in pool.actors.values():
        ray.kill(actor, no_restart=True)
    with pytest.raises(TeachersLostError, match=r"t4 at step 1 .*t2 at step 1 .*checkpoint after step 0.*--resume"):
        run_distill(cfg, source=pool)
    client = env["client"]
    failed = client.search_runs([client.get_experiment_by_name("skd-test").experiment_id],
                                "tags.`mlflow.runName` = 'all-lost'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert failed[0].data.tags["skd.teacher_lost.t4"].startswith("step 1: ")
    out = run_distill(cfg, resume=True)  # its own, new teachers
    assert out.run_id == failed[0].info.run_id and out.status == "FINISHED" and out.steps == 12
    assert sum(out.counts.values()) == 12 * 8


def test_a_corrupt_newest_checkpoint_is_passed_over_on_resume_and_none_left_is_one_clear_error(env):
    import re
    from pathlib import Path

    from orchestrator.common.failures import WorkerFailedError

    # two workers: with none left, a restart of the group would meet the same error, so it is not retried
    steps = ("distill.max_steps=12", "distill.checkpoint_every=4", "distill.eval_every=12", "ray.num_workers=2",
             "ray.max_failures=2", "mlflow.run_name=corrupt-checkpoint")
    first = run_distill(env["cfg"](*steps), stop_after=8)
    assert first.status == "KILLED" and first.steps == 8
    weights = Path(first.checkpoint) / "model" / "model.safetensors"  # step 8's, the newest
    weights.write_bytes(weights.read_bytes()[:-64])
    second = run_distill(env["cfg"](*steps), resume=True, stop_after=10)
    client = env["client"]
    assert second.run_id == first.run_id and second.status == "KILLED" and second.steps == 10
    tag = client.get_run(second.run_id).data.tags["skd.checkpoint_refused"]
    assert tag.startswith("resumed at step 4; step 8: ") and f"{weights.name} has" in tag and "when written" in tag
    logged = [m.step for m in client.get_metric_history(second.run_id, "train/loss")]
    assert logged.count(5) == 2 and logged.count(9) == 1  # steps 5-8 trained again from step 4's checkpoint
    for folder in [d for d in Path(second.checkpoint).parent.glob("checkpoint_*") if d.is_dir()]:  # all damaged
        state = folder / "trainer_state.json"
        state.write_text(state.read_text().replace('"step"', '"step" '))
    with pytest.raises(WorkerFailedError, match=r"worker stopped: no checkpoint of this run can be trusted: step \d+: .*"
                                                r"trainer_state.json has .*not retried: a restart.*Traceback: ") \
            as caught:
        run_distill(env["cfg"](*steps), resume=True)
    log = Path(re.search(r"Traceback: (\S+)$", str(caught.value)).group(1))
    assert log.parent == env["cfg"]().out_dir() / "logs" and "CheckpointError" in log.read_text()
    assert client.get_run(first.run_id).info.status == "FAILED"


def test_a_teacher_answering_nan_stops_the_run_with_a_checkpoint_naming_it_or_is_skipped(env):
    """A teacher whose weights went NaN (a real corrupt file, served by its actor): `distill.nonfinite: stop`
    ends the run FAILED with a checkpoint and no student, naming the teacher and rows; `skip` skips each step."""
    import dataclasses
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from actors.errors import NonFiniteError
    from actors.manifest import read_manifest, write_manifest
    from orchestrator.common.checkpointing import verify_checkpoint

    teachers = read_manifest(env["cfg"]().manifest_path())
    t2 = next(t for t in teachers if t.name == "t2")
    bad = env["tmp"] / "t2-nan"
    shutil.copytree(t2.checkpoint, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("classifier.") and k.endswith("weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    manifest = env["tmp"] / "nan-teachers.json"
    write_manifest(manifest, [dataclasses.replace(t, checkpoint=str(bad)) if t is t2 else t for t in teachers])
    steps = ("distill.max_steps=6", "distill.strategy=single:t2", f"teachers.manifest={manifest}")
    cfg = env["cfg"](*steps, "mlflow.run_name=nan-teacher")
    with pytest.raises(NonFiniteError, match=r"step 1: the loss is nan, the gradient norm nan; teacher t2 answered "
                                             r"NaN/inf for 8 rows \(example ids \[\d+, .*last finite state"):
        run_distill(cfg)
    client = env["client"]
    [run] = client.search_runs([client.get_experiment_by_name("skd-test").experiment_id],
                               "tags.`mlflow.runName` = 'nan-teacher'")
    assert run.info.status == "FAILED" and not (cfg.out_dir() / "students" / "nan-teacher").exists()
    checkpoints = [d for d in Path(cfg.storage_path()).glob(f"nan-teacher-{run.info.run_id[:8]}/checkpoint_*")
                   if d.is_dir()]
    assert checkpoints and all(verify_checkpoint(c) is None for c in checkpoints)  # finite weights: resumable
    skipped = run_distill(env["cfg"](*steps, "distill.nonfinite=skip", "mlflow.run_name=nan-skip"))
    assert skipped.status == "FINISHED" and skipped.steps == 6
    assert history(client, skipped.run_id, "train/nonfinite_skipped") == [(s, float(s)) for s in range(1, 7)]


def test_a_killed_student_worker_restarts_from_the_checkpoint_with_the_same_teacher_sequence(env):
    steps = ("distill.max_steps=160", "distill.eval_every=80", "distill.checkpoint_every=20")
    reference = run_distill(env["cfg"](*steps, "mlflow.run_name=worker-ref"))
    cfg = env["cfg"](*steps, "mlflow.run_name=worker-killed", "ray.max_failures=1")
    result, killed = {}, []
    worker = threading.Thread(target=lambda: result.update(out=run_distill(cfg)))
    worker.start()
    if when(checkpoint_registered(cfg.storage_path(), "worker-killed"), worker.is_alive):
        killed = kill_workers()  # kill -9 the worker once its first checkpoint is registered
    worker.join(timeout=600)
    out, client = result["out"], env["client"]
    assert killed, "the worker process was not found before the run ended"
    logged = [m.step for m in client.get_metric_history(out.run_id, "train/loss")]
    assert logged.count(1) == 1 and logged.count(20) == 1  # the restart began after step 20's checkpoint
    assert out.status == "FINISHED" and out.steps == 160 and out.counts == reference.counts
    assert history(client, out.run_id, "train/teacher") == history(client, reference.run_id, "train/teacher")
    assert client.get_run(out.run_id).info.status == "FINISHED"


def test_ctrl_c_on_the_driver_ends_the_run_killed_with_a_checkpoint_and_resume_finishes_it(env, tmp_path):
    """`skd distill` in its own process (its own local Ray); SIGINT after its first checkpoint."""
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    steps = ["distill.max_steps=160", "distill.eval_every=80", "distill.checkpoint_every=20"]
    base = env["cfg"]()
    config = tmp_path / "interrupt.yaml"
    raw = json.loads(base.model_dump_json(exclude_none=True, exclude={"tune"}))
    raw["ray"]["num_cpus"] = 2
    config.write_text(yaml.safe_dump(raw))
    sets = [a for s in [*steps, "mlflow.run_name=interrupted", "distill.log_every=5"] for a in ("--set", s)]
    log = tmp_path / "skd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "skd"), "distill", "-c", str(config), *sets],
                                stdout=out, stderr=subprocess.STDOUT)
        if when(checkpoint_written(base.storage_path(), "interrupted"), lambda: proc.poll() is None):
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "SIGINT: stopping at the next step boundary" in text and "--resume" in text
    # the console, not a terminal here: a phase line, plain progress lines, no Ray noise or worker prefixes
    assert "[skd] interrupted: 160 steps" in text and "\n[skd] step 5/160 loss " in text
    assert "PreemptionWatcher" not in text and "Reporting training result" not in text
    assert "(RayTrainWorker pid=" not in text and "Autoscaler status" not in text
    client = env["client"]
    exp = client.get_experiment_by_name("skd-test").experiment_id
    [run] = client.search_runs([exp], "tags.`mlflow.runName` = 'interrupted'")
    assert run.info.status == "KILLED"
    losses = history(client, run.info.run_id, "train/loss")
    import re

    stopped = int(re.search(r"stopped after step (\d+) on the driver's interrupt", text).group(1))
    assert 20 <= stopped < 160 and stopped % 5 == 0  # at a log_every boundary, after the first checkpoint
    assert [s for s, _ in losses] == list(range(1, stopped + 1))  # every trained step's metrics were flushed
    out = run_distill(env["cfg"](*steps, "mlflow.run_name=interrupted"), resume=True)
    assert out.run_id == run.info.run_id and out.status == "FINISHED" and out.steps == 160
    ref = client.search_runs([exp], "tags.`mlflow.runName` = 'worker-ref'")
    if ref:  # the uninterrupted run of the same steps (from the worker test): the same teachers
        assert history(client, out.run_id, "train/teacher") == history(client, ref[0].info.run_id, "train/teacher")


def test_an_mlflow_server_outage_mid_run_loses_no_metric(env, tmp_path):
    """The server is stopped once the teachers served 20 requests and restarted only after 20 more were
    served from the moment it was told to stop (training went on; a loaded machine can take seconds to shut
    the server down), so the outage falls inside the run however fast it runs."""
    port = runtime.free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    cfg = env["cfg"]("distill.max_steps=600", "distill.eval_every=300", f"mlflow.tracking_uri={uri}",
                     "mlflow.experiment=skd-outage", "mlflow.run_name=outage")
    pool = shared_pool(cfg)
    result, served_while_down = {}, []
    worker = threading.Thread(target=lambda: result.update(out=run_distill(cfg, source=pool, register_as=None)))
    worker.start()
    try:
        if when(lambda: teacher_requests(pool) >= 20, worker.is_alive, every_s=0.05):
            at_stop = teacher_requests(pool)
            stop(server)
            if when(lambda: teacher_requests(pool) >= at_stop + 20, worker.is_alive, timeout_s=120, every_s=0.05):
                served_while_down.append(teacher_requests(pool) - at_stop)
            server = start_mlflow_server(port, tmp_path)
        worker.join(timeout=900)
        client = MlflowClient(uri)
        out = result["out"]
        assert served_while_down, "the run ended before 20 steps were trained with the server down"
        assert out.status == "FINISHED" and out.steps == 600
        assert client.get_run(out.run_id).info.status == "FINISHED"
        for key in ("train/loss", "train/teacher"):  # every step's metrics reached the store
            assert {m.step for m in client.get_metric_history(out.run_id, key)} == set(range(1, 601))
    finally:
        pool.close()
        stop(server)


def test_an_unreachable_tracking_server_is_a_clear_error_before_any_actor_starts(env):
    from actors.errors import SkdError

    uri = f"http://127.0.0.1:{runtime.free_port()}"  # nothing listens there
    before = ray.available_resources().get("CPU")
    with pytest.raises(SkdError, match=r"mlflow.tracking_uri http://127.0.0.1:\d+: the MLflow tracking server "
                                       r"does not answer .*mlflow server --host 127.0.0.1"):
        run_distill(env["cfg"](f"mlflow.tracking_uri={uri}", "mlflow.run_name=no-store"))
    assert ray.available_resources().get("CPU") == before  # no teacher actor or worker was started


def test_metric_logger_spills_past_its_bound_while_the_store_is_down_and_replays_in_order(tmp_path):
    from orchestrator.tracking.logger import MetricLogger

    port = runtime.free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("spill")).info.run_id
    stop(server)
    spill = tmp_path / "spill.jsonl"
    logger = MetricLogger(uri, run_id, max_buffered=20, spill_path=spill, retry_s=0.2, drain_s=120)
    for step in range(1, 61):  # 60 steps x 2 values while the store is down
        logger.log({"train/loss": 1.0 / step, "train/teacher": step % 2}, step)
        if step == 30:
            logger.set_tag("skd.teacher_lost.t2", "step 30: test")
        logger.flush()
        time.sleep(0.02)
    assert spill.is_file() and logger.pending == 121  # bounded memory: the oldest values went to the file
    server = start_mlflow_server(port, tmp_path)
    try:
        logger.close()
        assert logger.pending == 0 and not spill.exists()  # all sent, the spill file removed
        losses = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, 61))
        assert client.get_run(run_id).data.tags["skd.teacher_lost.t2"] == "step 30: test"
    finally:
        stop(server)


def test_metric_logger_replays_a_spill_file_left_by_a_killed_worker_and_sets_aside_refused_values(tmp_path):
    import json

    from orchestrator.tracking.logger import MetricLogger

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    spill = tmp_path / "spill.jsonl"
    good = json.dumps({"k": "train/loss", "v": 0.5, "t": 1, "s": 7})
    spill.write_text(good + "\n" + '{"k": "train/loss", "v": 0.4, "t"')  # the killed worker's last line, cut short
    logger = MetricLogger(client.tracking_uri, run_id, spill_path=spill, retry_s=0.1, drain_s=30)
    logger.log({"bad?<name": 1.0}, 8)  # MLflow refuses this name (HTTP 400): set aside, not retried forever
    logger.flush()
    logger._collect(block=True)
    logger.log({"train/loss": 0.3}, 9)
    logger.close()
    assert logger.pending == 0 and not spill.exists()
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")) == [(7, 0.5), (9, 0.3)]
    rejected = spill.with_suffix(".rejected.jsonl").read_text()
    assert '"bad?<name"' in rejected
