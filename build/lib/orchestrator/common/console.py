"""What `skd` shows on the terminal while it works.

One live display per phase (a teacher being fine-tuned, a student being distilled, a comparison's run):
a progress bar with the phase's name, steps, loss, samples/s and time left, fed by the progress lines the
rank-0 worker prints every `distill.log_every` steps (`progress_line`, parsed back by `parse_progress`:
one format, defined here). Ray's internal lines that read like errors to a user (an internal warning
about the PreemptionWatcher actor's constructor arguments, Ray Train's "Reporting training result" lines)
are dropped, and worker lines are printed without Ray's colour-coded `(RayTrainWorker pid=...)` prefixes.
When the output is not a terminal (CI, `ray job submit` logs, a file), there is no live display: each
phase prints one line when it starts and the workers' progress lines follow as plain lines.

The filter sits on the driver's stream of worker output: Ray's `ray_print_logs` handler (installed by
`ray.init(log_to_driver=True)`) is replaced by `Display.handle`. That hook is Ray-internal
(`ray._private.ray_logging.global_worker_stdstream_dispatcher`); when a Ray version lacks it, Ray's own
printing stays and only the phase lines are added. `SKD_RAY_LOGS=all` keeps Ray's printing as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
import threading
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

NOISE = (
    re.compile(r"Actor with class name: 'PreemptionWatcher'.*constructor arguments in the object store"),
    re.compile(r"^Reporting training result \d+: TrainingReport\("),
)
"""Ray lines a user cannot act on: Ray Train's own PreemptionWatcher warning (ray-project/ray#53727) and its
per-report debug line."""

_PROGRESS = re.compile(r"\[skd\] step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) .*?(?P<rate>[\d.]+) samples/s"
                       r".*?ETA (?P<eta>\d+)s")
_context: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("skd_console_context", default=())


def progress_line(step: int, total: int, loss: float, hard: float, kd: float, rate: float, wait_s: float,
                  eta_s: float) -> str:
    """The worker's progress line (step of total, losses, samples/s, seconds waited for knowledge since the
    last line, seconds left), the format `parse_progress` reads."""
    return (f"[skd] step {step}/{total} loss {loss:.4f} (hard {hard:.4f} kd {kd:.4f}) {rate:.1f} samples/s "
            f"wait {wait_s:.2f}s ETA {eta_s:.0f}s")


def parse_progress(line: str) -> dict[str, float] | None:
    """{"step", "total", "loss", "rate", "eta"} of a `progress_line` (None for any other line)."""
    m = _PROGRESS.search(line)
    if m is None:
        return None
    try:
        return {k: float(v) for k, v in m.groupdict().items()}
    except ValueError:
        return None


def is_noise(line: str) -> bool:
    """Whether a worker line is one of the `NOISE` lines."""
    return any(p.search(line) for p in NOISE)


@contextlib.contextmanager
def context(label: str) -> Iterator[None]:
    """Name the enclosing work (e.g. "teacher 2 of 3"); phases started inside show it before their own name."""
    token = _context.set((*_context.get(), label))
    try:
        yield
    finally:
        _context.reset(token)


class Display:
    """The terminal display: `phase` shows one live progress bar (terminal) or a start line (otherwise);
    `handle` takes Ray's worker-output records ({"lines": [...], "is_err": bool, "pid", ...}), drops noise,
    feeds progress lines to the bar and prints the rest without Ray's prefixes."""

    def __init__(self, console: Console | None = None, passthrough: Callable[[dict], None] | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.passthrough = passthrough
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._task = None

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[None]:
        """Show one phase (e.g. a run of `total` steps) while the block runs."""
        label = " · ".join((*_context.get(), name))
        if not self.live:
            self.console.print(f"[skd] {label}: {total} steps" if total else f"[skd] {label}", markup=False)
            yield
            return
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
                            TimeRemainingColumn(), console=self.console, transient=False)
        with self._lock:
            self._progress, self._task = progress, progress.add_task(label, total=total, loss="-", rate="-")
        progress.start()
        try:
            yield
        finally:
            with self._lock:
                self._progress = None
            progress.stop()

    def handle(self, data: dict) -> None:
        """One record of worker output from Ray (see the class docstring): noise dropped, progress lines
        shown by the live bar, the rest printed by `passthrough` (Ray's printer without its prefixes, which
        also keeps Ray's own filtering of autoscaler records) or, without one, by this display."""
        kept = []
        for line in data.get("lines", []):
            if is_noise(line):
                continue
            with self._lock:
                progress, task = self._progress, self._task
            seen = parse_progress(line) if progress is not None else None
            if seen is None:
                kept.append(line)
                continue
            progress.update(task, completed=seen["step"], total=seen["total"], loss=f"{seen['loss']:.4f}",
                            rate=f"{seen['rate']:.1f}")
        if not kept:
            return
        if self.passthrough is not None:
            self.passthrough({**data, "lines": kept})
            return
        for line in kept:
            self.console.print(Text(line))


_display: Display | None = None


def display() -> Display:
    """The process's display (made on first use, for the stdout of that moment)."""
    global _display
    if _display is None:
        _display = Display()
    return _display


def filter_worker_output() -> bool:
    """Route the Ray driver's worker output through `display().handle` (after `ray.init`). Returns whether
    the filter is on (off: `SKD_RAY_LOGS=all`, output not forwarded, or a Ray without the hook)."""
    if os.environ.get("SKD_RAY_LOGS", "").lower() == "all":
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_to_stdstream
    except ImportError:
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if "ray_print_logs" not in names:
        return "skd_print_logs" in names
    dispatcher.remove_handler("ray_print_logs")  # each ray.init adds it again
    if "skd_print_logs" not in names:
        display().passthrough = functools.partial(print_to_stdstream, ignore_prefix=True)
        dispatcher.add_handler("skd_print_logs", display().handle)
    return True
