"""Typed, validated configuration for every skd command: pydantic models, one per section, that reject
unknown keys (`orchestrator.config_load.load_config` reads YAML and `--set` overrides into them and turns
validation errors into one `ConfigError` naming every bad field and a fix).

Relative paths in a config are taken relative to the current working directory (where `skd` runs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.errors import DataError
from actors.models import PACKAGED_MODEL
from orchestrator.tune_section import TuneSection


REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_BESIDE = Path("..") / "shared" / "data" / "glue"  # the default GLUE folder, relative to a checkout's root


def installed_source_dir() -> Path | None:
    """The folder the installed `skd` distribution was installed from (`pip install -e .` or `pip install .`
    record it as a file:// URL in the distribution's direct_url.json, PEP 610), or None (not installed, or
    installed from an index or a wheel). Every `skd` distribution on sys.path is asked, since an egg-info
    folder in the working directory shadows the installed one."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    for dist in metadata.distributions(name="skd"):
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        except ValueError:
            continue
        if url.startswith("file://"):
            return Path(unquote(urlparse(url).path))
    return None


def glue_dir_candidates() -> list[Path]:
    """Where the default GLUE folder is looked for, in order (duplicates dropped): ../shared/data/glue beside
    the imported package, beside the working directory, and beside the folder `skd` was installed from.
    Inside a `ray job submit` job the first two are Ray's uploaded copy of the working directory, so the
    installed source folder is what finds the user's checkout."""
    roots = [REPO_ROOT, Path.cwd(), installed_source_dir()]
    found: list[Path] = []
    for root in roots:
        if root is not None and (path := (root / GLUE_BESIDE).resolve()) not in found:
            found.append(path)
    return found


Family = Literal["uniform", "teacher-rank", "student-rank", "softmax", "capacity-gaussian", "weights", "adaptive"]


SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def safe_name(value: str | None, what: str) -> str | None:
    """`value` if it can name a folder skd creates (letters, digits, `_ . -`, no leading dot: no path
    separators, no `.` or `..`).

    Raises:
        ValueError: naming `what` and the fix.
    """
    if value is not None and not SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits, '_', '.', '-'; not starting "
                         f"with '.'), since skd makes folders named after it; e.g. {what.split('.')[-1]}: my-run-1")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


def _positive_resources(value: dict[str, float], what: str) -> dict[str, float]:
    import math

    reserved = ("CPU", "GPU", "memory", "object_store_memory")
    bad = {k: v for k, v in value.items() if not k or k in reserved or not (1e-4 <= v and math.isfinite(v))}
    if bad:
        raise ValueError(f"{what}: custom resources need a name other than {'/'.join(reserved)} and a finite amount "
                         f">= 0.0001 (Ray's precision); got {bad} (CPUs and GPUs have their own settings)")
    return value


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


class DistributionConfig(_Strict):
    """The SKD sampling distribution over teachers (see `orchestrator.sampling`)."""

    family: Family = "uniform"
    gamma: float = Field(1.0, ge=0, description="Rank exponent for teacher-rank / student-rank.")
    tau: float = Field(1.0, gt=0, description="Softmax temperature over scores.")
    capacity: Literal["parameters", "flops"] = Field(
        "parameters", description="capacity-gaussian's c_i: parameter count, or forward FLOPs per token at "
                                  "data.max_length (both in the teachers manifest).")
    mu: float | None = Field(None, description="capacity-gaussian centre, in ln(c). Default: mean over teachers.")
    sigma: float = Field(1.0, gt=0, description="capacity-gaussian width, in ln(c).")
    weights: dict[str, float] | None = Field(None, description="family=weights: teacher name -> weight.")
    eps: float | None = Field(None, ge=0, le=1, description="Mix with uniform: p = (1 - eps) p + eps / N. Default "
                              "0, and 0.1 for adaptive (its exploration floor, which must be > 0).")
    prepass_steps: int = Field(100, gt=0, description="student-rank: steps of each single-teacher pre-pass run.")
    every: int = Field(10, gt=0, description="adaptive: steps per p update (one probe of the student each).")
    step_size: float = Field(0.1, gt=0, description="adaptive: eta, the softmax's scale on each teacher's summed "
                                                    "standardised rewards.")
    probe_size: int = Field(32, gt=1, description="adaptive: training examples in the fixed probe batch.")

    @model_validator(mode="before")
    @classmethod
    def _default_eps(cls, data):
        """eps left out: 0 for the fixed families, 0.1 for adaptive (a floor it needs)."""
        if isinstance(data, dict) and data.get("eps") is None:
            data = {**data, "eps": 0.1 if data.get("family") == "adaptive" else 0.0}
        return data

    @model_validator(mode="after")
    def _weights_for_family(self) -> "DistributionConfig":
        if self.family == "weights" and not self.weights:
            raise ValueError("family 'weights' needs distill.distribution.weights, e.g. {teacher-a: 2, teacher-b: 1}")
        if self.family == "adaptive" and self.eps <= 0:
            raise ValueError("family 'adaptive' needs distill.distribution.eps > 0, its exploration floor "
                             "(every teacher keeps at least eps / N), e.g. eps: 0.1")
        return self


class KnowledgeConfig(_Strict):
    """What the student learns from besides soft labels, and where the knowledge comes from.

    Hidden-state knowledge (HSK) selection follows Liu et al. (ACL 2021): depth (`layers`), length
    (`tokens`, `num_tokens`) and width (`width`, `width_fraction`), applied on the teacher. Attention KL and
    [CLS] cosine follow Aguilar et al. (AAAI 2020). `schedule` orders the internal-representation losses.
    """

    source: str = Field("online", description="online (teacher actors) | cache:PATH (an `skd cache build` folder)")
    outputs: list[Literal["hidden", "attentions", "cls"]] = Field(
        default_factory=list, description="Internal representations to distil besides soft labels.")
    layers: int | list[int] = Field(1, description="Student layers with IR losses: the top k (an int) or a list "
                                                   "of 1-based student layers.")
    tokens: Literal["all", "first", "cls-attention", "cls-attention-no-sep"] = "cls-attention-no-sep"
    num_tokens: int | None = Field(10, gt=0, description="K tokens kept per example (tokens != all).")
    width: Literal["all", "random", "even", "magnitude"] = "random"
    width_fraction: float = Field(0.1, gt=0, le=1, description="Fraction of the teacher's hidden dims kept.")
    width_seed: int = 0
    wire_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of knowledge on the wire and in the cache.")
    schedule: Literal["none", "joint", "all", "progressive", "stacked"] = Field(
        "joint", description="joint: IR + soft labels every step; all/progressive/stacked: IR phase, then soft labels.")
    ir_fraction: float = Field(0.5, gt=0, lt=1, description="all/progressive/stacked: share of steps in the IR phase.")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE.")
    attention_weight: float = Field(1.0, ge=0, description="Weight of the attention KL.")
    cls_weight: float = Field(1.0, ge=0, description="Weight of the [CLS] cosine loss.")
    cache_shard_size: int = Field(1024, gt=0, description="skd cache build: examples per shard file.")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value == "online" or (value.startswith("cache:") and len(value) > 6):
            return value
        raise ValueError(f"unknown knowledge source {value!r}; use online or cache:PATH (a folder written by "
                         f"`skd cache build`)")

    @property
    def needs_attentions(self) -> bool:
        """Teachers must run eager attention: attentions are distilled, or HSK tokens are chosen by [CLS]
        attention."""
        return "attentions" in self.outputs or ("hidden" in self.outputs and self.tokens.startswith("cls-attention"))

    @property
    def cache_path(self) -> Path | None:
        """The cache folder of `source: cache:PATH`, absolute; None when online."""
        return Path(self.source[6:]).expanduser().resolve() if self.source.startswith("cache:") else None


class DistillConfig(_Strict):
    """The student training run: strategy, KD loss weights and optimisation."""

    strategy: str = Field("skd", description="skd | no-kd | average | single:<teacher name>")
    distribution: DistributionConfig = DistributionConfig()
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the hard-label loss; 1 - alpha weighs the KD term.")
    transfer_weight: float = Field(1.0, ge=0, description="Weight of the soft-label term on unlabelled transfer "
                                                          "rows (data.transfer); labelled rows keep 1 - alpha.")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Total optimizer steps; overrides epochs.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    eval_every: int | None = Field(None, gt=0, description="Steps between dev evaluations. Default: 4 per run.")
    checkpoint_every: int | None = Field(None, gt=0, description="Steps between checkpoints. Default: at each evaluation.")
    log_every: int = Field(10, gt=0, description="Steps between progress lines and MLflow metric flushes.")
    eval_batch_size: int = Field(128, gt=0)
    prefetch: bool = Field(True, description="Send step t+1's knowledge request before step t's backward pass.")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A step whose loss or gradient is NaN/inf (or whose teacher answered NaN/inf): stop "
                            "with a checkpoint of the last finite state (resume with --resume), or skip the "
                            "update and count it (train/nonfinite_skipped). Teachers' fine-tuning too.")
    gsnr_every: int | None = Field(None, gt=0, description="Steps between GSNR probes of the student (None: off).")
    gsnr_probe_size: int = Field(16, gt=1, description="Training examples in the fixed GSNR probe batch.")
    knowledge: KnowledgeConfig = KnowledgeConfig()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value in ("skd", "no-kd", "average") or (value.startswith("single:") and len(value) > 7):
            return value
        raise ValueError(f"unknown strategy {value!r}; use skd, no-kd, average or single:<teacher name>")


class RayConfig(_Strict):
    """How to reach Ray and what the student workers get."""

    address: str | None = Field(None, description="Existing cluster address (ray://... or auto); default: start a local cluster.")
    num_workers: int = Field(1, gt=0, description="Data-parallel student workers.")
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local cluster; default: all cores.")
    storage_path: Path | None = Field(None, description="Ray Train storage (checkpoints). Default: <output_dir>/ray.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per student worker, e.g. {skd-student: 1}.")
    keep_finished_checkpoints: bool = Field(
        False, description="Keep Ray Train's checkpoints of a finished run under storage_path (2 per run, each the "
                           "model, optimizer and sampler state). Default: once the run's model is saved to its "
                           "output folder, its Ray Train folder is removed (Tune trials too); unfinished runs keep "
                           "theirs for --resume, and PBT trials hand theirs to Tune.")
    max_failures: int = Field(1, ge=-1, description="Times Ray Train restarts the student workers from the latest "
                                                    "checkpoint after a worker failure (-1: always, 0: never).")
    hold_freed_memory: bool = Field(
        True, description="Workers keep freed memory for reuse instead of handing it back to the OS after every "
                          "step (glibc's MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_ARENA_MAX=1 in the "
                          "job's environment): otherwise a CPU student page-faults its freed gradients and "
                          "activations back in every step (measured: 12,000 faults per step in a Ray Train worker, "
                          "7% of its training time).")

    @field_validator("resources_per_worker")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        return _positive_resources(value, "ray.resources_per_worker")


class MlflowConfig(_Strict):
    """Where runs go. A relative sqlite path is resolved against the working directory."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = Field(None, description="Default: skd-<task>.")
    run_name: str | None = Field(None, description="Default: <strategy>-<family>-s<seed>; also names the "
                                                    "student's folder under <output_dir>/students.")
    system_metrics_s: float = Field(10.0, ge=0, description="Seconds between MLflow system-metric samples (CPU, "
                                    "memory, GPU) on each student worker; 0: off.")
    registered_model: str | None = Field(
        None, description="skd distill: register the finished student in the MLflow Model Registry under this name "
                          "('default': skd-<task>-student). Unset: the model is logged to its run only.")

    @field_validator("run_name")
    @classmethod
    def _plain_run_name(cls, value: str | None) -> str | None:
        return safe_name(value, "mlflow.run_name")

    def resolved_uri(self) -> str:
        """`tracking_uri` with a relative sqlite path made absolute against the working directory."""
        prefix = "sqlite:///"
        if self.tracking_uri.startswith(prefix) and not self.tracking_uri.startswith(prefix + "/"):
            return prefix + str(Path(self.tracking_uri[len(prefix):]).expanduser().resolve())
        return self.tracking_uri


class SkdConfig(_Strict):
    """The whole configuration of one task: data, teachers, student, distillation, Ray and MLflow."""

    task: str
    output_dir: Path | None = Field(None, description="Default: runs/<task>.")
    data: DataConfig = DataConfig()
    teachers: TeachersConfig
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    tune: TuneSection | None = Field(None, description="Search space and defaults for `skd tune`.")

    @field_validator("task")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower().replace("-", "")

    @model_validator(mode="after")
    def _cross_checks(self) -> "SkdConfig":
        names = [m.name for m in self.teachers.members]
        strategy = self.distill.strategy
        if strategy.startswith("single:") and strategy[7:] not in names:
            raise ValueError(f"distill.strategy names teacher {strategy[7:]!r}, which is not in teachers.members "
                             f"({', '.join(names)})")
        weights = self.distill.distribution.weights or {}
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"distill.distribution.weights names unknown teachers {unknown}; members are {names}")
        kn = self.distill.knowledge
        if kn.outputs and strategy in ("average", "no-kd"):
            raise ValueError(f"distill.knowledge.outputs {kn.outputs} need one teacher per step: use strategy skd or "
                             f"single:<teacher> (average mixes teachers of different widths; no-kd has none)")
        layers = kn.layers
        n = self.student.num_layers
        if isinstance(layers, int) and (layers < 1 or (n is not None and layers > n)):
            raise ValueError(f"distill.knowledge.layers: {layers} is not a layer count between 1 and the student's "
                             f"{n} layers")
        if isinstance(layers, list) and (not layers or len(set(layers)) != len(layers)
                                         or any(l < 1 or (n is not None and l > n) for l in layers)):
            raise ValueError(f"distill.knowledge.layers: {layers} must be distinct 1-based student layers "
                             f"(student.num_layers = {n})")
        if kn.outputs and kn.schedule == "none":
            raise ValueError(f"distill.knowledge.schedule: none applies no internal-representation loss, but "
                             f"outputs are {kn.outputs}; use joint, all, progressive or stacked (or outputs: [])")
        if kn.tokens != "all" and kn.num_tokens is None:
            raise ValueError(f"distill.knowledge.num_tokens is required with tokens={kn.tokens}")
        if self.teachers.pool and not self.ray.address and not os.environ.get("RAY_ADDRESS"):
            raise ValueError(f"teachers.pool = {self.teachers.pool!r} attaches to a pool served on a running Ray "
                             f"cluster: set ray.address (auto, or the cluster's address)")
        return self

    # Resolved locations -------------------------------------------------------------------------
    def out_dir(self) -> Path:
        """`output_dir` as an absolute path (default runs/<task>)."""
        return Path(self.output_dir or Path("runs") / self.task).expanduser().resolve()

    def manifest_path(self) -> Path:
        """The teachers manifest written by `teachers prepare` and read by `distill`."""
        return Path(self.teachers.manifest or self.out_dir() / "teachers" / "manifest.json").expanduser().resolve()

    def storage_path(self) -> Path:
        """Ray Train storage for checkpoints."""
        return Path(self.ray.storage_path or self.out_dir() / "ray").expanduser().resolve()

    def experiment_name(self) -> str:
        return self.mlflow.experiment or f"skd-{self.task}"

    def registered_model_name(self) -> str | None:
        """`mlflow.registered_model` resolved: None (log the model to its run only) or the Model Registry name
        ("default" is skd-<task>-student)."""
        name = self.mlflow.registered_model
        return None if name is None else f"skd-{self.task}-student" if name == "default" else name

    def tracking_uri(self) -> str:
        """The MLflow tracking URI with a relative sqlite path made absolute (workers run elsewhere)."""
        return self.mlflow.resolved_uri()


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, str]:
    """Flatten a config into `{"distill.alpha": "0.5", ...}` for MLflow params (values as strings)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out
