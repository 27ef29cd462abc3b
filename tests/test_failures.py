"""Worker errors reach the user once: the cause found inside Ray Train's wrappers, one line naming it and
the log with the traceback; full disks named with their free space; half-written checkpoints removed."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
from ray.exceptions import RayTaskError
from ray.train import WorkerGroupError

from actors.errors import CheckpointError
from actors.knowledge import Knowledge
from orchestrator.common.failures import (cannot_restart, describe, drop_unfinished_checkpoints, fatal_failure,
                                          fatal_report, root_cause, worker_failure)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_a_worker_error_is_found_inside_ray_trains_wrappers_and_shown_as_one_line_with_its_log(tmp_path):
    cause = raised(CheckpointError("no checkpoint of this run can be trusted: step 8: x is missing"))
    task = RayTaskError("train_fn", "Traceback (most recent call last): ...", cause)
    wrapped = WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: raised(RuntimeError("rank 1")), 0: task})
    assert root_cause(wrapped) is cause and cannot_restart(cause) and not cannot_restart(RuntimeError())
    error = worker_failure(wrapped, tmp_path / "logs" / "run.log", "abc123", resumable=lambda: True)
    text = str(error)
    assert text.startswith("the student worker failed: no checkpoint of this run can be trusted: step 8: x is "
                           "missing. MLflow run abc123 is marked FAILED; continue it with --resume")
    log = re.search(r"Traceback: (\S+)$", text).group(1)
    assert log == str(tmp_path / "logs" / "run.log") and "WorkerGroupError" in open(log).read()
    assert "\n" not in text  # one line

    report = fatal_report(cause)
    again = fatal_failure(report, tmp_path / "logs" / "fatal.log", "abc123", resumable=lambda: False)
    assert "not retried: a restart would meet the same error" in str(again) and "start it again" in str(again)
    assert "CheckpointError" in (tmp_path / "logs" / "fatal.log").read_text()


def test_a_full_disk_names_the_file_the_folder_and_its_free_space(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "model.safetensors"))
    assert cannot_restart(full) and not cannot_restart(OSError(errno.ECONNREFUSED, "refused"))
    line = describe(full)
    assert re.fullmatch(rf"the disk is full writing {re.escape(str(tmp_path))}/ckpt/model.safetensors; "
                        rf"{re.escape(str(tmp_path))} has [\d,.]+ MiB free: free space there .*", line), line
    assert describe(OSError(errno.ENOSPC, "No space left"), tmp_path).startswith(f"the disk is full under {tmp_path};")
    # Ray Train's checkpoint upload (pyarrow) names no file: the driver names the run's checkpoint folder
    upload = raised(OSError(errno.ENOSPC, "Error writing bytes to file"))
    report = fatal_report(upload)
    error = str(fatal_failure(report, tmp_path / "fatal.log", "abc123", lambda: False, tmp_path / "ray" / "run", "teacher"))
    assert error.startswith(f"the teacher worker stopped: the disk is full under {tmp_path}/ray/run; {tmp_path} has ")


def test_checkpoint_folders_cut_off_mid_write_are_removed_and_finished_ones_kept(tmp_path):
    done, cut = tmp_path / "checkpoint_2026-12-04_01", tmp_path / "checkpoint_2026-12-04_02"
    for folder in (done, cut):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"x" * 10)
    (done / "checkpoint.json").write_text("{}")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own file: not a checkpoint
    older = tmp_path / "checkpoint_2026-11-01_00"  # an earlier skd's, without a manifest: kept
    older.mkdir()
    os.utime(older, (1_700_000_000, 1_700_000_000))
    def problem(folder):
        return None if (folder / "checkpoint.json").is_file() else "no manifest"

    assert drop_unfinished_checkpoints(tmp_path, problem, since=1_750_000_000) == [cut]
    assert done.is_dir() and older.is_dir() and not cut.exists()
    assert (tmp_path / "checkpoint_manager_snapshot.json").is_file()
    assert drop_unfinished_checkpoints(tmp_path / "absent", problem, since=0) == []


def test_nonfinite_rows_name_every_row_with_a_nan_or_inf_in_any_float_output():
    logits = np.zeros((4, 2), np.float32)
    hidden = np.zeros((4, 1, 3, 5), np.float32)
    logits[1, 0] = np.nan
    hidden[3, 0, 2, 4] = np.inf
    kn = Knowledge(0, logits, 0.0, hidden=hidden, token_index=np.zeros((4, 3), np.int64))
    assert kn.nonfinite_rows().tolist() == [1, 3]
    assert Knowledge(0, np.zeros((2, 2), np.float32), 0.0).nonfinite_rows().tolist() == []
