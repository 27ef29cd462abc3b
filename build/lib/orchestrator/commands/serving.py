"""`skd teachers serve | status | add | remove | stop`: a long-lived, elastic teacher pool on a running Ray
cluster (see `actors.served`). Jobs attach with `teachers.pool: <name>`; teachers added or removed here
reach every attached student at its next step.

Every command connects to an existing cluster (`ray.address`, or `RAY_ADDRESS`): a pool must outlive the
command, which a cluster started by the command would not.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import ray

from actors.errors import SkdError, TeacherError
from actors.manifest import TeacherInfo, read_manifest, validate_teachers
from actors.pool import PlacementPlan, TeacherPool, start_teacher
from actors.served import DIRECTORY, PoolDirectory, get_directory, namespace, pool_names
from orchestrator.config import SkdConfig
from orchestrator.driver.runtime import ray_session


def pool_name(cfg: SkdConfig | None, name: str | None) -> str:
    """The pool a command is about: `--name`, else the config's `teachers.pool`, else "default"."""
    return name or (cfg.teachers.pool if cfg is not None else None) or "default"


def _check_cluster(cfg: SkdConfig) -> None:
    if not cfg.ray.address and not os.environ.get("RAY_ADDRESS"):
        raise SkdError("a served teacher pool lives on a running Ray cluster (`ray start --head`, `ray up`, KubeRay): "
                       "set ray.address (auto, or the cluster's address) or RAY_ADDRESS")


def _teachers(cfg: SkdConfig, names: list[str] | None = None) -> tuple[list[TeacherInfo], dict]:
    """The config's teachers (all, or `names`) from its manifest, checked against the task and the student's
    vocabulary, and the settings they serve with (what `skd teachers add` reuses)."""
    from actors.models import load_tokenizer, resolve_model, vocab_fingerprint
    from orchestrator.common.task import task_spec

    spec = task_spec(cfg.task, cfg.data)
    members = [m.name for m in cfg.teachers.members]
    wanted = names or members
    unknown = [n for n in wanted if n not in members]
    if unknown:
        raise TeacherError(f"teachers {unknown} are not in teachers.members ({', '.join(members)}); add them to the "
                           f"config and run `skd teachers prepare -c CONFIG`")
    vocab = vocab_fingerprint(load_tokenizer(resolve_model(cfg.student.init)))
    infos = validate_teachers(read_manifest(cfg.manifest_path()), wanted, spec.name, spec.num_labels)
    other = [t.name for t in infos if t.vocab != vocab]
    if other:  # a served pool outlives its students: later ones may not carry a view of a joining tokenizer
        raise TeacherError(f"teachers {', '.join(other)} tokenize otherwise than the student ({cfg.student.init}); "
                           f"a served pool serves one tokenizer: serve them in a pool of their own family, or run "
                           f"the mixed ensemble without a served pool (skd distill starts its own teachers)")
    t = cfg.teachers
    settings = {"task": spec.name, "num_labels": spec.num_labels, "regression": spec.is_regression, "vocab": vocab,
                "attn_implementation": "eager" if cfg.distill.knowledge.needs_attentions else None,
                "num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "threads": t.threads, "device": t.device,
                "resources": dict(t.resources), "slots": t.max_concurrency, "autocast": t.autocast,
                "max_restarts": t.max_restarts,
                "max_task_retries": t.max_task_retries}
    return infos, settings


def _gpus(setting, cluster: dict[str, float]) -> float:
    return (1.0 if cluster.get("GPU", 0.0) > 0 else 0.0) if setting == "auto" else float(setting)


class _QuietDetachedPlacement(logging.Filter):
    """Ray warns that a restartable detached actor in a placement group dies with the group: that is the
    point here (`stop` removes the group), so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


def serve(cfg: SkdConfig, name: str | None = None) -> dict:
    """Start the config's teachers as a served pool (detached actors in a placement group, plus its
    directory) and return; they serve until `stop`.

    Returns:
        `status` of the new pool.

    Raises:
        SkdError: no running cluster, a pool of that name already serving, bad teachers, or a placement the
            cluster cannot hold (before any actor starts).
    """
    _check_cluster(cfg)
    pool = pool_name(cfg, name)
    infos, settings = _teachers(cfg)
    with ray_session(cfg.ray):
        if pool in pool_names():
            raise SkdError(f"teacher pool {pool!r} already serves on this cluster; `skd teachers add` to extend it, "
                           f"or `skd teachers stop --name {pool}` first")
        logging.getLogger("ray.actor").addFilter(_QuietDetachedPlacement())
        cluster = ray.cluster_resources()
        gpus = _gpus(settings["num_gpus"], cluster)
        t = cfg.teachers
        plan = PlacementPlan(len(infos), t.num_cpus, gpus, 0, 0.0, 0.0, dict(t.resources), {}, t.placement)
        started = TeacherPool.start(
            infos, list(range(len(infos))), num_cpus=t.num_cpus, num_gpus=gpus, threads=t.threads,
            regression=settings["regression"], plan=plan, attn_implementation=settings["attn_implementation"],
            max_restarts=t.max_restarts, max_task_retries=t.max_task_retries, device=t.device,
            resources=dict(t.resources), strategy=t.placement, slots=t.max_concurrency, namespace=namespace(pool),
            autocast=t.autocast)
        directory = None
        try:
            directory = ray.remote(PoolDirectory).options(
                name=DIRECTORY, namespace=namespace(pool), lifetime="detached", num_cpus=0).remote(pool, settings)
            ray.get(directory.join.remote(infos, [started.actors[i] for i in range(len(infos))]))
            ray.get(directory.set_placement_group.remote(started.placement_group))
        except BaseException as exc:
            started.close()
            if directory is not None:
                ray.kill(directory)
            if isinstance(exc, ValueError):  # the name was taken meanwhile (another `serve`)
                raise SkdError(f"teacher pool {pool!r} was started by someone else meanwhile: {exc}") from None
            raise
        return status(pool)[0]


def _cause(exc: Exception) -> str:
    """The message of the error raised inside a Ray task (without the remote traceback)."""
    return str(getattr(exc, "cause", None) or exc)


def add(cfg: SkdConfig, teachers: list[str], name: str | None = None) -> dict:
    """Start the named config teachers with the pool's settings and join them to the pool (one new version).

    Raises:
        SkdError: no such pool; a teacher not in the config/manifest, for another task or vocabulary than the
            pool's, or already serving; a teacher that fails to load (nothing joins then).
    """
    _check_cluster(cfg)
    pool = pool_name(cfg, name)
    infos, _ = _teachers(cfg, teachers)
    with ray_session(cfg.ray):
        directory = get_directory(pool)
        described = ray.get(directory.describe.remote())
        settings = described["settings"]
        serving = {described["infos"][i].name for i in described["live"]}
        if serving & set(teachers):
            raise SkdError(f"pool {pool!r} already serves {', '.join(sorted(serving & set(teachers)))}")
        for info in infos:
            if info.task != settings["task"] or info.vocab != settings["vocab"]:
                raise TeacherError(f"teacher {info.name!r} was prepared for {info.task} with another tokenizer than "
                                   f"pool {pool!r} serves ({settings['task']}); use teachers of the pool's task and "
                                   f"model family")
        resolved = {**settings, "num_gpus": _gpus(settings["num_gpus"], ray.cluster_resources())}
        actors = [start_teacher(0, info, resolved, name=f"teacher-{info.name}-{uuid.uuid4().hex[:6]}",
                                namespace=namespace(pool)) for info in infos]
        try:
            ray.get([a.ping.remote() for a in actors])
            ray.get(directory.join.remote(infos, actors))
        except BaseException as exc:  # Ctrl-C included: no detached actor is left outside the pool
            for a in actors:
                ray.kill(a)
            if isinstance(exc, ray.exceptions.RayError):
                raise SkdError(f"could not add {', '.join(teachers)} to pool {pool!r}: {_cause(exc)}") from None
            raise
        return status(pool)[0]


def remove(cfg: SkdConfig | None, teachers: list[str], name: str | None = None, drain_s: float = 10.0) -> dict:
    """Take teachers out of the pool (one new version), then, after `drain_s` seconds in which attached students
    stop asking them, kill their actors.

    Raises:
        SkdError: no such pool, or a teacher it does not serve.
    """
    pool = pool_name(cfg, name)
    directory = get_directory(pool)
    try:
        version, gone = ray.get(directory.leave.remote(teachers))
    except ray.exceptions.RayTaskError as exc:
        raise SkdError(_cause(exc)) from None
    print(f"[skd] pool {pool}: version {version} without {', '.join(teachers)}; stopping them in {drain_s:g} s",
          flush=True)
    try:
        time.sleep(drain_s)
    finally:  # an interrupted drain still stops them (they are out of the pool already)
        for a in gone:
            ray.kill(a)
    return status(pool)[0]


def stop(name: str) -> list[str]:
    """Kill every teacher actor of the pool, its placement group and its directory; returns the teachers.

    Raises:
        SkdError: no such pool.
    """
    from ray.util.placement_group import remove_placement_group

    directory = get_directory(name)
    described = ray.get(directory.describe.remote())
    group = ray.get(directory.get_placement_group.remote())
    for handle in described["actors"].values():  # removed teachers too, in case a `remove` did not finish
        ray.kill(handle)
    if group is not None:
        remove_placement_group(group)
    ray.kill(directory)
    return [described["infos"][i].name for i in described["live"]]


def status(name: str | None = None, timeout_s: float = 10.0) -> list[dict]:
    """Each served pool (or the one named): its teachers with node, device, requests served, examples, queue
    and compute seconds, and its membership history.

    Returns:
        [{"pool", "version", "teachers": [{"name", "node", "device", "requests", "examples", "queued",
          "running", "slots", "compute_s", "status"}], "history": [...]}]

    Raises:
        SkdError: `name` given and no such pool.
    """
    pools = [name] if name else pool_names()
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    out = []
    for pool in pools:
        described = ray.get(get_directory(pool).describe.remote())
        refs = {i: described["handles"][i].stats.remote() for i in described["live"]}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        rows = []
        for i, ref in refs.items():
            row = {"name": described["infos"][i].name}
            try:
                stats = ray.get(ref) if ref in ready else None
            except ray.exceptions.RayError as exc:
                stats, row["status"] = None, f"lost ({type(exc).__name__})"
            if stats is not None:
                row.update(stats, node=f"{nodes.get(stats['node'], '?')} ({str(stats['node'])[:8]})", status="serving")
            row.setdefault("status", "no answer (loading or busy)")
            rows.append(row)
        out.append({"pool": pool, "version": described["history"][-1]["version"], "teachers": rows,
                    "history": described["history"], "settings": described["settings"]})
    return out


def connect(cfg: SkdConfig | None, address: str | None):
    """A Ray session on the cluster named by `address`, else the config's `ray.address`, else `RAY_ADDRESS`.

    Raises:
        SkdError: none of them is set.
    """
    from orchestrator.config import RayConfig

    address = address or (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SkdError("which cluster? give --address (auto, or host:port), -c CONFIG with ray.address, or RAY_ADDRESS")
    return ray_session(RayConfig(address=address) if cfg is None else cfg.ray.model_copy(update={"address": address}))
