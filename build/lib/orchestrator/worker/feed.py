"""The knowledge feed: the one place on a worker that decides which teacher serves a step.

Stochastic KD (SKDBERT, Ding et al., AAAI 2023): each step the seeded sampler draws ONE teacher k from
the sampling distribution p and the step's knowledge request goes to k (or, for `average`, to every
teacher). The feed owns the sampler, the prefetch (step t+1's request leaves as soon as step t's answer
arrives, so the teacher computes it during the student's backward pass and next forward), the IR schedule's stage of each
step (`orchestrator.common.schedule`) and the per-teacher sample counts; `state_dict` is what a checkpoint
needs for a resumed run to draw the same teachers.

Which teachers the run asks is `orchestrator.worker.membership.Membership`'s: teachers lost (dropped on every
rank at the same step, the step drawn again from p renormalised over the live ones; `average` averages the
live ones), teachers back after Ray restarted their actor, and an elastic source's joins and leaves. With no
teacher left the feed raises `TeachersLostError`, and its state is that of the step before, for a checkpoint
to resume from.

The adaptive family (`orchestrator.worker.adaptive.AdaptiveSampler`) learns p while the run trains: the feed tells
it which teacher taught each step, puts a learnt p in force at the step it applies to (before that step's
draw) and hands it the probe loss of each interval (`adapt`); its state is part of `state_dict`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from actors.errors import TeacherLostError, TeachersLostError
from actors.knowledge import Knowledge, KnowledgeRequest, PendingKnowledge, TokenBatch
from orchestrator.worker.adaptive import AdaptiveSampler
from orchestrator.worker.spec import KnowledgePlan, KnowledgeSpec
from orchestrator.worker.membership import Agree, Membership
from orchestrator.common.sampling import TeacherSampler
from orchestrator.common.schedule import Stage, stage_at

SOFT_LABELS_ONLY = Stage((), True)


class KnowledgeFeed:
    """Knowledge for each step of one worker, drawn, requested ahead and counted.

    Args:
        knowledge: the worker spec's knowledge piece (`orchestrator.worker.spec.KnowledgeSpec`: source,
            strategy, p, request and IR schedule, prefetch, reweigh rule, adaptive settings, teacher widths);
            None for no-KD training, where `next_knowledge` returns None.
        batches: step -> the worker's batch (`input_ids`, `attention_mask` [B, L], `ids` [B]), e.g.
            `orchestrator.worker.batches.StepBatches`.
        world: data-parallel workers (counts are global: B * world examples per step).
        total: the run's steps; steps are 0-based in [0, total).
        seed: the sampler's seed (the same on every rank, so every rank asks the same teacher at a step).
        agree / key: how the ranks agree on membership and the run's key for a served pool's record (see
            `orchestrator.worker.membership.Membership`).

    With `knowledge.adaptive` set (skd only) p starts at `knowledge.probs` (uniform) and is learnt from the
    rewards `adapt` is given; otherwise p is fixed. A step asks for its IR stage's layers only
    (`orchestrator.common.schedule.stage_at`); with `knowledge.prefetch` false each step's request leaves only
    when the loop asks for its knowledge, so teacher and student run in turn.

    Raises:
        ConfigError: invalid probabilities (from `TeacherSampler`).
    """

    def __init__(self, knowledge: KnowledgeSpec | None, batches: Callable[[int], dict[str, np.ndarray]], world: int,
                 total: int, seed: int = 0, agree: Agree | None = None, key: str | None = None) -> None:
        kn, plan = knowledge, (knowledge.plan if knowledge is not None else KnowledgePlan(KnowledgeRequest()))
        source = kn.source if kn is not None else None
        self.source, self.batches, self.world, self.total = source, batches, world, total
        self.strategy, self.request = (kn.strategy if kn is not None else "skd"), plan.request
        self.prefetch = kn.prefetch if kn is not None else True
        self.schedule, self.ir_fraction = plan.schedule, plan.ir_fraction
        self.sampler = None
        if source is not None and self.strategy == "skd":
            self.sampler = (AdaptiveSampler(len(kn.probs), seed, kn.adaptive) if kn.adaptive is not None
                            else TeacherSampler(kn.probs, seed))
        self.adaptive = self.sampler if isinstance(self.sampler, AdaptiveSampler) else None
        self.counts = [0] * (len(source.names) if source is not None else 0)  # examples served per teacher
        widths = plan.teacher_widths if plan.request.needs_layers else None
        self.members = None if source is None else Membership(source, self.sampler, agree, kn.reweigh, key, widths)
        self.elastic = None if source is None else self.members.elastic
        self._pending: tuple[int, PendingKnowledge] | None = None
        self._sampler_before_pending: dict[str, Any] | None = None
        self._sampler_at_stop: dict[str, Any] | None = None  # set when every teacher is lost

    def stage(self, step: int) -> Stage:
        """Which IR layers and whether soft labels apply at a 0-based `step`."""
        if self.schedule == "none" or not self.request.needs_layers:
            return SOFT_LABELS_ONLY
        return stage_at(step, self.total, self.schedule, self.request.student_layers, self.ir_fraction)

    def live(self) -> list[int]:
        """Indices of the teachers this run still asks (ascending)."""
        return [] if self.members is None else self.members.live()

    @property
    def lost(self) -> dict[int, tuple[int, str]]:
        """Teachers lost and not back: teacher -> (0-based step, reason)."""
        return {} if self.members is None else dict(self.members.lost)

    @property
    def names(self) -> list[str]:
        """The run's teacher names, [N] (grows when teachers join an elastic source)."""
        return list(self.source.names) if self.source is not None else []

    @property
    def probs(self) -> list[float] | None:
        """The sampling distribution in force, [N] (None without a sampler)."""
        return None if self.sampler is None else self.sampler.probs.tolist()

    def _send(self, step: int) -> None:
        """Draw the teacher for `step` (skd) and send its request for the step's stage, without waiting.

        Raises:
            TeachersLostError: no live teacher left (or none with probability > 0).
        """
        live = self.members.live()
        if not self.members.drawable():
            raise TeachersLostError(self.members.all_lost_message(step))
        batch = TokenBatch.of(self.batches(step))
        layers = self.stage(step).layers
        request = self.request.subset(student_layers=layers) if self.request.needs_layers else self.request
        if self.strategy == "average":
            pending = self.source.submit_average(batch, request, teachers=list(live))
        else:
            if self.adaptive is not None:
                self.adaptive.activate(step)  # a p learnt before this step applies from its draw on
            pending = self.source.submit(self.sampler.draw(live), batch, request)
        self._pending = (step, pending)

    def begin(self, step: int) -> None:
        """Send the first step's request ahead (with prefetch), so it overlaps the student's first forward."""
        if self.source is not None and self.prefetch and self._pending is None:
            self._remember_sampler()
            try:
                self._send(step)
            except TeachersLostError:
                pass  # raised again, with the checkpoint state, when the step asks for its knowledge

    def _remember_sampler(self) -> None:
        """Keep the generator state before a step's first draw (what a checkpoint stores for that step)."""
        if self.sampler is not None:
            self._sampler_before_pending = self.sampler.state_dict()

    def next_knowledge(self, step: int) -> Knowledge | None:
        """The knowledge of a 0-based `step` (blocking until it arrives); None without a source.

        Steps must come in order. Counts `B * world` examples for the serving teacher (every live teacher
        for average) and, with prefetch, sends step+1's request before returning. A teacher lost at this
        step (on any rank) is dropped on every rank and the step is asked again of the live teachers.

        Raises:
            TeachersLostError: no teacher is left to ask; `state_dict()` then holds the state before `step`.
        """
        if self.source is None:
            return None
        if self._pending is None or self._pending[0] != step:
            self._remember_sampler()
        while True:
            knowledge, found = None, {}
            try:
                if self._pending is None or self._pending[0] != step:
                    self._send(step)
                knowledge = self._pending[1].result()
            except TeacherLostError as exc:
                found[exc.teacher] = exc.reason
            except TeachersLostError:
                self._stop_at(step)
                raise
            self._pending = None
            again, seen, back = self.members.settle(step, found)  # the same on every rank
            if not again:
                break
        served = len(self.batches(step)["ids"]) * self.world
        for k in ([knowledge.teacher] if knowledge.teacher >= 0 else self.members.live()):
            self.counts[k] += served
        if self.adaptive is not None and knowledge.teacher >= 0:
            self.adaptive.taught(knowledge.teacher)
        self.members.advance(step, self.total, seen, back)  # before step + 1's draw
        self.counts += [0] * (len(self.names) - len(self.counts))  # teachers that joined
        if self.prefetch and step + 1 < self.total:
            self._remember_sampler()
            try:
                self._send(step + 1)
            except TeachersLostError:
                pass  # raised again, with the checkpoint state, when step + 1 asks for its knowledge
        return knowledge

    def adapt(self, done: int, probe_loss: float) -> dict[str, float]:
        """The student's probe loss after 1-based step `done` (the same on every rank): the adaptive sampler's
        reward for the interval that ended, and the p it learns, in force from 0-based step `done + 1`.

        Returns:
            Metrics by teacher name: "sampler/reward", "sampler/probe_loss", "sampler/gain/<name>" and the
            learnt "sampler/p/<name>" ({} on the first probe or without the adaptive family).
        """
        if self.adaptive is None:
            return {}
        stats = self.adaptive.update(done, probe_loss)
        if not stats:
            return {}
        names = self.names
        out = {k: v for k, v in stats.items() if not k.startswith("sampler/gain/")}
        out.update({f"sampler/gain/{names[int(k.rsplit('/', 1)[1])]}": v for k, v in stats.items()
                    if k.startswith("sampler/gain/")})
        out.update({f"sampler/p/{n}": p for n, p in zip(names, self.adaptive.queued[1])})
        return out

    def _stop_at(self, step: int) -> None:
        """Every teacher is lost at `step`: the state to checkpoint is the one before its draw."""
        self._pending = None
        self._sampler_at_stop = self._sampler_before_pending

    def drain_events(self) -> list[tuple[int, str, int, str]]:
        """Membership events since the last call (`Membership.drain_events`)."""
        return [] if self.members is None else self.members.drain_events()

    def state_dict(self) -> dict[str, Any]:
        """{"counts": [N] examples per teacher, "sampler": generator state before the next step's draw}
        (JSON-serialisable; a prefetched draw is not part of it, so a resumed run draws it again)."""
        sampler = None
        if self._sampler_at_stop is not None:
            sampler = self._sampler_at_stop
        elif self.sampler is not None:
            sampler = self._sampler_before_pending if self._pending is not None else self.sampler.state_dict()
        state = {"counts": list(self.counts), "sampler": sampler}
        if self.adaptive is not None:  # the bandit's state after the last probe (p in force, p queued, gains)
            state["adaptive"] = self.adaptive.adaptive_state()
        if self.elastic is not None:  # where the run stands in the pool: which serving, version, teachers, live
            state["pool"] = self.members.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and the sampler's position (a PBT exploit keeps the donor's stream with its own p);
        for an elastic source also the pool version, the run's teachers and the live ones (p follows from them
        by this run's `reweigh`, so an exploited trial keeps its own family settings), and the changes
        recorded after `state["step"]`, to be applied again at the same steps."""
        if self.members is not None:
            self.members.load_state_dict(state.get("pool"), int(state.get("step", 0)))
        self.counts = list(state.get("counts") or self.counts)
        self.counts += [0] * (len(self.names) - len(self.counts))
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_adaptive_state(state["adaptive"])
            if self.elastic is not None and self.adaptive.support != sorted(self.members.live()):  # followed the pool
                self.members.reset_probs()

    def start_fresh(self) -> None:
        """A run starting at step 0 (no checkpoint): see `Membership.start_fresh`."""
        if self.members is not None:
            self.members.start_fresh()
