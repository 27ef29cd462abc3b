"""An in-process `KnowledgeSource` for tests that need no Ray (the knowledge feed, the cache build)."""

from __future__ import annotations

from typing import Any, Callable

from actors.knowledge import Knowledge, KnowledgeRequest, TokenBatch, average_logits


class Answered:
    """A `PendingKnowledge` that is already there."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge

    def result(self) -> Knowledge:
        return self.knowledge


class FakeSource:
    """Teachers `names` answer with `answer(k, batch, request)`; every call is recorded in `calls` as
    `record(kind, k, batch, request)` ("submit" or "average", k = -1 for the average)."""

    def __init__(self, names: list[str], answer: Callable[[int, TokenBatch, KnowledgeRequest], Knowledge],
                 record: Callable[[str, int, TokenBatch, KnowledgeRequest], Any] | None = None) -> None:
        self._names, self.answer, self.calls, self.closed = names, answer, [], False
        self.record = record or (lambda kind, k, batch, request: (kind, k, batch, request))

    @property
    def names(self) -> list[str]:
        return self._names

    def live(self) -> list[int]:
        return list(range(len(self._names)))

    def submit(self, k: int, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Answered:
        self.calls.append(self.record("submit", k, batch, request))
        return Answered(self.answer(k, batch, request))

    def submit_average(self, batch: TokenBatch, request: KnowledgeRequest = KnowledgeRequest()) -> Answered:
        self.calls.append(self.record("average", -1, batch, request))
        return Answered(average_logits([self.answer(k, batch, request) for k in self.live()], 0.0))

    def close(self) -> None:
        self.closed = True
