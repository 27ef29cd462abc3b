"""A served teacher pool: teachers as detached, named Ray actors that outlive the command that started them,
shared by every job that attaches to it (`teachers.pool: <name>`), and elastic: teachers join and leave
while students train.

The Ray namespace `skd-pool-<name>` holds the teacher actors (`teacher-<teacher name>`) and one
`PoolDirectory` actor (`directory`), the pool's source of truth: a catalogue of every teacher the pool has
served (index = order of first joining; a teacher re-added under its name keeps its index) and the
membership history, one entry per version (version 0 = the teachers `skd teachers serve` started). Versions
are never rewritten, so a run that applied "version v before step s" can apply it again before step s when
it resumes (`PoolDirectory.record` / `recorded`, keyed by the MLflow run id).

`ServedPool` is the `KnowledgeSource` a run uses: the run's teachers are the config's members (checked
against what the pool serves when the run attaches) followed by every teacher that joins the pool while the
run trains; `poll` (non-blocking) and `changes` (blocking, at a step the data-parallel ranks agreed on) let
the knowledge feed follow the membership.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import ray

from actors.errors import SkdError
from actors.knowledge import KnowledgeRequest, TokenBatch
from actors.manifest import TeacherInfo
from actors.pool import WATCH, PendingAnswers

NAMESPACE_PREFIX = "skd-pool-"
DIRECTORY = "directory"


def namespace(pool: str) -> str:
    """The Ray namespace of the pool named `pool`."""
    return f"{NAMESPACE_PREFIX}{pool}"


def pool_names() -> list[str]:
    """Names of the teacher pools served on the connected cluster (sorted)."""
    found = ray.util.list_named_actors(all_namespaces=True)
    return sorted({a["namespace"][len(NAMESPACE_PREFIX):] for a in found
                   if a["name"] == DIRECTORY and a["namespace"].startswith(NAMESPACE_PREFIX)})


def get_directory(pool: str) -> ray.actor.ActorHandle:
    """The directory actor of a served pool.

    Raises:
        SkdError: no pool of that name on the connected cluster (naming the pools there are).
    """
    try:
        return ray.get_actor(DIRECTORY, namespace=namespace(pool))
    except ValueError:
        served = pool_names()
        raise SkdError(f"no teacher pool named {pool!r} on this Ray cluster (pools here: "
                       f"{', '.join(served) or 'none'}); start it with `skd teachers serve -c CONFIG --name {pool}` "
                       f"or fix teachers.pool") from None


@dataclass(frozen=True)
class PoolView:
    """The pool at one membership version.

    Attributes:
        version: 0 for the teachers `serve` started, +1 per join or leave.
        live: pool indices of the teachers serving at this version (ascending).
        infos: the catalogue, every teacher the pool served up to now (index = pool index).
        handles: pool index -> actor handle, for the teachers live at this version.
        identity: the directory's random id, new each time `skd teachers serve` starts the pool (a pool
            served anew starts its versions at 0 again; a run's checkpoint tells the two apart by it).
    """

    version: int
    live: tuple[int, ...]
    infos: tuple[TeacherInfo, ...]
    handles: dict = field(default_factory=dict)
    identity: str = ""


class PoolDirectory:
    """The served pool's membership (a detached Ray actor named `directory`; see the module docstring).

    Args:
        pool: the pool's name.
        settings: how its teachers run and what they serve ({"task", "num_labels", "vocab", "regression",
            "attn_implementation", "num_cpus", "num_gpus", "threads", "device", "slots", ...}); `skd teachers add`
            starts joining teachers with them and checks them against the pool's task and vocabulary.
    """

    def __init__(self, pool: str, settings: dict) -> None:
        self.pool, self.settings = pool, settings
        self.infos: list[TeacherInfo] = []
        self.handles: dict[int, ray.actor.ActorHandle] = {}  # pool index -> actor, live ones only
        self.actors: dict[int, ray.actor.ActorHandle] = {}  # pool index -> its latest actor (removed ones too)
        self.history: list[tuple[tuple[int, ...], float, str]] = []  # per version: live, unix time, change
        self.records: dict[str, dict[int, int]] = {}  # run key -> {0-based step: version applied before it}
        self.placement_group = None  # the one `serve` reserved (removed by `skd teachers stop`)
        self.identity = uuid.uuid4().hex  # this serving of the pool (`PoolView.identity`)

    def _commit(self, change: str) -> int:
        self.history.append((tuple(sorted(self.handles)), time.time(), change))
        return len(self.history) - 1

    def join(self, infos: list[TeacherInfo], handles: list) -> int:
        """Add teachers (with their started actors) as one new version; returns it.

        Raises:
            ValueError: a name already serving, or a name the pool served before with another checkpoint.
        """
        names = [t.name for t in infos]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        by_name = {t.name: i for i, t in enumerate(self.infos)}
        for info in infos:
            i = by_name.get(info.name)
            if i is not None and i in self.handles:
                raise ValueError(f"teacher {info.name!r} already serves in pool {self.pool!r}")
            if i is not None and self.infos[i].checkpoint != info.checkpoint:
                raise ValueError(f"pool {self.pool!r} served a teacher {info.name!r} from {self.infos[i].checkpoint}; "
                                 f"give the teacher from {info.checkpoint} another name")
        for info, handle in zip(infos, handles):
            i = by_name.get(info.name)
            if i is None:
                i = len(self.infos)
                self.infos.append(info)
            self.handles[i] = self.actors[i] = handle
        return self._commit(("join " if self.history else "serve ") + ", ".join(t.name for t in infos))

    def leave(self, names: list[str]) -> tuple[int, list]:
        """Remove live teachers by name as one new version; returns (version, their actor handles to kill).

        Raises:
            ValueError: a name that does not serve in this pool.
        """
        names = list(dict.fromkeys(names))
        by_name = {self.infos[i].name: i for i in self.handles}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"pool {self.pool!r} does not serve {', '.join(unknown)} (it serves "
                             f"{', '.join(sorted(by_name)) or 'none'})")
        gone = [self.handles.pop(by_name[n]) for n in names]
        return self._commit("leave " + ", ".join(names)), gone

    def version(self) -> int:
        """The newest membership version."""
        return len(self.history) - 1

    def view(self, version: int | None = None) -> PoolView:
        """The pool at `version` (default: the newest), with the latest actor of each teacher live then (a
        removed teacher's actor is killed, so a resumed run replaying an old version finds it lost)."""
        v = self.version() if version is None else int(version)
        live = self.history[v][0]
        return PoolView(v, live, tuple(self.infos), {i: self.actors[i] for i in live}, self.identity)

    def record(self, key: str, step: int, version: int) -> None:
        """Remember that run `key` applied `version` before its 0-based `step` (idempotent)."""
        self.records.setdefault(key, {})[int(step)] = int(version)

    def recorded(self, key: str) -> dict[int, int]:
        """{0-based step: version} that run `key` applied (empty for a run this pool has not seen)."""
        return dict(self.records.get(key, {}))

    def describe(self) -> dict:
        """The pool for `skd teachers status`: name, settings, catalogue, live teachers (and their actors,
        `handles`), every teacher's latest actor (`actors`, removed ones too) and the history."""
        return {"pool": self.pool, "settings": self.settings, "infos": list(self.infos), "live": sorted(self.handles),
                "handles": dict(self.handles), "actors": dict(self.actors),
                "history": [{"version": v, "live": list(l), "time": t, "change": c}
                            for v, (l, t, c) in enumerate(self.history)]}

    def set_placement_group(self, group) -> None:
        self.placement_group = group

    def get_placement_group(self):
        return self.placement_group


class ServedPool:
    """A run's view of a served pool (a `KnowledgeSource`; picklable, so the driver hands it to Ray Train
    workers and Tune trials, and each copy follows the membership on its own at the steps the feed chooses).

    Teacher indices k are positions in the run's catalogue: the config's members first, in config order, then
    teachers that joined the pool after the run attached, in pool order (`members[k]` = pool index).

    Args:
        pool: the pool's name; directory: its directory actor.
        view: the membership the run starts from; members: [N] pool indices of the run's teachers.
        timeout_s: the knowledge timeout of each request (None: wait forever).
    """

    elastic = True

    def __init__(self, pool: str, directory, view: PoolView, members: list[int], timeout_s: float | None) -> None:
        self.pool, self.directory, self.view = pool, directory, view
        self.members, self.timeout_s = list(members), timeout_s
        self._poll: ray.ObjectRef | None = None
        self._seen = view.version

    @classmethod
    def attach(cls, pool: str, teachers: list[TeacherInfo], timeout_s: float | None = None,
               resuming: bool = False) -> "ServedPool":
        """Attach to a served pool that has served every one of `teachers` (the config's, from its manifest)
        and (unless `resuming`: the checkpoint then says which teachers the run follows) serves at least one
        of them now; members removed from the pool start as not live.

        Raises:
            SkdError: no such pool; a teacher it never served (or served from another checkpoint); none of
                them serving now (a new run).
        """
        directory = get_directory(pool)
        view: PoolView = ray.get(directory.view.remote())
        by_name = {t.name: i for i, t in enumerate(view.infos)}
        serving = sorted(view.infos[i].name for i in view.live)
        members = []
        for t in teachers:
            i = by_name.get(t.name)
            if i is None:
                raise SkdError(f"teacher pool {pool!r} does not serve {t.name!r} (it serves "
                               f"{', '.join(serving) or 'nothing'}); add it with `skd teachers add -c CONFIG "
                               f"{t.name}` or remove it from teachers.members")
            if view.infos[i].checkpoint != t.checkpoint:
                raise SkdError(f"teacher pool {pool!r} serves {t.name!r} from {view.infos[i].checkpoint}, the "
                               f"manifest says {t.checkpoint}; use the pool's config or another teacher name")
            members.append(i)
        absent = [t.name for t, i in zip(teachers, members) if i not in view.live]
        if len(absent) == len(teachers) and not resuming:
            raise SkdError(f"teacher pool {pool!r} serves none of {', '.join(absent)} now (it serves "
                           f"{', '.join(serving) or 'nothing'}); `skd teachers add -c CONFIG {' '.join(absent)}`")
        print(f"[skd] attached to teacher pool {pool!r} (version {view.version}): "
              f"{', '.join(t.name for t in teachers if t.name not in absent)}"
              f"{'; not serving now: ' + ', '.join(absent) if absent else ''}", flush=True)
        return cls(pool, directory, view, members, timeout_s)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_poll"] = None  # a pending poll belongs to the process that sent it
        return state

    @property
    def names(self) -> list[str]:
        """Teacher names, [N], in the run's order."""
        return [self.view.infos[i].name for i in self.members]

    @property
    def infos(self) -> list[TeacherInfo]:
        """The run's teachers, [N] (for the sampling distribution's family rule)."""
        return [self.view.infos[i] for i in self.members]

    @property
    def version(self) -> int:
        """The membership version this copy follows."""
        return self.view.version

    @property
    def identity(self) -> str:
        """Which serving of the pool this copy follows (`PoolView.identity`)."""
        return self.view.identity

    def live(self) -> list[int]:
        """Run indices of the teachers serving at `version`."""
        return [k for k, i in enumerate(self.members) if i in self.view.live]

    def _actor(self, k: int):
        return self.view.handles[self.members[k]]

    def stats_refs(self) -> dict[int, ray.ObjectRef]:
        """Each live teacher's `Teacher.stats()`, asked without waiting (as `TeacherPool.stats_refs`)."""
        return {k: self._actor(k).stats.remote() for k in self.live()}

    def actor_state(self, k: int) -> tuple[str, int] | None:
        """Teacher k's actor as the GCS sees it now (as `TeacherPool.actor_state`)."""
        return WATCH.state(self._actor(k))

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> PendingAnswers:
        """Ask teacher k without waiting (as `TeacherPool.submit`)."""
        return PendingAnswers([self._actor(k)], [k], k, batch, request, self.timeout_s)

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> PendingAnswers:
        """Ask `teachers` (default: every live one) at once; `result()` averages their logits."""
        teachers = self.live() if teachers is None else list(teachers)
        ref = ray.put(batch)
        return PendingAnswers([self._actor(k) for k in teachers], teachers, -1, ref, request, self.timeout_s)

    def poll(self) -> int:
        """The newest membership version seen so far, without waiting (one directory call in flight). A
        directory that is gone (`skd teachers stop`) changes nothing: its teachers then fail as lost ones."""
        if self._poll is None:
            self._poll = self.directory.version.remote()
        ready, _ = ray.wait([self._poll], timeout=0)
        if ready:
            try:
                self._seen = max(self._seen, int(ray.get(self._poll)))
            except ray.exceptions.RayError:
                pass
            self._poll = None
        return self._seen

    def latest(self) -> int:
        """The newest membership version, asked now (blocking); the current one if the directory is gone."""
        try:
            return max(self.version, int(ray.get(self.directory.version.remote())))
        except ray.exceptions.RayError:
            return self.version

    def changes(self, version: int) -> tuple[list[int], list[int]]:
        """Follow the pool to `version` (blocking; the same result in every copy that follows it from the same
        version). Teachers live at `version` but not at the current one, or served by another actor (removed
        and added again), join (appended to the run's catalogue unless it holds them already); run teachers
        live now and not at `version` leave.

        Returns:
            (joined, left): run indices.
        """
        new: PoolView = ray.get(self.directory.view.remote(version))
        old = set(self.view.live)
        actor = {i: h._actor_id for i, h in self.view.handles.items()}
        joined = []
        for i in new.live:  # new to the pool, or removed and added again (a new actor) since the current version
            if i not in old or new.handles[i]._actor_id != actor.get(i):
                if i not in self.members:
                    self.members.append(i)
                joined.append(self.members.index(i))
        left = [k for k, i in enumerate(self.members) if i in old and i not in new.live]
        self.view = new
        self._seen = max(self._seen, version)
        return sorted(joined), left

    def restore(self, version: int, members: list[int]) -> None:
        """Follow the pool from a checkpointed `version` with the checkpointed run catalogue (blocking)."""
        self.view = ray.get(self.directory.view.remote(version))
        self.members = list(members)

    def rebase(self, names: list[str], version: int) -> None:
        """Follow a pool served anew since the run's checkpoint (another `identity`; its versions began at 0
        again) from `version` (the newest, agreed over ranks), the run's catalogue (`names`, run order) found
        by name; teachers this copy knows (the config's) must come from the same checkpoints (blocking).

        Raises:
            SkdError: the new pool never served one of the run's teachers, or serves one from another checkpoint.
        """
        view: PoolView = ray.get(self.directory.view.remote(version))
        by_name = {t.name: i for i, t in enumerate(view.infos)}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SkdError(f"teacher pool {self.pool!r} was served anew and does not serve {', '.join(missing)}, which "
                           f"this run had; add them (`skd teachers add -c CONFIG {' '.join(missing)}`) and resume")
        known = {t.name: t.checkpoint for t in self.infos}
        other = [n for n in names if n in known and view.infos[by_name[n]].checkpoint != known[n]]
        if other:
            raise SkdError(f"teacher pool {self.pool!r} was served anew with {', '.join(other)} from other checkpoints "
                           f"than this run's; serve the run's teachers under these names, or start a new run")
        self.view, self.members, self._seen = view, [by_name[n] for n in names], view.version

    def record(self, key: str, step: int, version: int) -> None:
        """Tell the directory that run `key` applied `version` before its 0-based `step` (no waiting)."""
        self.directory.record.remote(key, step, version)

    def recorded(self, key: str) -> dict[int, int]:
        """{0-based step: version} the directory holds for run `key` (blocking; {} if the directory is gone)."""
        try:
            return {int(s): int(v) for s, v in ray.get(self.directory.recorded.remote(key)).items()}
        except ray.exceptions.RayError:
            return {}

    def close(self) -> None:
        """Nothing to release: the pool serves on (`skd teachers stop` removes it)."""
