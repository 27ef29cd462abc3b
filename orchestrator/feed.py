"""The knowledge feed: the one place on a worker that decides which teacher serves a step.

Stochastic KD (SKDBERT, Ding et al., AAAI 2023): each step the seeded sampler draws ONE teacher k from
the sampling distribution p and the step's knowledge request goes to k (or, for `average`, to every
teacher). The feed owns the sampler, the prefetch (step t+1's request leaves as soon as step t's answer
arrives, so the teacher computes it during the student's backward pass and next forward), the IR schedule's stage of each
step (`orchestrator.schedule`) and the per-teacher sample counts; `state_dict` is what a checkpoint
needs for a resumed run to draw the same teachers.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from actors.knowledge import Knowledge, KnowledgeRequest, KnowledgeSource, PendingKnowledge, TokenBatch
from orchestrator.sampling import TeacherSampler
from orchestrator.schedule import Stage, stage_at

SOFT_LABELS_ONLY = Stage((), True)


class KnowledgeFeed:
    """Knowledge for each step of one worker, drawn, requested ahead and counted.

    Args:
        source: where knowledge comes from (teacher pool or cache reader); None for no-KD training, where
            `next_knowledge` returns None.
        batches: step -> the worker's batch (`input_ids`, `attention_mask` [B, L], `ids` [B]), e.g.
            `orchestrator.data.StepBatches`.
        world: data-parallel workers (counts are global: B * world examples per step).
        total: the run's steps; steps are 0-based in [0, total).
        strategy: "skd" (draw one teacher from `probs`) or "average" (all teachers' logits).
        probs: [N] sampling distribution for skd; seed: the sampler's seed (the same on every rank, so
            every rank asks the same teacher at a step).
        request: the full knowledge request; a step asks for its stage's layers only.
        schedule / ir_fraction: the IR schedule (see `orchestrator.schedule.stage_at`).
        prefetch: request step t+1 when step t's answer arrives (False: request each step only when the
            loop asks for its knowledge, so teacher and student run in turn).

    Raises:
        ConfigError: invalid probabilities (from `TeacherSampler`).
    """

    def __init__(self, source: KnowledgeSource | None, batches: Callable[[int], dict[str, np.ndarray]], world: int,
                 total: int, strategy: str = "skd", probs: list[float] | None = None, seed: int = 0,
                 request: KnowledgeRequest = KnowledgeRequest(), schedule: str = "none", ir_fraction: float = 0.5,
                 prefetch: bool = True) -> None:
        self.source, self.batches, self.world, self.total = source, batches, world, total
        self.strategy, self.request, self.prefetch = strategy, request, prefetch
        self.schedule, self.ir_fraction = schedule, ir_fraction
        self.sampler = TeacherSampler(probs, seed) if source is not None and strategy == "skd" else None
        self.counts = [0] * (len(source.names) if source is not None else 0)  # examples served per teacher
        self._pending: tuple[int, PendingKnowledge] | None = None
        self._sampler_before_pending: dict[str, Any] | None = None

    def stage(self, step: int) -> Stage:
        """Which IR layers and whether soft labels apply at a 0-based `step`."""
        if self.schedule == "none" or not self.request.needs_layers:
            return SOFT_LABELS_ONLY
        return stage_at(step, self.total, self.schedule, self.request.student_layers, self.ir_fraction)

    def _send(self, step: int) -> None:
        """Draw the teacher for `step` (skd) and send its request for the step's stage, without waiting."""
        batch = TokenBatch.of(self.batches(step))
        layers = self.stage(step).layers
        request = self.request.subset(student_layers=layers) if self.request.needs_layers else self.request
        if self.strategy == "average":
            pending = self.source.submit_average(batch, request)
        else:
            self._sampler_before_pending = self.sampler.state_dict()
            pending = self.source.submit(self.sampler.draw(), batch, request)
        self._pending = (step, pending)

    def begin(self, step: int) -> None:
        """Send the first step's request ahead (with prefetch), so it overlaps the student's first forward."""
        if self.source is not None and self.prefetch and self._pending is None:
            self._send(step)

    def next_knowledge(self, step: int) -> Knowledge | None:
        """The knowledge of a 0-based `step` (blocking until it arrives); None without a source.

        Steps must come in order. Counts `B * world` examples for the serving teacher (every teacher for
        average) and, with prefetch, sends step+1's request before returning.
        """
        if self.source is None:
            return None
        if self._pending is None or self._pending[0] != step:
            self._send(step)
        knowledge = self._pending[1].result()
        self._pending = None
        served = len(self.batches(step)["ids"]) * self.world
        for k in ([knowledge.teacher] if knowledge.teacher >= 0 else range(len(self.counts))):
            self.counts[k] += served
        if self.prefetch and step + 1 < self.total:
            self._send(step + 1)
        return knowledge

    def state_dict(self) -> dict[str, Any]:
        """{"counts": [N] examples per teacher, "sampler": generator state before the next step's draw}
        (JSON-serialisable; a prefetched draw is not part of it, so a resumed run draws it again)."""
        sampler = None
        if self.sampler is not None:
            sampler = self._sampler_before_pending if self._pending is not None else self.sampler.state_dict()
        return {"counts": list(self.counts), "sampler": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and the sampler's position (a PBT exploit keeps the donor's stream with its own p)."""
        self.counts = list(state.get("counts") or self.counts)
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
