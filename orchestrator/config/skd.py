"""The whole config file, `SkdConfig`: its sections (`orchestrator.config.sections`, `.training`, `.tune`),
the checks across them, and the paths a run derives from it (`orchestrator.config.load.load_config` reads
YAML and `--set` overrides into it and turns validation errors into one `ConfigError` naming every bad
field and a fix).

Relative paths in a config are taken relative to the current working directory (where `skd` runs).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from orchestrator.config.base import _Strict
from orchestrator.config.sections import DataConfig, StudentConfig, TeachersConfig
from orchestrator.config.training import DistillConfig, MlflowConfig, RayConfig
from orchestrator.config.tune import TuneSection


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
