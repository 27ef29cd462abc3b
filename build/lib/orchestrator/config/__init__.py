"""The typed configuration of every skd command, read and validated on the driver (its settings reach the
workers inside the worker spec, never as config objects): pydantic models, one per section, that reject
unknown keys. `load.load_config` reads YAML and `--set` overrides into them and turns validation errors
into one `ConfigError` naming every bad field and a fix; `tune.TuneSection` is the `tune:` section.

Modules: `base` (paths, names, the strict base model), `sections` (data, teachers, student), `training`
(distill with its distribution and knowledge, ray, mlflow), `skd` (`SkdConfig`, the whole file), `load`,
`tune`. The section models and `SkdConfig` are importable from this package.
"""

from orchestrator.config.sections import (DataConfig, FinetuneConfig, StudentConfig, TeacherMember,
                                          TeachersConfig, TransferConfig)
from orchestrator.config.skd import SkdConfig, flatten
from orchestrator.config.training import (DistillConfig, DistributionConfig, KnowledgeConfig, MlflowConfig,
                                          RayConfig)

__all__ = ["DataConfig", "DistillConfig", "DistributionConfig", "FinetuneConfig", "KnowledgeConfig",
           "MlflowConfig", "RayConfig", "SkdConfig", "StudentConfig", "TeacherMember", "TeachersConfig",
           "TransferConfig", "flatten"]
