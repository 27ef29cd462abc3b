"""The teacher pool: one Ray actor per teacher, placed and checked before anything starts.

The pool implements `actors.knowledge.KnowledgeSource`: the knowledge feed calls it like a local object
(`pool.submit(k, batch, request).result()`); scatter, `ray.get` and gather live here. The pool is picklable (it holds actor handles), so the driver passes
it to Ray Train workers and Tune trials: teachers load once per pool, never per trial.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import ray

from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch, average_logits
from actors.manifest import TeacherInfo
from actors.teacher import remote_teacher
from actors.errors import SkdError, TeacherLostError

#: Ray errors after which a teacher cannot answer (restarts used up, node gone, killed for good; with
#: `max_task_retries=0` also a teacher that is restarting: ActorUnavailableError is a RayActorError).
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")

WATCH_S = 2.0
"""Seconds an answer may be late before the actors owing it are looked up (`PendingAnswers.result`)."""
NODE_GONE_S = 10.0
"""Seconds a teacher's actor may be down (restarting, pending or dead) after the node it ran on died before
the teacher counts as lost. Ray may restart it on another node meanwhile (SPREAD with a free node); with
STRICT_SPREAD and no node for its bundle it never comes back, and without this watch the run would wait
for the knowledge timeout."""


class NodeWatch:
    """Where each teacher actor runs, remembered from the GCS actor table while it is ALIVE (a restarting
    actor's entry no longer names its node), and whether that node is gone. One per process; GCS calls
    only (no dashboard needed), one per actor until its node is known, then only for late answers."""

    def __init__(self) -> None:
        self._nodes: dict[str, str] = {}  # actor id (hex) -> node id (hex) it last ran on
        self._looked: dict[str, float] = {}  # actor id -> when it was last looked up (monotonic s)

    def _entry(self, actor: ray.actor.ActorHandle) -> dict | None:
        from ray._private.state import state  # the public state API needs the dashboard

        key = actor._actor_id.hex()
        self._looked[key] = time.monotonic()
        try:
            info = state.actor_table(key)
        except Exception:  # noqa: BLE001  (no GCS tables here, e.g. Ray Client: the knowledge timeout applies)
            return None
        if info and info["State"] == "ALIVE":
            self._nodes[key] = info["Address"]["NodeID"]
        return info or None

    def learn(self, actor: ray.actor.ActorHandle) -> None:
        """Remember `actor`'s node if not known yet (at most one lookup per second per actor)."""
        key = actor._actor_id.hex()
        if key not in self._nodes and time.monotonic() - self._looked.get(key, 0.0) >= 1.0:
            self._entry(actor)

    def state(self, actor: ray.actor.ActorHandle) -> tuple[str, int] | None:
        """`actor`'s (state, restarts) in the GCS actor table: state "ALIVE", "RESTARTING", "PENDING_CREATION",
        "DEPENDENCIES_UNREADY" or "DEAD" (final), restarts the times Ray restarted it; None without GCS tables."""
        info = self._entry(actor)
        return None if info is None else (info["State"], int(info["NumRestarts"]))

    def down(self, actor: ray.actor.ActorHandle) -> str | None:
        """Why `actor` cannot answer for now: its node is gone and it is not ALIVE elsewhere
        ("node <id> gone, actor RESTARTING"); None while it is alive, restarting on a live node, or its
        node was never learned (the knowledge timeout still applies)."""
        info = self._entry(actor)
        if info is None or info["State"] == "ALIVE":
            return None
        node = self._nodes.get(actor._actor_id.hex())
        if node is None:
            return None
        if any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
            return None
        return f"node {node[:8]} gone, actor {info['State']}"


WATCH = NodeWatch()


def start_teacher(index: int, info: TeacherInfo, settings: dict, *, name: str | None = None,
                  namespace: str | None = None, scheduling_strategy=None) -> ray.actor.ActorHandle:
    """Start one teacher actor (loading in the background; `ping` it to wait).

    Args:
        index: the teacher's index in the asker's ensemble; info: its manifest entry.
        settings: {"num_cpus", "num_gpus" (resolved number), "resources", "max_restarts", "max_task_retries",
            "regression", "threads", "device", "attn_implementation", "slots", "autocast"} (see
            `TeacherPool.start`; "autocast" may be absent: float32).
        name / namespace: a detached, named actor in that Ray namespace (a served pool); None: owned by the caller.
        scheduling_strategy: e.g. a placement-group bundle.
    """
    s = settings
    named = {"name": name, "namespace": namespace, "lifetime": "detached"} if namespace else {}
    return remote_teacher().options(
        num_cpus=s["num_cpus"], num_gpus=s["num_gpus"], resources=s["resources"] or None,
        max_restarts=s["max_restarts"], max_task_retries=s["max_task_retries"], **named,
        scheduling_strategy=scheduling_strategy,
    ).remote(index, info.checkpoint, info.num_labels, s["regression"], s["threads"], s["device"],
             s["attn_implementation"], s["slots"], s.get("autocast"), info.vocab)


@dataclass(frozen=True)
class PlacementPlan:
    """Resources each role needs, as data, checked against the cluster before any actor starts.

    Attributes:
        teacher_cpus / teacher_gpus: per teacher actor; teachers: how many actors.
        worker_cpus / worker_gpus: per student worker; workers: how many.
        teacher_custom / worker_custom: custom Ray resources per teacher actor / student worker (e.g.
            {"skd-teacher": 1}, declared only by the nodes meant for them).
        strategy: placement-group strategy of the teachers (one bundle each), e.g. STRICT_SPREAD = one
            teacher per node.
    """

    teachers: int
    teacher_cpus: float
    teacher_gpus: float
    workers: int
    worker_cpus: float
    worker_gpus: float
    teacher_custom: dict = dataclasses.field(default_factory=dict)
    worker_custom: dict = dataclasses.field(default_factory=dict)
    strategy: str = "SPREAD"

    def teacher_bundle(self) -> dict[str, float]:
        """What one teacher actor reserves: {"CPU": c, "GPU": g (when > 0), custom resources}."""
        return {"CPU": self.teacher_cpus, **({"GPU": self.teacher_gpus} if self.teacher_gpus else {}),
                **self.teacher_custom}

    def check(self, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None) -> None:
        """Raise if the cluster cannot hold the plan: totals per resource, and with STRICT_SPREAD enough
        distinct nodes that can each hold one teacher.

        Args:
            cluster: total resources (`ray.cluster_resources()`).
            nodes: each alive node's total resources (None: skip the per-node check).

        Raises:
            SkdError: naming what is missing, e.g. "need 4 GPUs: 4 for 4 teachers (1 each) + 0 for 1 student
                workers, cluster has 2".
        """
        needs = {"GPU": (self.teacher_gpus, self.worker_gpus), "CPU": (self.teacher_cpus, self.worker_cpus)}
        for res in sorted(set(self.teacher_custom) | set(self.worker_custom)):
            needs[res] = (self.teacher_custom.get(res, 0.0), self.worker_custom.get(res, 0.0))
        for res, (t_each, w_each) in needs.items():
            need_t, need_w = self.teachers * t_each, self.workers * w_each
            have = cluster.get(res, 0.0)
            if need_t + need_w > have + 1e-9:
                setting = {"GPU": "teachers.num_gpus", "CPU": "teachers.num_cpus"}.get(
                    res, "teachers.resources / ray.resources_per_worker")
                label = f"{res}s" if res in ("CPU", "GPU") else f"of {res!r}"
                raise SkdError(f"need {need_t + need_w:g} {label}: {need_t:g} for {self.teachers} teachers "
                               f"({t_each:g} each) + {need_w:g} for {self.workers} student workers, cluster has "
                               f"{have:g}. Lower {setting} / ray.num_workers or add nodes")
        if self.strategy == "STRICT_SPREAD" and nodes is not None and self.teachers:
            bundle = self.teacher_bundle()
            fit = sum(all(node.get(r, 0.0) + 1e-9 >= v for r, v in bundle.items()) for node in nodes)
            if fit < self.teachers:
                raise SkdError(f"teachers.placement STRICT_SPREAD puts each of the {self.teachers} teachers on its "
                               f"own node, but only {fit} node(s) can hold one teacher ({bundle}); add nodes or "
                               f"use SPREAD")


class PendingAnswers:
    """Knowledge requested from teacher actors but not yet received (one teacher, or several to average).

    `result()` blocks (at most `timeout_s` seconds in all), records how long the caller waited, and
    averages logits over teachers when the request went to several (`actors.knowledge.average_logits`).

    Args:
        actors: the teacher actors to ask (each is sent `knowledge(batch, request)` here and watched for a
            lost node, `NodeWatch`); teachers: their indices (same order).
        teacher: the serving teacher's index, or -1 for an average over `teachers`.
        batch: the `TokenBatch`, or an object ref to it (one copy shared by several actors).
        timeout_s: the knowledge timeout (None: wait forever).
    """

    def __init__(self, actors: list[ray.actor.ActorHandle], teachers: list[int], teacher: int, batch,
                 request: KnowledgeRequest, timeout_s: float | None = None) -> None:
        self._refs = [actor.knowledge.remote(batch, request) for actor in actors]
        self._actors, self._teachers = actors, teachers
        self.teacher = teacher
        self.timeout_s = timeout_s
        for actor in actors:
            WATCH.learn(actor)

    def result(self) -> Knowledge:
        """The answer (`wait_s` = seconds blocked here). An answer more than `WATCH_S` late has its actors
        looked up every `WATCH_S`: one whose node is gone for `NODE_GONE_S` is lost then, not at the
        knowledge timeout.

        Raises:
            TeacherLostError: an asked teacher's actor died for good, its node is gone, or no answer came
                within `timeout_s` (a restarting actor is waited for: Ray retries the call up to
                `max_task_retries` times).
        """
        start = time.perf_counter()
        ready = self._wait(start)
        parts: list[Knowledge] = []
        for k, ref in zip(self._teachers, self._refs):
            if ref not in ready:
                raise TeacherLostError(k, f"no answer within the knowledge timeout ({self.timeout_s:g} s)")
            try:
                parts.append(ray.get(ref))
            except LOST as exc:
                raise TeacherLostError(k, type(exc).__name__) from exc
        wait = time.perf_counter() - start
        if self.teacher >= 0:
            # every requested output, as served, under the asker's index (a served pool's actor has its own)
            return dataclasses.replace(parts[0], teacher=self.teacher, wait_s=wait)
        return average_logits(parts, wait)

    def _wait(self, start: float) -> list[ray.ObjectRef]:
        """The refs ready within `timeout_s` (all, or fewer at the timeout), in `WATCH_S` slices.

        Raises:
            TeacherLostError: an owing actor's node has been gone for `NODE_GONE_S` seconds.
        """
        gone: dict[int, float] = {}  # teacher -> when its node was first seen gone (perf_counter s)
        while True:
            left = None if self.timeout_s is None else self.timeout_s - (time.perf_counter() - start)
            slice_s = WATCH_S if left is None else max(0.0, min(WATCH_S, left))
            ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=slice_s, fetch_local=True)
            if len(ready) == len(self._refs) or (left is not None and left <= slice_s):
                return ready
            now = time.perf_counter()
            for k, ref, actor in zip(self._teachers, self._refs, self._actors):
                why = None if ref in ready else WATCH.down(actor)
                if why is None:
                    gone.pop(k, None)
                elif now - gone.setdefault(k, now) >= NODE_GONE_S:
                    raise TeacherLostError(k, f"{why} for {now - gone[k]:.0f} s")


class TeacherPool:
    """Ray actors serving the teacher ensemble (a `KnowledgeSource`).

    Args:
        teachers: all ensemble members (indices refer to this list).
        actors: teacher index -> actor handle, for the members that were started.
    """

    def __init__(self, teachers: list[TeacherInfo], actors: dict[int, ray.actor.ActorHandle],
                 timeout_s: float | None = None, placement_group=None) -> None:
        self.teachers = teachers
        self.actors = actors
        self.timeout_s = timeout_s  # the knowledge timeout of each request (None: wait forever)
        self.placement_group = placement_group  # one bundle per teacher; removed by `close`

    @classmethod
    def start(cls, teachers: list[TeacherInfo], active: list[int], *, num_cpus: float, num_gpus: float,
              threads: int, regression: bool, plan: PlacementPlan | None = None,
              attn_implementation: str | None = None, wait: bool = True, max_restarts: int = 2,
              max_task_retries: int = 2, timeout_s: float | None = None, device: str = "auto",
              resources: dict[str, float] | None = None, strategy: str = "SPREAD",
              placement_timeout_s: float = 600.0, slots: int = 1, namespace: str | None = None,
              autocast: str | None = None) -> "TeacherPool":
        """Check placement, then start one actor per active teacher (and wait until all are loaded).

        Args:
            teachers: the ensemble; active: indices to start (a single-teacher run starts one).
            num_cpus / num_gpus: resources per actor; threads: torch threads per actor on CPU.
            regression: teachers have a regression head.
            plan: the full placement plan (teachers and student workers) to check first.
            attn_implementation: "eager" when requests need attentions (see `Teacher`); None: default.
            wait: block until every teacher is loaded. False lets the caller start the student meanwhile
                (teachers load while Ray Train starts its workers, ~10 s saved per run on 2 cores); the first
                knowledge request then waits, and `check_loaded` explains a failure.
            max_restarts: times Ray restarts a teacher actor whose process died, before it is lost for good.
            max_task_retries: times Ray re-sends a request whose actor died (while restarts remain).
            timeout_s: seconds a knowledge request may take before its teacher counts as lost (the first
                request of a run also waits for the teacher to load); None: no limit.
            device: "auto" (CUDA when the actor's process sees a GPU), "cpu" or "cuda": what torch sees decides,
                not the GPU count, so a node that declares a GPU it lacks still serves on CPU with auto.
            resources: custom Ray resources per teacher (e.g. {"skd-teacher": 1}).
            strategy: placement-group strategy over one bundle per teacher (STRICT_SPREAD: a node each).
            placement_timeout_s: how long to wait for the placement group before refusing.
            slots: forward passes each teacher runs at once (see `Teacher`).
            autocast: "bfloat16" / "float16": teachers' forward passes under torch.autocast (see `Teacher`).
            namespace: start detached actors named `teacher-<name>` (and a detached placement group) in this
                Ray namespace, so they outlive this driver (`skd teachers serve`); None: owned by this driver.

        Raises:
            SkdError: the cluster cannot hold the plan, or (wait=True) a teacher failed to load.
        """
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if strategy not in STRATEGIES:
            raise SkdError(f"teachers.placement = {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if plan is not None:
            plan.check(ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **(resources or {})}
        group = placement_group([dict(bundle) for _ in active], strategy=strategy,
                                lifetime="detached" if namespace else None)
        try:
            ready, _ = ray.wait([group.ready()], timeout=placement_timeout_s)
        except BaseException:
            remove_placement_group(group)
            raise
        if not ready:
            remove_placement_group(group)
            raise SkdError(f"the {len(active)} teachers ({bundle} each, {strategy}) could not be placed within "
                           f"{placement_timeout_s:g} s: the cluster lacks free resources of that shape (other jobs, "
                           f"or nodes too small); free them, add nodes, or change teachers.placement")
        settings = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources, "max_restarts": max_restarts,
                    "max_task_retries": max_task_retries, "regression": regression, "threads": threads,
                    "device": device, "attn_implementation": attn_implementation, "slots": slots, "autocast": autocast}
        pool = cls(teachers, {}, timeout_s, group)
        try:  # from here on, any failure (Ctrl-C included) releases the actors and the placement group
            for slot, i in enumerate(active):
                pool.actors[i] = start_teacher(
                    i, teachers[i], settings, name=f"teacher-{teachers[i].name}", namespace=namespace,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=slot))
            if wait:
                pool.check_loaded()
        except BaseException:
            pool.close()
            raise
        return pool

    def check_loaded(self, timeout_s: float | None = None) -> None:
        """Wait up to `timeout_s` seconds (None: no limit) for every started teacher to finish loading.

        Raises:
            SkdError: naming the teacher whose actor failed to start (bad checkpoint, out of memory).
        """
        pings = {i: a.ping.remote() for i, a in self.actors.items()}
        done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout_s)
        for i, ref in pings.items():
            if ref not in done:
                continue  # still loading: not the cause of a failure
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise SkdError(f"teacher {self.teachers[i].name} ({self.teachers[i].checkpoint}) failed to load: "
                               f"{e}") from e

    @property
    def names(self) -> list[str]:
        """Teacher names, [N], in ensemble order (started or not)."""
        return [t.name for t in self.teachers]

    def live(self) -> list[int]:
        """Indices of the teachers with a started actor."""
        return sorted(self.actors)

    def stats_refs(self) -> dict[int, ray.ObjectRef]:
        """Each live teacher's `Teacher.stats()`, asked without waiting: teacher index -> reference."""
        return {k: self.actors[k].stats.remote() for k in self.live()}

    def actor_state(self, k: int) -> tuple[str, int] | None:
        """Teacher k's actor as the GCS sees it now: (state, restarts), see `NodeWatch.state`. The knowledge
        feed asks it for teachers it dropped, to take one back once Ray has restarted its actor."""
        return WATCH.state(self.actors[k])

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> PendingAnswers:
        """Ask teacher k for knowledge of a batch without waiting (prefetch)."""
        return PendingAnswers([self.actors[k]], [k], k, batch, request, self.timeout_s)

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> PendingAnswers:
        """Ask `teachers` (default: every started one) at once, so they compute in parallel; `result()`
        returns the logits averaged over them."""
        teachers = self.live() if teachers is None else list(teachers)
        ref = ray.put(batch)  # one copy in the object store, shared by all teachers
        return PendingAnswers([self.actors[k] for k in teachers], teachers, -1, ref, request, self.timeout_s)

    def knowledge(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Knowledge:
        """Blocking form of `submit`."""
        return self.submit(k, batch, request).result()

    def close(self) -> None:
        """Kill the actors and remove their placement group (the driver that started the pool calls this once)."""
        from ray.util.placement_group import remove_placement_group

        for a in self.actors.values():
            ray.kill(a)
        self.actors = {}
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
