"""The config sections of what a run reads: `data` (with its transfer rows), `teachers` (members, fine-tuning,
resources) and `student`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from actors.errors import DataError
from actors.models import PACKAGED_MODEL
from orchestrator.config.base import _Strict, _positive_resources, glue_dir_candidates, safe_name


class TransferConfig(_Strict):
    """Unlabelled in-domain rows that only the teachers teach (a transfer set): no hard-label loss, only the
    soft-label term weighed by `distill.transfer_weight`. Students without a teacher (no-kd) skip them.

    `source: rest` takes the task's training rows past the labelled ones (past `data.max_train_samples` in the
    same seeded shuffle), their labels dropped; `source: file` reads a TSV/CSV of raw text (columns
    `text_column` / `text_pair_column`, default the task's own text columns; any label column is ignored).
    """

    source: Literal["rest", "file"] = "rest"
    file: Path | None = Field(None, description="TSV/CSV of unlabelled text for source=file.")
    text_column: str | None = Field(None, description="source=file: the text column (default: the task's).")
    text_pair_column: str | None = Field(None, description="source=file: the second text column of pair tasks.")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many transfer rows (the first ones).")

    @model_validator(mode="after")
    def _file_for_file(self) -> "TransferConfig":
        if self.source == "file" and self.file is None:
            raise ValueError("data.transfer.source: file needs data.transfer.file, a TSV/CSV of unlabelled text")
        if self.source == "rest" and self.file is not None:
            raise ValueError("data.transfer.file is read only with data.transfer.source: file")
        return self


class DataConfig(_Strict):
    """Where the task's examples come from and how they are tokenized."""

    source: Literal["glue_dir", "hub", "files"] = "glue_dir"
    glue_dir: Path | None = Field(
        None, description="GLUE-format folder (one sub-folder per task). Default: $GLUE_DIR, then the first "
                    "existing ../shared/data/glue beside the package, the working directory or the skd source "
                    "folder.")
    hub_dataset: str | None = Field(None, description="`datasets` name for source=hub (GLUE default: nyu-mll/glue).")
    hub_config: str | None = None
    train_file: Path | None = Field(None, description="TSV/CSV training file for source=files.")
    dev_file: Path | None = None
    train_split: str = "train"
    dev_split: str | None = Field(None, description="Dev split for source=hub (GLUE default: validation).")
    text_column: str | None = Field(None, description="Custom data: first text column.")
    text_pair_column: str | None = Field(None, description="Custom data: optional second text column.")
    label_column: str | None = Field(None, description="Custom data: label column.")
    task_type: Literal["classification", "regression"] = "classification"
    labels: list[str] | None = Field(None, description="Custom classification: label values in class order.")
    max_train_samples: int | None = Field(None, gt=0, description="Train on a seeded shuffled subset of this size.")
    max_dev_samples: int | None = Field(None, gt=0)
    max_length: int = Field(128, gt=2, le=4096, description="Tokens per example after truncation.")
    shuffle_seed: int = 0
    holdout: int | None = Field(
        None, gt=0, description="Evaluate on this many training rows held back from training (the last rows of the "
                                "seeded shuffle) instead of the dev set, so that a recipe search (`skd tune`) never "
                                "looks at dev. The run's dev/* metrics are then those rows'; teachers' scores (and "
                                "retention) stay dev scores.")
    transfer: TransferConfig | None = Field(None, description="Unlabelled transfer rows only the teachers teach.")

    @model_validator(mode="after")
    def _rest_needs_a_cut(self) -> "DataConfig":
        if self.transfer is not None and self.transfer.source == "rest" and self.max_train_samples is None:
            raise ValueError("data.transfer.source: rest takes the training rows past data.max_train_samples, which "
                             "is unset (every row is labelled): set data.max_train_samples, e.g. 8000")
        return self

    def resolved_glue_dir(self) -> Path:
        """The GLUE folder in force: `data.glue_dir`, else `$GLUE_DIR` (both taken as given), else the first
        existing folder of `glue_dir_candidates()` (../shared/data/glue beside the package, the working
        directory, or the folder skd was installed from).

        Raises:
            DataError: data.source is glue_dir and no candidate exists (the message lists them). For other
                sources the first candidate is returned unchecked (they read no GLUE folder).
        """
        if self.glue_dir is not None:
            return Path(self.glue_dir).expanduser().resolve()
        if os.environ.get("GLUE_DIR"):
            return Path(os.environ["GLUE_DIR"]).expanduser().resolve()
        candidates = glue_dir_candidates()
        for path in candidates:
            if path.is_dir():
                return path
        if self.source != "glue_dir":
            return candidates[0]
        raise DataError(f"no GLUE folder found: tried {', '.join(map(str, candidates))}; set data.glue_dir (or "
                        f"$GLUE_DIR) to a folder with one sub-folder per task (SST-2/train.tsv, ...), or use "
                        f"data.source=hub")


class TeacherMember(_Strict):
    """One member of the teacher ensemble.

    `init` is `minilm` (the packaged model), a local `save_pretrained` folder, or a hub id; `num_layers`
    keeps only the bottom layers of it. `checkpoint` names an already fine-tuned folder and skips
    `teachers prepare` for this member.
    """

    name: str
    init: str = PACKAGED_MODEL
    num_layers: int | None = Field(None, gt=0)
    checkpoint: Path | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return safe_name(value, "teachers.members[].name")


class FinetuneConfig(_Strict):
    """How `skd teachers prepare` fine-tunes each teacher (plain supervised training, no KD)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs for the fine-tuning worker; default: every CPU of a local cluster.")


class TeachersConfig(_Strict):
    """The teacher ensemble, where its manifest lives, and the resources of each teacher actor."""

    members: list[TeacherMember] = Field(min_length=1)
    manifest: Path | None = Field(None, description="Teachers manifest JSON. Default: <output_dir>/teachers/manifest.json.")
    finetune: FinetuneConfig = FinetuneConfig()
    num_cpus: float = Field(0.5, gt=0, description="Logical CPUs per teacher actor.")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPUs per teacher actor; auto = 1 when the cluster has GPUs.")
    threads: int = Field(1, gt=0, description="torch threads per teacher actor on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where a teacher runs: auto = CUDA when its process sees a GPU (whatever the node "
                            "declares), else CPU.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per teacher actor, e.g. {skd-teacher: 1} to keep "
                                          "teachers on the nodes that declare it.")
    placement: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] = Field(
        "SPREAD", description="Placement-group strategy over one bundle per teacher: STRICT_SPREAD = a node each.")
    max_restarts: int = Field(2, ge=0, description="Times Ray restarts a teacher actor whose process died before "
                                                   "the teacher counts as lost for the run.")
    max_task_retries: int = Field(2, ge=0, description="Times Ray re-sends a knowledge request whose teacher "
                                                       "died while restarts remain (0: a request to a teacher "
                                                       "that is restarting drops the teacher for the run).")
    knowledge_timeout_s: float | None = Field(
        600.0, gt=0, description="Seconds a knowledge request may take (the first also waits for the teacher to "
                                 "load) before its teacher counts as lost; null: wait forever.")
    max_concurrency: int = Field(1, ge=1, le=16, description="Forward passes a teacher actor runs at once (requests "
                                                             "from several students or ranks); more wait in its queue.")
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none", description="Teacher forward passes under torch.autocast in this dtype (GPUs: bfloat16 on tensor "
                            "cores); answers still leave as float32 or distill.knowledge.wire_dtype.")
    pool: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                             description="Attach to the served teacher pool of this name (`skd teachers serve`) "
                                         "instead of starting teachers; needs ray.address.")

    @field_validator("resources")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        return _positive_resources(value, "teachers.resources")

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= float(value) < float("inf"):
            raise ValueError(f"teachers.num_gpus = {value} must be auto or a number >= 0 (e.g. 1, or 0.5 to share)")
        return value

    @field_validator("members")
    @classmethod
    def _unique_names(cls, members: list[TeacherMember]) -> list[TeacherMember]:
        names = [m.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dupes)}")
        return members


class StudentConfig(_Strict):
    """The student's initialisation: a model name/folder and how many bottom layers it keeps."""

    init: str = PACKAGED_MODEL
    num_layers: int | None = Field(2, gt=0)
