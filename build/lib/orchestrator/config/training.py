"""The config sections of how a run trains and where it goes: `distill` (with its sampling `distribution` and
`knowledge`), `ray` and `mlflow`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config.base import _Strict, _positive_resources, safe_name

Family = Literal["uniform", "teacher-rank", "student-rank", "softmax", "capacity-gaussian", "weights", "adaptive"]


class DistributionConfig(_Strict):
    """The SKD sampling distribution over teachers (see `orchestrator.common.sampling`)."""

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
