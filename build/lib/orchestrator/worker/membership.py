"""Which teachers a run asks, step by step, the same on every data-parallel rank (runs on every Ray Train worker).

Teachers lost for good (`actors.errors.TeacherLostError`: actor dead after its restarts, or silent past the
knowledge timeout) are dropped: every step the ranks agree on the teachers lost at that step (`agree`, a
collective over the data-parallel group), so all ranks drop the same teachers at the same step; the feed then
draws the step again from p renormalised over the live teachers. A teacher dropped while its actor was down
(its node gone, Ray restarting it) comes back when Ray has restarted it: each rank looks the dropped actors
up at most every `RETURN_CHECK_S` seconds (`source.actor_state`), the ranks agree on the union in the same
collective, and the teacher is asked again from the next step's draw on every rank (event "back"). One
dropped while its actor stayed ALIVE (silent past the timeout) comes back only after Ray restarts it; one
killed for good (DEAD) never.

An elastic source (a served pool, `actors.served.ServedPool`) changes membership while the run trains:
each step the ranks poll the pool's version without waiting, agree on the newest version any of them saw (in
the same collective as the losses), and the change applies to the next step's draw on every rank: joining
teachers are asked from then on, leaving ones no more, and p is recomputed over the live set by the family's
rule (`reweigh`). Each applied change is recorded in the pool's directory under the run's key as (step,
version), so a resumed or restarted worker applies the same versions before the same steps.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from actors.knowledge import KnowledgeSource

RETURN_CHECK_S = 2.0
"""Seconds between one rank's lookups of the actors of teachers dropped while down (see the module docstring)."""

Agree = Callable[[list[int], int, list[int]], tuple[list[int], int, list[int]]]


class Membership:
    """The live teachers of one worker's run, and every change to them (lost, back, join, leave, skip).

    Args:
        source: the knowledge source (its `live()` at the start; an elastic one's versions later).
        sampler: the run's `TeacherSampler` / `AdaptiveSampler` (None for `average`): p is reset on it
            after an elastic source's membership changes.
        agree: (teachers this rank found lost at a step, the pool version it saw, dropped teachers it found
            restarted) -> (the union of the lost teachers, the newest version, the union of the restarted) over
            all data-parallel ranks; called by every rank at every step (a collective). Default: this rank's
            values (one worker).
        reweigh: (the run's teacher infos [N], live indices) -> [N] p after an elastic source's membership
            changed (`orchestrator.common.sampling.Reweigh`); None: p renormalised over the live teachers.
        key: the run's key for the pool's record of applied changes (the MLflow run id); None: not recorded.
        widths: teacher hidden sizes the student's projections serve (IR runs); a joining teacher of another
            width is not asked (event "skip"). None: any width.
    """

    def __init__(self, source: KnowledgeSource, sampler=None, agree: Agree | None = None,
                 reweigh: Callable[[Sequence[Any], list[int]], Sequence[float]] | None = None,
                 key: str | None = None, widths: Sequence[int] | None = None) -> None:
        self.source, self.sampler = source, sampler
        self.agree = agree or (lambda lost, seen, back: (lost, seen, back))
        self.elastic = source if getattr(source, "elastic", False) else None
        self.reweigh, self.key, self.widths = reweigh, key, None if widths is None else set(widths)
        self.replay: dict[int, int] = {}  # 0-based step -> pool version to apply before its draw (resume)
        self._live = list(source.live())
        if self.elastic is not None and sampler is not None and reweigh is not None:
            sampler.set_probs(reweigh(source.infos, self._live))  # members the pool no longer serves: 0
        self.lost: dict[int, tuple[int, str]] = {}  # teacher -> (0-based step, reason)
        self._down: dict[int, tuple[str, int]] = {}  # dropped teacher -> its actor's (state, restarts) then
        self._looked = float("-inf")  # when this rank last looked the dropped actors up (monotonic s)
        self.events: list[tuple[int, str, int, str]] = []  # (step, kind, teacher, detail); see `drain_events`

    def live(self) -> list[int]:
        """Indices of the teachers this run still asks (ascending)."""
        return list(self._live)

    @property
    def names(self) -> list[str]:
        """The run's teacher names, [N] (grows when teachers join an elastic source)."""
        return list(self.source.names)

    def settle(self, step: int, found: dict[int, str]) -> tuple[bool, int, list[int]]:
        """The step's agreement (every rank calls it once per try of a 0-based `step`): drops the teachers any
        rank found lost (`found`: teacher -> reason, this rank's). Returns (whether any was lost, so the step
        is drawn again; the newest pool version any rank saw; the dropped teachers any rank found restarted,
        for `advance`)."""
        lost, seen, back = self.agree(sorted(found), self.elastic.poll() if self.elastic else 0, self._restarted())
        for k in sorted(set(lost)):
            if k in self._live:
                self._drop(step, k, found.get(k, "lost on another data-parallel worker"))
        return bool(lost), seen, back

    def advance(self, step: int, total: int, seen: int, back: list[int]) -> None:
        """After 0-based `step` was served: the teachers in `back` are asked again and the pool version due is
        applied, both from step + 1's draw (nothing after the run's last step, `total` - 1)."""
        if step + 1 >= total:
            return
        for k in back:  # it was in the run, so its width has a projection
            if k in self.lost:  # any rank's sight counts: the same on every rank
                self._down.pop(k, None)
                del self.lost[k]
                self._live = sorted(set(self._live) | {k})
                self.events.append((step + 1, "back", k, "its actor was restarted"))
        if self.elastic is not None:
            self._follow(step + 1, seen)

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
        for k in left:
            if k in self._live:
                self._live.remove(k)
            self._down.pop(k, None)  # left the pool: not taken back when its actor restarts
            self.events.append((step, "leave", k, f"pool version {target}"))
        for k in joined:
            self._join(step, k, f"pool version {target}")
        self.reset_probs()
        if self.key is not None:
            self.elastic.record(self.key, step, target)

    def reset_probs(self) -> None:
        """p after a membership change: the family's rule over the live set (`reweigh`), else p padded to the
        run's teachers (joiners 0, renormalised at each draw over the live ones)."""
        if self.sampler is not None:
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

    def drawable(self) -> bool:
        """Whether some live teacher can be asked (and, for skd, has probability > 0)."""
        return bool(self._live) and (self.sampler is None or self.sampler.mass(self._live) > 0)

    def all_lost_message(self, step: int) -> str:
        """Why no teacher can serve 0-based `step`: each lost one with its step and reason."""
        names = self.names
        lost = "; ".join(f"{names[k]} at step {s + 1} ({why})" for k, (s, why) in sorted(self.lost.items()))
        left = [names[k] for k in self._live]
        tail = f"; the teachers left ({', '.join(left)}) have sampling probability 0" if left else ""
        return f"every teacher this run asks is lost before step {step + 1}: {lost or 'none started'}{tail}"

    def drain_events(self) -> list[tuple[int, str, int, str]]:
        """Events since the last call: (0-based step, kind, teacher index, detail), kind "lost" (detail: the
        reason), "back" (a dropped teacher restarted, asked again from that step), "join", "leave" or "skip"
        (an elastic pool's change applied before that step)."""
        events, self.events = self.events, []
        return events

    def state_dict(self) -> dict[str, Any] | None:
        """Where the run stands in an elastic pool ({"identity", "version", "members", "names", "live"}), the
        checkpoint's "pool" entry; None for other sources."""
        if self.elastic is None:
            return None
        return {"identity": self.elastic.identity, "version": self.elastic.version,
                "members": list(self.elastic.members), "names": list(self.names), "live": list(self._live)}

    def load_state_dict(self, pool: dict[str, Any] | None, start: int) -> None:
        """Restore an elastic pool's state at 0-based step `start` (`pool`: `state_dict()`, None for a checkpoint
        without one): its version, the run's teachers and the live ones (p follows by `reweigh`), and the
        changes recorded after `start`, to be applied again at the same steps. A pool served anew since is
        followed as it is now (`_rebase`), and so is one whose teachers were all lost when the run stopped."""
        if self.elastic is None:
            return
        if pool is not None:
            latest = self.agree([], self.elastic.latest(), [])[1]  # every rank follows the same version
            if pool.get("identity", self.elastic.identity) != self.elastic.identity or pool["version"] > latest:
                self._rebase(start, pool, latest)  # served anew since the checkpoint: follow it as it is now
            else:
                self.elastic.restore(pool["version"], pool["members"])
                self._live = list(pool["live"])
            self.reset_probs()
        if self.key is not None:
            self.replay = {s: v for s, v in self.elastic.recorded(self.key).items() if s > start}
        if pool is not None and not self.drawable() and start not in self.replay:
            # stopped with no teacher left (or none with probability): follow the pool as it is now, so
            # teachers added since serve the resumed run (the ranks agree on the version first)
            latest = self.agree([], self.elastic.latest(), [])[1]
            if latest > self.elastic.version:
                self._apply(start, latest)

    def start_fresh(self) -> None:
        """A run starting at step 0 (no checkpoint): replay the changes recorded for its key, if any (a
        worker restarted before the first checkpoint)."""
        if self.elastic is not None and self.key is not None:
            self.replay = self.elastic.recorded(self.key)
