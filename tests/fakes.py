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
    answers with `TeacherLostError` (the test adds to it to kill one)."""

    def __init__(self, names: list[str], answer: Callable[[int, TokenBatch, KnowledgeRequest], Knowledge],
                 record: Callable[[str, int, TokenBatch, KnowledgeRequest], Any] | None = None) -> None:
        self._names, self.answer, self.calls, self.closed = names, answer, [], False
        self.record = record or (lambda kind, k, batch, request: (kind, k, batch, request))
        self.dead: set[int] = set()

    @property
    def names(self) -> list[str]:
        return self._names

    def live(self) -> list[int]:
        return list(range(len(self._names)))

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Answered:
        self.calls.append(self.record("submit", k, batch, request))
        return Lost(k) if k in self.dead else Answered(self.answer(k, batch, request))

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest(),
                       teachers: list[int] | None = None) -> Answered:
        self.calls.append(self.record("average", -1, batch, request))
        asked = self.live() if teachers is None else teachers
        if self.dead & set(asked):
            return Lost(min(self.dead & set(asked)))
        return Answered(average_logits([self.answer(k, batch, request)
                                        for k in (self.live() if teachers is None else teachers)], 0.0))

    def close(self) -> None:
        self.closed = True
