"""One exception type for every user-facing mistake.

The CLI prints a `SkdError` as one readable line (no traceback) and exits with status 2. Every raise
names the setting at fault and the fix, and happens before any Ray resources are taken.
"""


class SkdError(Exception):
    """A problem with the user's input (config, data, checkpoints) that the user can fix.

    Args:
        message: what is wrong and how to fix it; name the setting (`distill.alpha`, `data.glue_dir`).
    """


class ConfigError(SkdError):
    """An invalid or unknown setting in a YAML config or a `--set key=value` override."""


class DataError(SkdError):
    """Missing or malformed data files, unknown label values, or an unknown task."""


class TeacherError(SkdError):
    """A teacher checkpoint that does not exist, does not load, or does not match the student."""


class TeacherLostError(Exception):
    """One teacher can no longer serve: its actor died for good (restarts used up, node gone, killed) or
    did not answer within the knowledge timeout. Raised by a `PendingKnowledge.result()`; the knowledge
    feed catches it, drops the teacher and asks a live one (not a user error, so not an `SkdError`).

    Args:
        teacher: the lost teacher's index in the ensemble.
        reason: what happened, e.g. "ActorDiedError: ..." or "no answer within 300 s".
    """

    def __init__(self, teacher: int, reason: str) -> None:
        super().__init__(f"teacher {teacher} lost: {reason}")
        self.teacher, self.reason = teacher, reason


class TeachersLostError(SkdError):
    """Every teacher a run could ask is lost; the run stops with a checkpoint (resume with `--resume`)."""


class CheckpointError(SkdError):
    """A checkpoint that cannot be trusted (missing manifest, a file of the wrong size or digest, non-finite
    weights) and no earlier one that can."""


class NonFiniteError(SkdError):
    """Training met a non-finite loss, gradient or teacher answer (`distill.nonfinite: stop`); the run
    stopped with a checkpoint of its last finite state."""
