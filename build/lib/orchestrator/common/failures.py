"""Errors raised on a Ray Train worker, reaching the user once.

A worker's error arrives at the driver wrapped (Ray Train's `WorkerGroupError` around a `RayTaskError`
around the exception), with a traceback per wrapper. `worker_failure` finds the exception that started it,
writes every traceback to a log file and gives one `WorkerFailedError` line that names the cause, the log
and the way on. Errors a restart cannot fix (`cannot_restart`: skd's own errors about files and settings,
a full disk) are left with the driver's `RunControl` actor (`fatal_report`): a single worker then ends, so
Ray Train does not restart into them; with several workers the group Ray Train restarts ends at once.
"""

from __future__ import annotations

import errno
import shutil
import traceback
from pathlib import Path
from typing import Callable

from actors.errors import SkdError


class WorkerFailedError(SkdError):
    """A student worker failed; the message names the cause, the log file with the traceback, and what to do
    (the run is FAILED in MLflow and, where a checkpoint exists, `resumable`)."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def cannot_restart(exc: BaseException) -> bool:
    """Whether restarting the worker group would meet `exc` again: a skd error (a checkpoint or cache that
    does not verify, a bad setting) or a full disk (ENOSPC / EDQUOT)."""
    return isinstance(exc, SkdError) or full_disk(exc)


def describe(exc: BaseException, folder: Path | None = None) -> str:
    """One line for `exc`: a full disk names the file (or `folder`) and its free space (`disk_full`); others
    are "<type>: <message>" (skd's own errors: the message alone)."""
    if full_disk(exc):
        return disk_full(exc.filename, folder)
    if isinstance(exc, SkdError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def full_disk(exc: BaseException) -> bool:
    """Whether `exc` is a full disk or quota (ENOSPC / EDQUOT; pyarrow's copy of a checkpoint raises it too)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(filename: str | None, folder: Path | None) -> str:
    """The full-disk line: the file being written (else the folder), the free MiB of the nearest existing
    folder above it, and the way on."""
    where = Path(filename).parent if filename else folder
    free = ""
    if where is not None:
        probe = next((p for p in [where, *where.parents] if p.exists()), None)
        if probe is not None:
            free = f"; {probe} has {shutil.disk_usage(probe).free / 2 ** 20:,.1f} MiB free"
    target = f" writing {filename}" if filename else f" under {folder}" if folder else ""
    return f"the disk is full{target}{free}: free space there (or point output_dir / ray.storage_path at " \
           f"another disk)"


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started a worker failure: inside Ray Train's `WorkerGroupError` (the lowest rank's
    failure), Ray's `RayTaskError` (`.cause`) and chained exceptions (`__cause__`)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:
            exc = failures[min(failures)]
            continue
        inner = getattr(exc, "cause", None) or exc.__cause__
        if isinstance(inner, BaseException):
            exc = inner
            continue
        break
    return exc


def write_log(path: Path, exc: BaseException, extra: str = "") -> Path:
    """Write `exc`'s full traceback (and `extra`, e.g. a worker's own traceback) to `path`; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(exc)) + (f"\n{extra}" if extra else "")
    path.write_text(text, encoding="utf-8")
    return path


def worker_failure(exc: BaseException, log: Path, run_id: str, resumable: Callable[[], bool],
                   storage: Path | None = None, who: str = "student") -> WorkerFailedError:
    """The one-line error for a failed `trainer.fit()` (`exc`), its tracebacks written to `log`.

    Args:
        run_id: the MLflow run (marked FAILED by the caller).
        resumable: whether a checkpoint is left, so `--resume` continues the run; called once the line is
            composed, since it may remove cut-off checkpoints (a full-disk line gives the free space the run
            met, not the space freed afterwards).
        storage: the run's checkpoint folder (named in a full-disk message when the error carries no file).
        who: whose workers trained: "student", or "teacher" (a teacher's fine-tuning).
    """
    cause = root_cause(exc)
    workers = getattr(exc, "worker_failures", None) or {}
    written = write_log(log, exc, "".join(f"\n--- rank {rank} ---\n{failure}\n"  # a RayTaskError: its traceback
                                          for rank, failure in sorted(workers.items())))
    line = describe(cause, storage)
    left = resumable()
    tail = "continue it with --resume" if left else "start it again"
    return WorkerFailedError(f"the {who} worker failed: {line}. MLflow run {run_id} is marked FAILED; {tail} once "
                             f"that is fixed. Traceback: {written}", left)


def fatal_report(exc: BaseException) -> dict[str, str]:
    """What a worker leaves with the driver instead of raising an error a restart cannot fix: {"fatal": one
    line, "fatal_log": the traceback, and for a full disk "full_disk": the file being written, or ""}
    (`RunControl.fail`; the driver's `fatal_failure` reads it)."""
    report = {"fatal": describe(exc), "fatal_log": "".join(traceback.format_exception(exc))}
    if full_disk(exc):
        report["full_disk"] = exc.filename or ""
    return report


def fatal_failure(report: dict, log: Path, run_id: str, resumable: Callable[[], bool], storage: Path | None = None,
                  who: str = "student") -> WorkerFailedError:
    """The error for a worker's `fatal_report`; the worker's traceback is written to `log`. A full disk
    that named no file (Ray Train's checkpoint upload) names `storage`, the run's checkpoint folder.
    `resumable` as in `worker_failure` (called after the line is composed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(str(report.get("fatal_log", "")), encoding="utf-8")
    line = disk_full(report["full_disk"] or None, storage) if "full_disk" in report else report["fatal"]
    left = resumable()
    tail = "continue it with --resume" if left else "start it again"
    return WorkerFailedError(f"the {who} worker stopped: {line}. MLflow run {run_id} is marked FAILED (not "
                             f"retried: a restart would meet the same error); {tail} once that is fixed. "
                             f"Traceback: {log}", left)


def drop_unfinished_checkpoints(run_folder: Path, problem: Callable[[Path], str | None], since: float) -> list[Path]:
    """Remove the `checkpoint_*` folders of this run's Ray Train folder created since `since` (unix time:
    this attempt's) that do not verify (`problem(folder)` is not None: cut off mid-write, e.g. by a full
    disk; Ray Train's upload copies a checkpoint's files in name order, so the manifest may be there while
    the weights are not); returns them. Older folders (an earlier attempt's or an earlier skd's) are left
    alone; the run folder is skd's own (named after the MLflow run)."""
    removed = []
    for folder in sorted(run_folder.glob("checkpoint_*")) if run_folder.is_dir() else []:
        if folder.is_dir() and folder.stat().st_mtime >= since and problem(folder) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
