"""Opening the run's knowledge source: the one place that starts (and always releases) a teacher pool or
opens an offline cache, whichever the run plan names."""

from __future__ import annotations

import contextlib
from typing import Iterator

from actors.knowledge import KnowledgeSource
from actors.pool import TeacherPool
from orchestrator.driver.plan import Resources, RunPlan


def start_pool(plan: RunPlan, resources: Resources, active: list[int], wait: bool = True) -> TeacherPool:
    """Start the actors of the `active` teachers with the resolved resources, after checking the placement
    of teachers and student workers (`resources.placement`). With wait=False the teachers load in the
    background (see `TeacherPool.start`).

    Raises:
        SkdError: the cluster cannot hold the teachers plus the student workers, or (wait=True) a teacher
            failed to load.
    """
    names = ", ".join(plan.teachers[i].name for i in active)
    print(f"[skd] starting {len(active)} teacher actor(s): {names}", flush=True)
    return TeacherPool.start(plan.teachers, active, num_cpus=resources.teacher_cpus, num_gpus=resources.teacher_gpus,
                             threads=resources.teacher_threads, regression=plan.inputs.spec.is_regression,
                             plan=resources.placement, attn_implementation=resources.attn_implementation, wait=wait,
                             max_restarts=plan.cfg.teachers.max_restarts,
                             max_task_retries=plan.cfg.teachers.max_task_retries,
                             timeout_s=plan.cfg.teachers.knowledge_timeout_s, device=plan.cfg.teachers.device,
                             resources=dict(plan.cfg.teachers.resources), strategy=plan.cfg.teachers.placement,
                             slots=plan.cfg.teachers.max_concurrency, autocast=plan.cfg.teachers.autocast)


@contextlib.contextmanager
def open_source(plan: RunPlan, resources: Resources | None = None, active: list[int] | None = None, *,
                shared: KnowledgeSource | None = None, wait: bool = True,
                resuming: bool = False) -> Iterator[KnowledgeSource | None]:
    """The run's knowledge source for the duration of a `with` block, released on every exit path.

    Yields `shared` (a campaign's or comparison's pool; not closed here) when given; None for a plan
    without knowledge (no-kd); the offline cache's reader when the plan names a cache; the served pool
    named by `teachers.pool` (attached, left serving); else a new teacher pool of `active` teachers
    (default: the plan's). When the block fails while a new pool's teachers are still loading, a teacher
    that failed to load is reported instead (it explains the failure best). `resuming`: the run continues
    from a checkpoint (a served pool may then serve none of the config's teachers: the checkpoint names the
    run's own).

    Raises:
        CacheError: the cache cannot be opened or was built for another setup.
        SkdError: as `start_pool`; no served pool of that name, or one that lacks the config's teachers.
    """
    if shared is not None or plan.knowledge is None:
        yield shared
        return
    if plan.knowledge.cache is not None:
        from actors.cache import CacheReader

        from orchestrator.driver.knowledge_plan import VERIFY_CONTENTS_BYTES

        source: KnowledgeSource = CacheReader.open(plan.knowledge.cache, plan.knowledge.fingerprint)
        # the plan checked every shard's SHA-256 of a cache this small moments ago: workers skip it per shard
        source.cache.contents_checked = (source.cache.manifest.get("total_bytes") or 0) <= VERIFY_CONTENTS_BYTES
    elif plan.cfg.teachers.pool:
        from actors.served import ServedPool

        source = ServedPool.attach(plan.cfg.teachers.pool, plan.teachers, plan.cfg.teachers.knowledge_timeout_s,
                                   resuming=resuming)
    else:
        source = start_pool(plan, resources, plan.active if active is None else active, wait=wait)
    try:
        yield source
    except Exception:
        if isinstance(source, TeacherPool):
            source.check_loaded(timeout_s=5.0)
        raise
    finally:
        source.close()
