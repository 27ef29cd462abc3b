"""Shared fixtures: a tiny random BERT, configs around it, and a module-scoped local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("RAY_ADDRESS", None)  # skd attaches to $RAY_ADDRESS; tests start and stop their own clusters

from orchestrator.driver import runtime  # noqa: E402,F401  (Ray/MLflow environment defaults, as the CLI sets them)
from orchestrator.config.load import load_config  # noqa: E402
from tests.tiny import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer, 32-wide random BERT with MiniLM's vocabulary (teachers keep 4 or 2 layers, students 1)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def tiny_raw(tmp: Path, model: Path, **sections) -> dict:
    """A config dict for SST-2 subsets with tiny teachers t4 (4 layers) and t2 (2 layers)."""
    raw = {
        "task": "sst2",
        "output_dir": str(tmp / "out"),
        "data": {"max_train_samples": 64, "max_dev_samples": 48, "max_length": 32},
        "teachers": {"members": [{"name": "t4", "init": str(model), "num_layers": 4},
                                 {"name": "t2", "init": str(model), "num_layers": 2}],
                     "finetune": {"max_steps": 6, "batch_size": 8, "lr": 1e-3}, "num_cpus": 0.25},
        "student": {"init": str(model), "num_layers": 1},
        "distill": {"max_steps": 8, "batch_size": 8, "log_every": 2, "eval_every": 4},
        "ray": {"cpus_per_worker": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "skd-test"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """make_config(overrides=[...], **sections) -> SkdConfig around the tiny model in tmp_path."""
    def make(overrides: list[str] | None = None, **sections):
        return load_config(None, overrides, base=tiny_raw(tmp_path, tiny_model, **sections))
    return make


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module, stopped by this process (never `ray stop`)."""
    import ray

    runtime.start_local_ray(2, dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
