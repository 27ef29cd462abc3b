"""Stopping a run cleanly from the driver: Ctrl-C (SIGINT) or SIGTERM asks the student workers to stop at
the next `log_every` step boundary, where they flush their metric buffer, so the run ends with a
checkpoint, every trained step's metrics in MLflow, the MLflow run KILLED and a `--resume` command printed.

The driver owns a small `RunControl` actor; workers poll it without blocking (`StopPoller`, every step,
at most one call every 0.5 s), and at each `log_every` boundary the data-parallel ranks agree whether to
stop (an all-reduce), since a report with a checkpoint is collective. A second signal stops at once (KeyboardInterrupt on the driver).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator, TypeVar

import ray


class RunControl:
    """The driver's stop flag, as a Ray actor (no CPU): `stop()` sets it, `stopping()` reads it. Also where
    a worker leaves an error a restart cannot fix (`fail`, read by the driver with `failure`)."""

    def __init__(self) -> None:
        self._stop = False
        self._failure: dict[str, str] | None = None

    def fail(self, report: dict[str, str]) -> None:
        """Record a worker's `failures.fatal_report` (the first one stands)."""
        self._failure = self._failure or report

    def failure(self) -> dict[str, str] | None:
        """The recorded `fail` report, or None."""
        return self._failure

    def stop(self) -> None:
        """Ask the run's workers to stop at their next `log_every` boundary."""
        self._stop = True

    def stopping(self) -> bool:
        """Whether `stop` was called."""
        return self._stop


def start_control() -> ray.actor.ActorHandle:
    """A new `RunControl` actor for one run, on the driver's node (it dies with the driver's job). Without
    the node affinity Ray may place it (no CPU asked) on any node, a teacher's too, and a run whose teacher
    node went would lose its control with it: its workers would stop as if the driver had gone."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunControl).options(num_cpus=0, scheduling_strategy=here).remote()


class StopPoller:
    """Non-blocking reads of a `RunControl` on a worker: at most one call in flight, at most one every
    `every_s` seconds; `poll()` returns True once the driver asked to stop (an answer at most about
    `every_s` old)."""

    def __init__(self, control: ray.actor.ActorHandle | None, every_s: float = 0.5) -> None:
        self.control, self._ref, self.stopped, self.every_s = control, None, False, every_s
        self._asked = 0.0

    def poll(self) -> bool:
        if self.control is None or self.stopped:
            return self.stopped
        if self._ref is None:
            if time.monotonic() - self._asked < self.every_s:
                return False
            self._ref, self._asked = self.control.stopping.remote(), time.monotonic()
        ready, _ = ray.wait([self._ref], timeout=0)
        if ready:
            try:
                self.stopped = bool(ray.get(self._ref))
            except ray.exceptions.RayActorError:  # the driver is gone or stopped at once: stop too
                self.stopped = True
            self._ref = None
        return self.stopped


T = TypeVar("T")


def run_interruptible(fit: Callable[[], T], control: ray.actor.ActorHandle) -> tuple[T, bool]:
    """(fit(), whether SIGINT/SIGTERM asked the run to stop) with `graceful_interrupts` in force.

    From the main thread, `fit` (Ray Train's `trainer.fit`) runs in a daemon thread while this thread waits
    and handles signals: Ray Train V2 installs its own SIGINT handler when `fit` runs in the main thread,
    which aborts the workers without letting them flush or checkpoint.

    Raises:
        KeyboardInterrupt: a second signal; what `fit` raised.
    """
    with graceful_interrupts(control) as state:
        if threading.current_thread() is not threading.main_thread():
            return fit(), False
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = fit()
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                box["error"] = exc

        thread = threading.Thread(target=target, name="skd-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # short waits: signal handlers run in this thread between them
        if "error" in box:
            raise box["error"]
        return box["result"], state["interrupted"]


@contextlib.contextmanager
def graceful_interrupts(control: ray.actor.ActorHandle) -> Iterator[dict[str, bool]]:
    """Within the block, the first SIGINT or SIGTERM asks the workers to stop with a checkpoint
    (`control.stop`); the second raises KeyboardInterrupt. Yields {"interrupted": bool}. Outside the main
    thread (a Tune trial, a test thread) signals are left alone."""
    state = {"interrupted": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame) -> None:
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"] = True
        print(f"\n[skd] {signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint "
              f"(again to stop at once)", flush=True)
        control.stop.remote()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
