"""The knowledge feed: the one place on a worker that decides which teacher serves a step.

Stochastic KD (SKDBERT, Ding et al., AAAI 2023): each step the seeded sampler draws ONE teacher k from
the sampling distribution p and the step's knowledge request goes to k (or, for `average`, to every
teacher). The feed owns the sampler, the prefetch (step t+1's request leaves as soon as step t's answer
arrives, so the teacher computes it during the student's backward pass and next forward), the IR schedule's stage of each
step (`orchestrator.schedule`) and the per-teacher sample counts; `state_dict` is what a checkpoint
needs for a resumed run to draw the same teachers.

Teachers lost for good (`actors.errors.TeacherLostError`: actor dead after its restarts, or silent past the
knowledge timeout) are dropped: every step the ranks agree on the teachers lost at that step (`agree`, a
collective over the data-parallel group), so all ranks drop the same teachers at the same step, draw the
step again from p renormalised over the live teachers (the same generator on every rank, so the same
teacher), and go on; `average` averages over the live teachers. With no teacher left the feed raises
`TeachersLostError`, and its state is that of the step before, for a checkpoint to resume from. A teacher
dropped while its actor was down (its node gone, Ray restarting it) comes back when Ray has restarted it:
each rank looks the dropped actors up at most every `RETURN_CHECK_S` seconds (`source.actor_state`), the
ranks agree on the union in the same collective, and the teacher is asked again from the next step's draw on
every rank (event "back"). One dropped while its actor stayed ALIVE (silent past the timeout) comes back
only after Ray restarts it; one killed for good (DEAD) never.

An elastic source (a served pool, `actors.served.ServedPool`) changes membership while the run trains:
each step the feed polls the pool's version without waiting, the ranks agree on the newest version any of
them saw (in the same collective as the losses), and the change applies to the next step's draw on every
rank: joining teachers are asked from then on, leaving ones no more, and p is recomputed over the live set
by the family's rule (`reweigh`). Each applied change is recorded in the pool's directory under the run's
key as (step, version), so a resumed or restarted worker applies the same versions before the same steps.

The adaptive family (`orchestrator.adaptive.AdaptiveSampler`) learns p while the run trains: the feed tells
it which teacher taught each step, puts a learnt p in force at the step it applies to (before that step's
draw) and hands it the probe loss of each interval (`adapt`); its state is part of `state_dict`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import time

import numpy as np

from actors.errors import TeacherLostError, TeachersLostError
from actors.knowledge import Knowledge, KnowledgeRequest, KnowledgeSource, PendingKnowledge, TokenBatch
from orchestrator.adaptive import AdaptiveSampler, AdaptiveSettings
from orchestrator.sampling import TeacherSampler
from orchestrator.schedule import Stage, stage_at

SOFT_LABELS_ONLY = Stage((), True)

RETURN_CHECK_S = 2.0
"""Seconds between one rank's lookups of the actors of teachers dropped while down (see the module docstring)."""


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
        agree: (teachers this rank found lost at a step, the pool version it saw, dropped teachers it found
            restarted) -> (the union of the lost teachers, the newest version, the union of the restarted) over
            all data-parallel ranks; called by every rank at every step (a collective). Default: this rank's
            values (one worker).
        reweigh: (the run's teacher infos [N], live indices) -> [N] p after an elastic source's membership
            changed (`orchestrator.sampling.Reweigh`); None: renormalise p over the live teachers.
        key: the run's key for the pool's record of applied changes (the MLflow run id); None: not recorded.
        widths: teacher hidden sizes the student's projections serve (IR runs); a joining teacher of another
            width is not asked (logged as "skip"). None: any width.
        adaptive: settings of the adaptive family (skd only): p starts at `probs` (uniform) and is learnt from
            the rewards `adapt` is given. None: p is fixed.

    Raises:
        ConfigError: invalid probabilities (from `TeacherSampler`).
    """

    def __init__(self, source: KnowledgeSource | None, batches: Callable[[int], dict[str, np.ndarray]], world: int,
                 total: int, strategy: str = "skd", probs: list[float] | None = None, seed: int = 0,
                 request: KnowledgeRequest = KnowledgeRequest(), schedule: str = "none", ir_fraction: float = 0.5,
                 prefetch: bool = True,
                 agree: Callable[[list[int], int, list[int]], tuple[list[int], int, list[int]]] | None = None,
                 reweigh: Callable[[Sequence[Any], list[int]], Sequence[float]] | None = None,
                 key: str | None = None, widths: Sequence[int] | None = None,
                 adaptive: AdaptiveSettings | None = None) -> None:
        self.source, self.batches, self.world, self.total = source, batches, world, total
        self.strategy, self.request, self.prefetch = strategy, request, prefetch
        self.schedule, self.ir_fraction = schedule, ir_fraction
        self.agree = agree or (lambda lost, seen, back: (lost, seen, back))
        self.elastic = source if getattr(source, "elastic", False) else None
        self.reweigh, self.key, self.widths = reweigh, key, None if widths is None else set(widths)
        self.replay: dict[int, int] = {}  # 0-based step -> pool version to apply before its draw (resume)
        self.sampler = None
        if source is not None and strategy == "skd":
            self.sampler = (AdaptiveSampler(len(probs), seed, adaptive) if adaptive is not None
                            else TeacherSampler(probs, seed))
        self.adaptive = self.sampler if isinstance(self.sampler, AdaptiveSampler) else None
        self.counts = [0] * (len(source.names) if source is not None else 0)  # examples served per teacher
        self._live = list(source.live()) if source is not None else []
        if self.elastic is not None and self.sampler is not None and reweigh is not None:
            self.sampler.set_probs(reweigh(source.infos, self._live))  # members the pool no longer serves: 0
        self.lost: dict[int, tuple[int, str]] = {}  # teacher -> (0-based step, reason)
        self._down: dict[int, tuple[str, int]] = {}  # dropped teacher -> its actor's (state, restarts) then
        self._looked = float("-inf")  # when this rank last looked the dropped actors up (monotonic s)
        self.events: list[tuple[int, str, int, str]] = []  # (step, kind, teacher, detail); see `drain_events`
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
        return list(self._live)

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
        live = self._live
        if not self._drawable():
            raise TeachersLostError(self._all_lost_message(step))
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

    def _all_lost_message(self, step: int) -> str:
        lost = "; ".join(f"{self.source.names[k]} at step {s + 1} ({why})" for k, (s, why) in sorted(self.lost.items()))
        left = [self.source.names[k] for k in self._live]
        tail = f"; the teachers left ({', '.join(left)}) have sampling probability 0" if left else ""
        return f"every teacher this run asks is lost before step {step + 1}: {lost or 'none started'}{tail}"

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
            lost, seen, back = self.agree(sorted(found), self.elastic.poll() if self.elastic else 0,
                                          self._restarted())  # the same on every rank
            if not lost:
                break
            for k in sorted(set(lost)):
                if k in self._live:
                    self._drop(step, k, found.get(k, "lost on another data-parallel worker"))
        served = len(self.batches(step)["ids"]) * self.world
        for k in ([knowledge.teacher] if knowledge.teacher >= 0 else self._live):
            self.counts[k] += served
        if self.adaptive is not None and knowledge.teacher >= 0:
            self.adaptive.taught(knowledge.teacher)
        for k in back:  # asked again from the next step's draw (it was in the run: its width has a projection)
            if k in self.lost and step + 1 < self.total:  # any rank's sight counts: the same on every rank
                self._down.pop(k, None)
                del self.lost[k]
                self._live = sorted(set(self._live) | {k})
                self.events.append((step + 1, "back", k, "its actor was restarted"))
        if self.elastic is not None and step + 1 < self.total:
            self._follow(step + 1, seen)
        if self.prefetch and step + 1 < self.total:
            self._remember_sampler()
            try:
                self._send(step + 1)
            except TeachersLostError:
                pass  # raised again, with the checkpoint state, when step + 1 asks for its knowledge
        return knowledge

    def _drop(self, step: int, k: int, reason: str) -> None:
        """Teacher k is lost at 0-based `step`: not asked again unless its actor was down then and Ray
        restarts it (`_restarted`)."""
        self.lost[k] = (step, reason)
        self.events.append((step, "lost", k, reason))
        self._live.remove(k)
        state = self.source.actor_state(k) if hasattr(self.source, "actor_state") else None
        if state is not None and state[0] != "DEAD":  # DEAD is final: killed for good or restarts used up
            self._down[k] = state

    def _restarted(self) -> list[int]:
        """The dropped teachers whose actor is ALIVE again after it was down when dropped, or was restarted
        since (this rank's view, looked up at most every `RETURN_CHECK_S` seconds)."""
        if not self._down or time.monotonic() - self._looked < RETURN_CHECK_S:
            return []
        self._looked = time.monotonic()
        back = []
        for k, (state, restarts) in sorted(self._down.items()):
            now = self.source.actor_state(k)
            if now is not None and now[0] == "ALIVE" and (state != "ALIVE" or now[1] > restarts):
                back.append(k)
        return back

    def _follow(self, step: int, seen: int) -> None:
        """Apply the pool version due before 0-based `step`'s draw: a recorded one while replaying a resumed
        run's changes, else the newest any rank saw. Joining teachers are asked from `step` on (unless their
        width has no projection), leaving ones no more; p is recomputed over the live set."""
        due = max(self.replay, default=-1)
        target = self.replay.get(step) if step <= due else seen
        if target is not None and target > self.elastic.version:
            self._apply(step, target)

    def _apply(self, step: int, target: int) -> None:
        """Follow the pool to version `target` before 0-based `step`'s draw (see `_follow`), recorded."""
        joined, left = self.elastic.changes(target)
        self.counts += [0] * (len(self.source.names) - len(self.counts))
        for k in left:
            if k in self._live:
                self._live.remove(k)
            self._down.pop(k, None)  # left the pool: not taken back when its actor restarts
            self.events.append((step, "leave", k, f"pool version {target}"))
        for k in joined:
            self._join(step, k, f"pool version {target}")
        if self.sampler is not None:
            p = self.reweigh(self.source.infos, self._live) if self.reweigh else self.sampler.padded(len(self.counts))
            self.sampler.set_probs(p)
        if self.key is not None:
            self.elastic.record(self.key, step, target)

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
        """Membership events since the last call: (0-based step, kind, teacher index, detail), kind "lost"
        (detail: the reason), "back" (a dropped teacher restarted, asked again from that step), "join", "leave"
        or "skip" (an elastic pool's change applied before that step)."""
        events, self.events = self.events, []
        return events

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
            state["pool"] = {"identity": self.elastic.identity, "version": self.elastic.version,
                             "members": list(self.elastic.members), "names": list(self.names),
                             "live": list(self._live)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and the sampler's position (a PBT exploit keeps the donor's stream with its own p);
        for an elastic source also the pool version, the run's teachers and the live ones (p follows from them
        by this run's `reweigh`, so an exploited trial keeps its own family settings), and the changes
        recorded after `state["step"]`, to be applied again at the same steps."""
        pool = state.get("pool")
        start = int(state.get("step", 0))
        if self.elastic is not None and pool is not None:
            latest = self.agree([], self.elastic.latest(), [])[1]  # every rank follows the same version
            if pool.get("identity", self.elastic.identity) != self.elastic.identity or pool["version"] > latest:
                self._rebase(start, pool, latest)  # served anew since the checkpoint: follow it as it is now
            else:
                self.elastic.restore(pool["version"], pool["members"])
                self._live = list(pool["live"])
            if self.sampler is not None:
                self.sampler.set_probs(self.reweigh(self.source.infos, self._live) if self.reweigh
                                       else self.sampler.padded(len(self.names)))
        if self.elastic is not None and self.key is not None:
            self.replay = {s: v for s, v in self.elastic.recorded(self.key).items() if s > start}
        if self.elastic is not None and pool is not None and not self._drawable() and start not in self.replay:
            # stopped with no teacher left (or none with probability): follow the pool as it is now, so
            # teachers added since serve the resumed run (the ranks agree on the version first)
            latest = self.agree([], self.elastic.latest(), [])[1]
            if latest > self.elastic.version:
                self._apply(start, latest)
        self.counts = list(state.get("counts") or self.counts)
        self.counts += [0] * (len(self.names) - len(self.counts))
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_adaptive_state(state["adaptive"])
            if self.elastic is not None and self.adaptive.support != sorted(self._live):  # followed the pool above
                self.sampler.set_probs(self.reweigh(self.source.infos, self._live) if self.reweigh
                                       else self.sampler.padded(len(self.names)))

    def _rebase(self, step: int, pool: dict[str, Any], version: int) -> None:
        """The checkpoint's pool was stopped and served anew (another identity, or, for a checkpoint older than
        identities, a version past the pool's newest): follow the new one from `version`, the run's teachers
        found by name (`ServedPool.rebase`); those live before and not now leave, those live now and not before
        join (events at 0-based `step`)."""
        before = set(pool["live"])
        self.elastic.rebase(pool.get("names") or self.names[: len(pool["members"])], version)
        now = set(self.elastic.live())
        self._live = sorted(before & now)
        detail = f"pool served anew, version {self.elastic.version}"
        for k in sorted(before - now):
            self._down.pop(k, None)
            self.events.append((step, "leave", k, detail))
        for k in sorted(now - before):
            self._join(step, k, detail)

    def _join(self, step: int, k: int, detail: str) -> None:
        """Teacher k serves the run from 0-based `step` (unless its width has no projection in this run)."""
        width = self.source.infos[k].hidden_size
        if self.widths is not None and width not in self.widths:
            self.events.append((step, "skip", k, f"{detail}: hidden size {width} has no projection in this run "
                                                 f"(widths {sorted(self.widths)})"))
            return
        self._live = sorted(set(self._live) | {k})
        self.lost.pop(k, None)
        self.events.append((step, "join", k, detail))

    def _drawable(self) -> bool:
        """Whether some live teacher can be asked (and, for skd, has probability > 0)."""
        return bool(self._live) and (self.sampler is None or self.sampler.mass(self._live) > 0)

    def start_fresh(self) -> None:
        """A run starting at step 0 (no checkpoint): replay the changes recorded for its key, if any (a
        worker restarted before the first checkpoint)."""
        if self.elastic is not None and self.key is not None:
            self.replay = self.elastic.recorded(self.key)
