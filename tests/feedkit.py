"""A `KnowledgeFeed` from loose settings, for the feed's unit tests: the worker spec's knowledge piece is
built here the way the driver builds it (`orchestrator.driver.runner`), so each test names only what it
varies."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from actors.knowledge import KnowledgeRequest, KnowledgeSource
from orchestrator.worker.feed import KnowledgeFeed
from orchestrator.worker.spec import KnowledgePlan, KnowledgeSpec


def make_feed(source: KnowledgeSource | None, batches: Callable[[int], dict[str, np.ndarray]], *, world: int,
              total: int, strategy: str = "skd", probs: list[float] | None = None, seed: int = 0,
              request: KnowledgeRequest = KnowledgeRequest(), schedule: str = "none", ir_fraction: float = 0.5,
              prefetch: bool = True, agree: Any = None, reweigh: Any = None, key: str | None = None,
              widths: tuple[int, ...] = (), adaptive: Any = None) -> KnowledgeFeed:
    """The feed of a run with these settings (source None: no-KD, no knowledge piece)."""
    knowledge = None if source is None else KnowledgeSpec(
        source, strategy, probs, list(source.names), KnowledgePlan(request, schedule, ir_fraction, teacher_widths=widths),
        alpha=0.5, temperature=2.0, prefetch=prefetch, reweigh=reweigh, adaptive=adaptive)
    return KnowledgeFeed(knowledge, batches, world, total, seed, agree=agree, key=key)
