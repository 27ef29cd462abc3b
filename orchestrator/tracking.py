"""MLflow from one place: the driver owns runs; rank 0 of the trainer logs metrics in batches.

Also the plots logged as artifacts: the sampling distribution against observed teacher counts, and
learning curves.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARAM_VALUE_LIMIT = 6000


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Get or create an experiment; with a sqlite store, artifacts go to `artifact_root` (absolute)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = artifact_root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def open_experiment(tracking_uri: str, name: str) -> tuple[MlflowClient, str]:
    """(client, experiment id) of experiment `name` in the store, created if absent (artifacts beside a
    sqlite database go to `default_artifact_root`). The one place commands set up MLflow."""
    return MlflowClient(tracking_uri), ensure_experiment(tracking_uri, name, default_artifact_root(tracking_uri))


def default_artifact_root(tracking_uri: str) -> Path | None:
    """`mlartifacts/` beside a sqlite database file; None for servers (they choose their own)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts"
    return None


def code_version() -> str:
    """The git commit of this checkout ("unknown" outside git), for the `skd.code_version` tag."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches of 100 (MLflow's limit), values clipped to MLflow's length limit."""
    from mlflow.entities import Param

    items = [Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i: i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    """Log several metrics at one step in one batch."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


class MetricLogger:
    """Batched metric logging into an existing run; a no-op on ranks other than 0.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: the run the driver opened.
        enabled: False on non-zero ranks.
    """

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri) if enabled else None
        self._buffer: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics for `step` (flushed by `flush`, at most 1000 per MLflow batch)."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        for i in range(0, len(self._buffer), 1000):
            self._client.log_batch(self.run_id, metrics=self._buffer[i: i + 1000])
        self._buffer = []


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def plot_distribution(names: list[str], probs: Iterable[float], counts: Iterable[int], path: Path) -> Path:
    """Bar chart: configured sampling probability vs observed share of teacher samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    probs = np.asarray(list(probs), dtype=float)
    counts = np.asarray(list(counts), dtype=float)
    observed = counts / counts.sum() if counts.sum() > 0 else counts
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(x - 0.2, probs, 0.4, label="sampling distribution p")
    ax.bar(x + 0.2, observed, 0.4, label="observed share of samples")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """One panel per metric (e.g. train/loss, dev/accuracy) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4.2 * max(1, len(curves)), 3.4), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_figures(client: MlflowClient, run_id: str, figures: list[Path]) -> None:
    for fig in figures:
        client.log_artifact(run_id, str(fig), artifact_path="plots")


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI for this store, bound to 127.0.0.1."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def log_hf_model(tracking_uri: str, run_id: str, model_dir: Path, registered_name: str | None = None) -> str:
    """Log a `save_pretrained` classifier folder as an MLflow transformers model (text-classification).

    Requirements are given explicitly: MLflow's inference imports optional packages (torchvision) that a
    CPU install lacks. Returns the model URI (models:/...).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mlflow.set_tracking_uri(tracking_uri)
    import torch
    import transformers

    import logging

    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # model-card/licence notes for local folders
    with mlflow.start_run(run_id=run_id):  # the caller sets the final status afterwards
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="student",
            task="text-classification", registered_model_name=registered_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"])
    return info.model_uri
