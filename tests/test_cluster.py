"""A multi-node Ray cluster on this one machine (Ray's own `ray.cluster_utils.Cluster`): a head that takes
no work, two teacher nodes that declare a GPU (which this machine does not have) and the custom resource
`skd-teacher`, and a student node with `skd-student`. Checks that teachers land one per node through
their placement group and serve on what torch sees (CPU), that a plan the cluster cannot hold is refused
before anything starts, that a distill run spread over the nodes logs to a real MLflow server (proxied
artifacts), that `skd` without `ray.address` starts its own Ray beside this one instead of attaching to
it, and (last: it removes a node) that a teacher whose node goes mid-run is dropped within seconds and asked
again once a new node lets Ray restart its actor."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from actors.errors import SkdError
from actors.pool import PlacementPlan
from orchestrator.driver import runtime
from orchestrator.config.load import load_config
from orchestrator.commands.distill import run_distill
from orchestrator.driver.plan import make_plan
from orchestrator.driver.sources import start_pool
from tests.conftest import tiny_raw
from tests.faultkit import start_mlflow_server, stop
from tests.tiny import make_tiny_teachers

TEACHER_NODE = {"num_cpus": 1, "num_gpus": 1, "resources": {"skd-teacher": 1}}
STUDENT_NODE = {"num_cpus": 2, "resources": {"skd-student": 1}}
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}
"""The GCS's node health checks, tighter than Ray's defaults (3 s period, 10 s timeout, 5 failures: a silent node
is marked dead after about 65 s): after 5 to 20 s here, as `ray start --head --system-config` can set them."""
ON_NODES = ["teachers.num_gpus=1", "teachers.num_cpus=0.5", "teachers.placement=STRICT_SPREAD",
            "teachers.resources={skd-teacher: 1}", "ray.resources_per_worker={skd-student: 1}"]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("cluster")
    port = runtime.free_port()
    (tmp / "mlflow").mkdir()
    server = start_mlflow_server(port, tmp / "mlflow")  # first: if it fails, no Ray is left for later modules
    uri = f"http://127.0.0.1:{port}"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "_system_config": HEALTH_CHECK})

    section = {}

    def cfg(*overrides: str):
        # the nodes declare GPUs this machine lacks: students train on CPU (gloo, not NCCL)
        return load_config(None, [f"mlflow.tracking_uri={uri}", "teachers.finetune.cpus_per_worker=1",
                                  "ray.use_gpu=false", *overrides], base=tiny_raw(tmp, tiny_model, teachers=section))

    try:  # untrained tiny teachers, as if prepared (placement and serving are what is tested here)
        teacher_nodes = [nodes.add_node(**TEACHER_NODE) for _ in range(2)]
        nodes.add_node(**STUDENT_NODE)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        section.update(make_tiny_teachers(tmp / "teachers", {"t4": (4, 32, 2), "t2": (2, 32, 2)})[1])
        yield {"cfg": cfg, "address": nodes.address, "teacher_nodes": {n.node_id for n in teacher_nodes},
               "client": MlflowClient(uri), "tmp": tmp, "nodes": nodes, "teacher_node_handles": teacher_nodes}
    finally:
        ray.shutdown()
        stop(server)
        nodes.shutdown()


def test_teachers_run_one_per_teacher_node_on_what_torch_sees(cluster):
    cfg = cluster["cfg"](*ON_NODES)
    plan = make_plan(cfg)
    pool = start_pool(plan, plan.resources(ray.cluster_resources(), len(plan.active)), plan.active)
    try:
        stats = [ray.get(a.stats.remote()) for a in pool.actors.values()]
    finally:
        pool.close()
    assert len({s["node"] for s in stats}) == 2 and {s["node"] for s in stats} == cluster["teacher_nodes"]
    assert {s["device"] for s in stats} == {"cpu"}  # the nodes declare a GPU; torch sees none, so CPU


def test_a_served_pool_places_its_teachers_one_per_teacher_node_and_stops(cluster):
    from actors.served import pool_names
    from orchestrator.commands import serving

    cfg = cluster["cfg"](*ON_NODES, "teachers.pool=nodes", f"ray.address={cluster['address']}")
    (teachers,) = [p["teachers"] for p in [serving.serve(cfg)]]
    try:
        nodes = {t["node"].split("(")[1].rstrip(")") for t in teachers}
        assert {n[:8] for n in cluster["teacher_nodes"]} == nodes and {t["device"] for t in teachers} == {"cpu"}
    finally:
        assert sorted(serving.stop("nodes")) == ["t2", "t4"]
    assert "nodes" not in pool_names()


def test_a_plan_the_cluster_cannot_hold_is_refused_before_anything_starts(cluster):
    from ray.util import placement_group_table

    groups = set(placement_group_table())
    cfg = cluster["cfg"](*ON_NODES, "teachers.resources={skd-teacher: 2}")
    with pytest.raises(SkdError, match=r"need 4 of 'skd-teacher': 4 for 2 teachers \(2 each\).*cluster has 2"):
        run_distill(cfg)
    assert set(placement_group_table()) == groups  # refused before any placement group (or actor) was made


def test_strict_spread_needs_a_node_per_teacher():
    plan = PlacementPlan(teachers=3, teacher_cpus=1, teacher_gpus=1, workers=0, worker_cpus=1, worker_gpus=0,
                         strategy="STRICT_SPREAD")
    nodes = [{"CPU": 4, "GPU": 2}, {"CPU": 4, "GPU": 1}, {"CPU": 8}]
    with pytest.raises(SkdError, match=r"STRICT_SPREAD .* 3 teachers .* only 2 node\(s\) can hold one teacher"):
        plan.check({"CPU": 16, "GPU": 3}, nodes)
    PlacementPlan(3, 1, 1, 0, 1, 0, strategy="SPREAD").check({"CPU": 16, "GPU": 3}, nodes)  # two on one node: fine


def test_a_distill_run_spread_over_the_nodes_logs_to_the_mlflow_server(cluster):
    out = run_distill(cluster["cfg"](*ON_NODES, "mlflow.run_name=multi-node", "ray.keep_finished_checkpoints=true"),
                      register_as=None)
    client = cluster["client"]
    run = client.get_run(out.run_id)
    assert out.status == "FINISHED" and run.info.status == "FINISHED" and out.steps == 8
    assert len(client.get_metric_history(out.run_id, "train/loss")) == 8  # logged by the worker on the student node
    artifacts = {a.path for a in client.list_artifacts(out.run_id)} | {
        a.path for a in client.list_artifacts(out.run_id, "plots")}
    assert "plots/learning_curves.png" in artifacts and run.info.artifact_uri.startswith("mlflow-artifacts:")
    # the worker on the student node wrote Ray Train's checkpoint under ray.storage_path, shared by every node
    storage = cluster["cfg"]().storage_path()
    assert out.checkpoint and Path(out.checkpoint).is_relative_to(storage)
    assert (Path(out.checkpoint) / "trainer_state.json").is_file()


def test_skd_without_ray_address_starts_its_own_ray_beside_this_one_and_attaches_only_when_told(cluster):
    import json
    import subprocess
    import sys

    import yaml

    raw = json.loads(cluster["cfg"]().model_dump_json(exclude_none=True, exclude={"tune"}))
    raw["ray"]["num_cpus"] = 2
    config = cluster["tmp"] / "beside.yaml"
    config.write_text(yaml.safe_dump(raw))
    skd = str(Path(sys.executable).parent / "skd")
    started_at = __import__("time").time()
    own = subprocess.run([skd, "teachers", "prepare", "-c", str(config)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert own.returncode == 0, own.stdout[-2000:] + own.stderr[-2000:]  # prepared teachers: reused, no Ray needed
    # credentials in the tracking URI (the server ignores them) never reach the console or skd's files
    secret = "s3cret-pw"
    uri = raw["mlflow"]["tracking_uri"].replace("http://", f"http://skd-user:{secret}@")
    started = subprocess.run([skd, "distill", "-c", str(config), "--set", "mlflow.run_name=beside",
                              "--set", f"mlflow.tracking_uri={uri}", "--set", "distill.max_steps=2"],
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert "Started a local Ray instance" in started.stdout + started.stderr
    assert secret not in started.stdout + started.stderr and "View run" not in started.stdout
    assert f"browse: open {raw['mlflow']['tracking_uri']}/#/experiments/" in started.stdout  # skd's own link
    written = [f for f in Path(raw["output_dir"]).rglob("*") if f.is_file() and f.stat().st_mtime > started_at]
    assert written and not [f for f in written if secret.encode() in f.read_bytes()]
    attached = subprocess.run([skd, "distill", "-c", str(config), "--set", f"ray.address={cluster['address']}",
                               "--set", "ray.num_cpus=null", "--set", "mlflow.run_name=attached",
                               "--set", "distill.max_steps=2", *[a for s in ON_NODES for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=600)
    assert attached.returncode == 0, attached.stdout[-3000:] + attached.stderr[-3000:]
    assert "Started a local Ray instance" not in attached.stdout + attached.stderr
    assert "Connected to Ray cluster" in attached.stdout + attached.stderr


def test_a_teacher_whose_node_goes_is_dropped_within_seconds_and_rejoins_once_ray_restarts_it(cluster):
    """Last in the module: it takes a teacher node away. The node goes as a machine that loses power or its
    network does: its raylet and every worker it started stop answering at once (SIGSTOP; a killed process
    on one machine refuses connections, which Ray reports at once, while a lost machine just goes quiet).
    Its actor cannot restart (STRICT_SPREAD: no node for its bundle), so before the node watch the run
    waited for the 600 s knowledge timeout; now the teacher is dropped once the GCS marks the node dead
    plus `NODE_GONE_S`. Then a new teacher node joins the cluster: Ray places the bundle there and restarts
    the actor, and the run asks t2 again within seconds and finishes."""
    import contextlib
    import os
    import signal
    import threading
    import time

    import psutil
    from ray._private.state import state

    from actors.pool import NODE_GONE_S
    from tests.faultkit import history, step_of, when

    cfg = cluster["cfg"](*ON_NODES, "mlflow.run_name=node-lost", "distill.max_steps=1000", "distill.eval_every=1000",
                         "distill.log_every=5", "teachers.knowledge_timeout_s=600")
    plan = make_plan(cfg)
    pool = start_pool(plan, plan.resources(ray.cluster_resources(), len(plan.active)), plan.active)
    client, result, frozen = cluster["client"], {}, set()
    run = threading.Thread(target=lambda: result.update(out=run_distill(cfg, source=pool, register_as=None)))
    run.start()
    try:
        def the_run():
            exp = client.get_experiment_by_name("skd-test")
            found = exp and client.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'node-lost'")
            return found[0] if found else None

        def tags() -> dict:
            return the_run().data.tags

        def trained(steps: int) -> bool:
            found = the_run()
            return bool(found) and any(m.step >= steps for m in
                                       client.get_metric_history(found.info.run_id, "train/loss"))

        assert when(lambda: trained(20), run.is_alive, every_s=0.5), "the run ended before the node could go"
        pool_t2 = pool.actors[1]._actor_id.hex()
        info = state.actor_table(pool_t2)  # t2
        assert info["State"] == "ALIVE" and info["Pid"] > 0, info
        [node] = [n for n in cluster["teacher_node_handles"] if n.node_id == info["Address"]["NodeID"]]
        raylets = [proc.pid for kind, proc in node.live_processes() if kind == "raylet"]
        frozen.update([info["Pid"], *raylets, *(c.pid for r in raylets for c in psutil.Process(r).children(True))])
        stopped = time.monotonic()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        dropped = when(lambda: "skd.teacher_lost.t2" in tags(), run.is_alive, timeout_s=700, every_s=0.5)
        took = time.monotonic() - stopped
        if dropped:  # a machine takes the lost one's place: the bundle has a node again
            cluster["nodes"].add_node(**TEACHER_NODE)
            added = time.monotonic()
            back = when(lambda: "skd.teacher_back.t2" in tags(), run.is_alive, timeout_s=300, every_s=0.5)
            returned = time.monotonic() - added
        run.join(timeout=700)
    finally:
        for pid in frozen:  # the node is gone for good
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pool.close()
    out = result["out"]
    assert dropped, f"the run ended ({out.status}, {out.steps} steps) without dropping t2: {out.counts} " \
                    f"{state.actor_table(pool_t2)['State']} {[(n['NodeID'][:8], n['Alive']) for n in ray.nodes()]}"
    run_tags = client.get_run(out.run_id).data.tags
    why = run_tags["skd.teacher_lost.t2"]
    # the GCS marks a silent node dead after its health checks fail (HEALTH_CHECK: 5 to 20 s), then NODE_GONE_S;
    # the knowledge timeout would have been 600 s
    assert took < 40 + NODE_GONE_S, f"t2 was dropped {took:.0f} s after its node went: {why}"
    assert "gone" in why and "node" in why, why
    assert back, f"t2 did not come back before the run ended ({out.status}, {out.steps} steps, {out.counts})"
    lost_step, back_step = step_of(why), step_of(run_tags["skd.teacher_back.t2"])
    teachers = dict(history(client, out.run_id, "train/teacher"))
    assert all(teachers[s] == 0.0 for s in range(lost_step, back_step))  # t4 alone while t2 was out
    assert any(teachers[s] == 1.0 for s in range(back_step, 1001))  # t2 teaches again
    alive = dict(history(client, out.run_id, "teachers/alive"))
    assert alive[lost_step] == 1.0 and alive[back_step] == 2.0 and alive[1000] == 2.0
    assert out.status == "FINISHED" and out.steps == 1000
    print(f"t2 dropped {took:.1f} s after its node went ({why}); back {returned:.1f} s after a new node joined, "
          f"at step {back_step}")

