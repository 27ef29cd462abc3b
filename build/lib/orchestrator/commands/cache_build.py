"""`skd cache build`: run every teacher over the training split once and store its knowledge on disk.

The build's plan is the config's own with every teacher online (a cache is built from teacher actors, not
from another cache); the writer (`actors.cache.CacheWriter`) resumes an interrupted build with the shards
still missing, and `actors.cache.build_shards` keeps one shard per teacher in flight while the previous
one is written. Liu et al. (ACL 2021): precomputed compressed HSK lets the student train with no teacher
loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.cache import CacheWriter, build_shards, cache_summary
from actors.knowledge import TokenBatch
from orchestrator.config import SkdConfig
from orchestrator.driver.knowledge_plan import cache_fingerprint
from orchestrator.driver.plan import RunPlan, make_plan
from orchestrator.driver.runtime import ray_session
from orchestrator.driver.sources import open_source


def default_cache_path(cfg: SkdConfig) -> Path:
    """`distill.knowledge.source`'s folder when it names a cache, else <output_dir>/knowledge-cache."""
    return cfg.distill.knowledge.cache_path or cfg.out_dir() / "knowledge-cache"


def build_plan(cfg: SkdConfig) -> RunPlan:
    """The plan a cache is built with: every teacher of the ensemble, online, the config's knowledge request.

    Raises:
        SkdError: bad config, data or teachers (before Ray starts).
    """
    d = cfg.distill
    build = d.model_copy(update={"strategy": "skd",
                                 "distribution": d.distribution.model_copy(update={"family": "uniform"}),
                                 "knowledge": d.knowledge.model_copy(update={"source": "online"})})
    return make_plan(cfg.model_copy(update={"distill": build}))


def build_cache(cfg: SkdConfig, path: Path | None = None, *, overwrite: bool = False,
                batch_size: int | None = None) -> dict[str, Any]:
    """`skd cache build`: precompute every teacher's knowledge for every training example.

    Args:
        cfg: the validated config (its `distill.knowledge` defines the request).
        path: the cache folder (default: `default_cache_path`).
        overwrite: delete a cache built for another setup at `path` instead of refusing.
        batch_size: rows per teacher call (default: distill.eval_batch_size).

    Returns:
        `cache_summary` plus "path": bytes per example, total bytes, fraction of full HSK kept, teachers.

    Raises:
        SkdError: bad config/data/teachers, or a cache for another setup at `path` (before Ray starts).
    """
    plan = build_plan(cfg)
    inputs, request = plan.inputs, plan.knowledge.request
    path = Path(path or default_cache_path(cfg)).expanduser().resolve()
    writer = CacheWriter(path, cache_fingerprint(cfg, inputs, plan.teachers, request), plan.names, len(inputs.train),
                         cfg.data.max_length, cfg.distill.knowledge.cache_shard_size,
                         student_layers=request.student_layers or None,
                         tokens_follow_length=request.needs_tokens and request.tokens == "all", overwrite=overwrite)
    missing = {k: writer.missing(k) for k in range(len(plan.teachers))}
    todo = [k for k, shards in missing.items() if shards]
    every_shard = all(len(shards) == writer.num_shards for shards in missing.values())  # nothing built before
    kept = full = 0.0
    if todo:
        def batch_of(rows: np.ndarray) -> TokenBatch:
            return TokenBatch.of(inputs.train.batch(rows, inputs.pad_id))

        left = sum(len(shards) for shards in missing.values())
        print(f"[skd] cache build -> {path}: {left} shard(s) of {writer.shard_size} rows to write "
              f"({len(missing) * writer.num_shards - left} already there)", flush=True)
        with ray_session(cfg.ray):
            resources = plan.resources(ray.cluster_resources(), len(todo) if plan.uses_teacher_actors else 0,
                                       student_workers=0)
            with open_source(plan, resources, todo) as pool:
                kept, full = build_shards(pool, writer, request, batch_of,
                                          [(t.num_layers, t.hidden_size) for t in plan.teachers],
                                          batch_size or cfg.distill.eval_batch_size,
                                          log=lambda line: print(line, flush=True))
    writer.write_example_ids(inputs.train.ids)
    fraction = None
    if "hidden" in request.outputs:
        measured = kept / full if full > 0 else None
        # a resumed build saw only the missing shards: keep the fraction recorded earlier, if any
        fraction = measured if todo and every_shard else (writer.manifest.get("hsk_fraction") or measured)
    writer.finalize(fraction)
    return {**cache_summary(path), "path": str(path)}
