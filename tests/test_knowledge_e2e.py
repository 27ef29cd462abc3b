"""Hidden-state / attention / [CLS] knowledge end to end: heterogeneous teacher actors serve selected
knowledge online, `skd cache build` precomputes it, and a student trains from the cache with no teacher
actors; mismatched and partial caches are refused. Real Ray, real MLflow, tiny random BERTs."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from actors.cache import CacheMismatchError, KnowledgeCache, PartialCacheError
from actors.knowledge import TokenBatch
from actors.teacher import Teacher
from orchestrator.commands.cache_build import build_cache
from orchestrator.config.load import load_config
from orchestrator.driver.inputs import prepare_inputs
from orchestrator.commands.distill import run_distill
from orchestrator.driver.knowledge_plan import cache_fingerprint, knowledge_request
from orchestrator.driver.plan import make_plan
from tests.conftest import tiny_raw
from tests.tiny import make_tiny_teachers

KNOWLEDGE = {"outputs": ["hidden", "attentions", "cls"], "layers": 2, "tokens": "cls-attention-no-sep",
             "num_tokens": 4, "width": "random", "width_fraction": 0.5, "schedule": "stacked", "ir_fraction": 0.5,
             "cache_shard_size": 32}


def _teacher_actors() -> int:
    return sum(a["ActorClassName"].endswith("Teacher") for a in ray._private.state.actors().values())


@pytest.fixture(scope="module")
def env(ray_cluster, tiny_model, tmp_path_factory):
    """Two untrained teachers of different depth AND width (4 x 32 with 2 heads, 2 x 48 with 3 heads), a
    manifest for them, and a cache built from them."""
    tmp = tmp_path_factory.mktemp("hsk")
    infos, teachers = make_tiny_teachers(tmp, {"ta": (4, 32, 2), "tb": (2, 48, 3)})
    raw = tiny_raw(tmp, tiny_model, student={"init": str(tiny_model), "num_layers": 2},
                   distill={"max_steps": 8, "eval_every": 8, "log_every": 1, "knowledge": KNOWLEDGE})
    raw["teachers"] = teachers

    def cfg(*overrides: str):
        return load_config(None, list(overrides), base=raw)

    summary = build_cache(cfg())
    return {"cfg": cfg, "tmp": tmp, "summary": summary, "infos": infos,
            "client": MlflowClient(cfg().tracking_uri())}


def history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_cache_build_reports_sizes(env):
    s = env["summary"]
    assert s["complete"] and s["teachers"] == ["ta", "tb"] and s["num_examples"] == 64
    assert s["shards_written"] == {"ta": 2, "tb": 2}
    assert 0 < s["hsk_fraction"] < 0.5  # 2 layers x <= 4 tokens x half the dims of 4 or 2 layers x all tokens
    assert s["bytes_per_example"] > 0


def test_cache_round_trip_equals_online_knowledge_exactly(env):
    """The cache returns bit for bit what the teacher serves for the same batch."""
    cfg = env["cfg"]()
    inputs = prepare_inputs(cfg.data, cfg.task, cfg.student.init)
    request = knowledge_request(cfg, inputs)
    teachers = env["infos"]
    cache = KnowledgeCache.open(env["summary"]["path"], cache_fingerprint(cfg, inputs, teachers, request))
    rows = np.arange(32, 64)  # the second shard: built as one batch of these rows
    b = inputs.train.batch(rows, inputs.pad_id)
    for k, info in enumerate(teachers):
        online = Teacher(k, info.checkpoint, 2, attn_implementation="eager").knowledge(TokenBatch.of(b),
                                                          request)
        cached = cache.knowledge(k, rows, b["input_ids"].shape[1])
        assert online.hidden.shape[1:] == (2, 4, info.hidden_size // 2)
        for key in ("logits", "layers", "hidden", "token_index", "token_mask", "width_index", "attentions", "cls"):
            assert np.array_equal(getattr(online, key), getattr(cached, key)), key


def test_student_trains_from_the_cache_without_teachers_and_matches_online(env):
    client = env["client"]
    before = _teacher_actors()
    cached = run_distill(env["cfg"](f"distill.knowledge.source=cache:{env['summary']['path']}",
                                    "mlflow.run_name=from-cache"))
    assert _teacher_actors() == before  # no teacher actor was started
    online = run_distill(env["cfg"]("mlflow.run_name=online"))
    assert _teacher_actors() == before + 2
    for res in (cached, online):
        assert res.status == "FINISHED"
        kd = history(client, res.run_id, "train/loss_kd")
        hidden = history(client, res.run_id, "train/loss_hidden")
        # stacked schedule: 4 IR steps (layer 1, then layers 1-2), then the soft-label stage
        assert set(hidden) == {1, 2, 3, 4} and all(v > 0 for v in hidden.values())
        assert set(history(client, res.run_id, "train/loss_attentions")) == {1, 2, 3, 4}
        assert all(kd[s] == 0 for s in (1, 2, 3, 4)) and all(kd[s] > 0 for s in (5, 6, 7, 8))
    a, b = (history(client, r.run_id, "train/loss_hidden")[1] for r in (cached, online))
    assert a == pytest.approx(b, rel=1e-3)  # same teacher, batch and positions; only padding differs
    sent = history(client, online.run_id, "train/knowledge_bytes")
    assert min(sent[s] for s in (1, 2, 3, 4)) > 10 * max(sent[s] for s in (5, 6, 7, 8))  # IR steps carry HSK


def test_mismatched_and_partial_caches_are_refused_then_resumed(env, tmp_path):
    path = env["summary"]["path"]
    other = env["cfg"](f"distill.knowledge.source=cache:{path}", "distill.knowledge.num_tokens=3")
    inputs = prepare_inputs(other.data, other.task, other.student.init)
    with pytest.raises(CacheMismatchError, match="num_tokens: cache has 4, config expects 3"):
        make_plan(other, inputs)
    fewer = env["cfg"](f"distill.knowledge.source=cache:{path}", "distill.knowledge.outputs=[hidden]")
    knowledge = make_plan(fewer, inputs).knowledge  # a cache with more outputs serves fewer
    assert knowledge.request.outputs == ("logits", "hidden") and str(knowledge.cache) == path

    partial = tmp_path / "partial"
    shutil.copytree(path, partial)
    (partial / "tb" / "shard-00001.safetensors").unlink()
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = (partial / "ta" / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(PartialCacheError, match="interrupted"):
        run_distill(env["cfg"](f"distill.knowledge.source=cache:{partial}"))
    summary = build_cache(env["cfg"](), partial)  # resumes: writes only the missing shard
    assert summary["complete"] and (partial / "tb" / "shard-00001.safetensors").is_file()
    assert (partial / "ta" / "shard-00000.safetensors").stat().st_mtime_ns == kept


def test_open_source_opens_what_the_plan_names_and_always_releases_it(env):
    """A teacher pool (online) or the cache reader (cache:PATH), released on an error in the block too."""
    from actors.cache import CacheReader
    from actors.knowledge import KnowledgeSource
    from actors.pool import TeacherPool
    from orchestrator.driver.sources import open_source

    plan = make_plan(env["cfg"]())
    resources = plan.resources(ray.cluster_resources(), len(plan.active))
    with pytest.raises(RuntimeError, match="boom"):
        with open_source(plan, resources) as pool:
            assert isinstance(pool, TeacherPool) and isinstance(pool, KnowledgeSource) and pool.live() == [0, 1]
            handles = list(pool.actors.values())
            raise RuntimeError("boom")
    assert pool.actors == {}
    ids = [h._actor_id.hex() for h in handles]
    deadline = time.monotonic() + 60  # ray.kill is asynchronous: the GCS records the death shortly after
    while time.monotonic() < deadline and any(ray._private.state.actors()[i]["State"] != "DEAD" for i in ids):
        time.sleep(0.5)
    assert [ray._private.state.actors()[i]["State"] for i in ids] == ["DEAD", "DEAD"]
    cached = make_plan(env["cfg"](f"distill.knowledge.source=cache:{env['summary']['path']}"))
    with open_source(cached) as reader:
        assert isinstance(reader, CacheReader) and reader.names == ["ta", "tb"]
        b = cached.inputs.train.batch(np.arange(4), cached.inputs.pad_id)
        batch = TokenBatch.of(b)
        assert reader.submit(0, batch, cached.knowledge.request).result().logits.shape == (4, 2)
        assert reader.cache._shards  # a shard was mapped
    assert reader.cache._shards == {}  # released
