"""An in-process `KnowledgeSource` for tests that need no Ray (the knowledge feed, the cache build)."""

from __future__ import annotations

from typing import Any, Callable

from actors.errors import TeacherLostError
from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch, average_logits


class Answered:
    """A `PendingKnowledge` that is already there."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge

    def result(self) -> Knowledge:
        return self.knowledge


class Lost:
    """A `PendingKnowledge` whose teacher is gone: `result()` raises `TeacherLostError`."""

    def __init__(self, k: int) -> None:
        self.k = k

    def result(self) -> Knowledge:
        raise TeacherLostError(self.k, "killed by the test")


class FakeSource:
    """Teachers `names` answer with `answer(k, batch, request)`; every call is recorded in `calls` as
    `record(kind, k, batch, request)` ("submit" or "average", k = -1 for the average). A teacher in `dead`
    answers with `TeacherLostError` (the test adds to it to kill one); `states[k]` is what `actor_state(k)`
    says of its actor ((state, restarts), None when absent), as a Ray teacher pool's GCS lookup would."""

    def __init__(self, names: list[str], answer: Callable[[int, TokenBatch, KnowledgeRequest], Knowledge],
                 record: Callable[[str, int, TokenBatch, KnowledgeRequest], Any] | None = None) -> None:
        self._names, self.answer, self.calls, self.closed = names, answer, [], False
        self.describe_call = record or (lambda kind, k, batch, request: (kind, k, batch, request))
        self.dead: set[int] = set()
        self.states: dict[int, tuple[str, int]] = {}

    @property
    def names(self) -> list[str]:
        return self._names

    def live(self) -> list[int]:
        return list(range(len(self._names)))

    def actor_state(self, k: int) -> tuple[str, int] | None:
        return self.states.get(k)

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Answered:
        self.calls.append(self.describe_call("submit", k, batch, request))
        return Lost(k) if k in self.dead else Answered(self.answer(k, batch, request))

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> Answered:
        self.calls.append(self.describe_call("average", -1, batch, request))
        asked = self.live() if teachers is None else teachers
        if self.dead & set(asked):
            return Lost(min(self.dead & set(asked)))
        return Answered(average_logits([self.answer(k, batch, request)
                                        for k in (self.live() if teachers is None else teachers)], 0.0))

    def close(self) -> None:
        self.closed = True


class FakeInfo:
    """The fields of a `TeacherInfo` the sampling rules read."""

    def __init__(self, name: str, dev_metric: float = 0.5, parameters: int = 1000, hidden_size: int = 32) -> None:
        self.name, self.dev_metric, self.parameters, self.hidden_size = name, dev_metric, parameters, hidden_size


class FakeElastic(FakeSource):
    """A served pool without Ray, for the feed's membership logic: `versions[v]` lists the pool entries live at
    version v (entries named in `infos`); the test appends versions and sets `published` (what `poll`
    returns). Follows `actors.served.ServedPool`'s rules: run teachers = `members` (pool indices), joiners
    appended; changes are (joined, left) run indices; `records` holds what runs applied."""

    elastic = True

    def __init__(self, infos: list[FakeInfo], versions: list[list[int]], answer, record=None) -> None:
        super().__init__([], answer, record)
        self.pool_infos, self.versions, self.records = infos, versions, {}
        self.version, self.published = 0, 0
        self.members = list(versions[0])
        self.identity = "serving-1"  # another value: the pool was served anew (versions from 0 again)

    @property
    def names(self) -> list[str]:
        return [self.pool_infos[i].name for i in self.members]

    @property
    def infos(self) -> list[FakeInfo]:
        return [self.pool_infos[i] for i in self.members]

    def live(self) -> list[int]:
        return [k for k, i in enumerate(self.members) if i in self.versions[self.version]]

    def poll(self) -> int:
        return self.published

    def latest(self) -> int:
        return max(self.version, self.published)

    def changes(self, version: int) -> tuple[list[int], list[int]]:
        old, new = set(self.versions[self.version]), self.versions[version]
        joined = []
        for i in new:
            if i not in old:
                if i not in self.members:
                    self.members.append(i)
                joined.append(self.members.index(i))
        left = [k for k, i in enumerate(self.members) if i in old and i not in new]
        self.version = version
        return sorted(joined), left

    def restore(self, version: int, members: list[int]) -> None:
        self.version, self.members = version, list(members)

    def rebase(self, names: list[str], version: int) -> None:
        by_name = {t.name: i for i, t in enumerate(self.pool_infos)}
        self.version, self.members = version, [by_name[n] for n in names]

    def record(self, key: str, step: int, version: int) -> None:
        self.records.setdefault(key, {})[step] = version

    def recorded(self, key: str) -> dict[int, int]:
        return dict(self.records.get(key, {}))
