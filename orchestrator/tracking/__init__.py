"""The MLflow side of skd: the store and its runs (`store`: checking the store, experiments, redacted params,
metrics, figures, the UI hint, model logging; its functions are importable from this package), the metric
logger that ships a run's metrics off the training loop's thread (`logger`, on rank 0 of the Ray Train
workers) and the run's figures (`plots`, on the driver).
"""

from orchestrator.tracking.store import (EXPERIMENT_KIND, PARAM_VALUE_LIMIT, browse_hint, check_store,
                                         code_version, default_artifact_root, ensure_experiment,
                                         experiment_url, log_figures, log_hf_model, log_metrics, log_params,
                                         log_timings, mask, metric_history, open_experiment, redact,
                                         ui_command)

__all__ = ["EXPERIMENT_KIND", "PARAM_VALUE_LIMIT", "browse_hint", "check_store", "code_version",
           "default_artifact_root", "ensure_experiment", "experiment_url", "log_figures", "log_hf_model",
           "log_metrics", "log_params", "log_timings", "mask", "metric_history", "open_experiment", "redact",
           "ui_command"]
