"""The teachers manifest: what `skd teachers prepare` produced and `skd distill` consumes.

A JSON file listing, per teacher: name, checkpoint folder, layers, hidden size, parameter count, the dev
metric, and a fingerprint of its vocabulary. `validate_teachers` checks the manifest against the config
and the student before any Ray resources are taken.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from actors.errors import TeacherError


@dataclass(frozen=True)
class TeacherInfo:
    """One prepared teacher.

    Attributes:
        name: unique name in the ensemble.
        checkpoint: absolute path of its `save_pretrained` folder (safetensors weights + tokenizer).
        num_layers: transformer layers.
        hidden_size: hidden width.
        parameters: parameter count.
        dev_metric: its primary GLUE metric on dev (e.g. accuracy in [0, 1]).
        metric: the metric's name.
        vocab: `vocab_fingerprint` of its tokenizer.
        num_labels: C.
        task: the task it was fine-tuned on.
        mlflow_run_id: the MLflow run of its fine-tuning ("" when imported).
        family: `config.model_type` (bert, mpnet, roberta, ...; "" in manifests written before it was kept).
        flops_per_token: forward FLOPs per token at `data.max_length` (`actors.models.forward_flops_per_token`;
            0 when not measured).
    """

    name: str
    checkpoint: str
    num_layers: int
    hidden_size: int
    parameters: int
    dev_metric: float
    metric: str
    vocab: str
    num_labels: int
    task: str
    mlflow_run_id: str = ""
    family: str = ""
    flops_per_token: int = 0


def write_manifest(path: Path, teachers: list[TeacherInfo]) -> None:
    """Write the manifest atomically (a partial file is never left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"teachers": [asdict(t) for t in teachers]}, indent=2))
    tmp.replace(path)


def read_manifest(path: Path) -> list[TeacherInfo]:
    """Read a manifest.

    Raises:
        TeacherError: missing or malformed file.
    """
    if not path.is_file():
        raise TeacherError(f"teachers manifest {path} does not exist; run `skd teachers prepare -c CONFIG` first "
                           f"(or set teachers.manifest)")
    try:
        data = json.loads(path.read_text())
        return [TeacherInfo(**t) for t in data["teachers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise TeacherError(f"teachers manifest {path} is malformed ({exc}); re-run `skd teachers prepare`") from None


def validate_teachers(teachers: list[TeacherInfo], wanted: list[str], task: str,
                      num_labels: int) -> list[TeacherInfo]:
    """Select the configured teachers from a manifest and check they fit the student.

    Args:
        teachers: manifest entries.
        wanted: `teachers.members` names, in config order.
        task: the run's task; num_labels: C of the run.

    Returns:
        The entries for `wanted`, in that order.

    Raises:
        TeacherError: a member missing from the manifest, a checkpoint folder that does not exist, or a task
            or label-count mismatch. Teachers may tokenize otherwise than the student (each gets its own view).
    """
    by_name = {t.name: t for t in teachers}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise TeacherError(f"teachers {missing} are in teachers.members but not in the manifest; run "
                           f"`skd teachers prepare -c CONFIG` to prepare them")
    chosen = [by_name[n] for n in wanted]
    for t in chosen:
        if not (Path(t.checkpoint) / "config.json").is_file():
            raise TeacherError(f"teacher {t.name!r}: checkpoint {t.checkpoint} does not exist or has no config.json; "
                               f"re-run `skd teachers prepare` or fix teachers.members[].checkpoint")
        if t.task != task or t.num_labels != num_labels:
            raise TeacherError(f"teacher {t.name!r} was fine-tuned for {t.task} with {t.num_labels} labels, but this "
                               f"run is {task} with {num_labels}; prepare teachers for this task")
    return chosen
