"""GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman (via scikit-learn / scipy)."""

from __future__ import annotations

import numpy as np

from orchestrator.common.task import TaskSpec

# scipy.stats and sklearn.metrics are imported where used: they cost ~1.5 s of start-up in every Ray Train
# worker, and SST-2 (accuracy) needs neither.


def glue_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's standard metrics.

    Args:
        spec: the task (its `metric` names the primary one).
        predictions: [N, C] logits for classification, or [N] / [N, 1] scores for regression.
        labels: [N] class indices or float scores.

    Returns:
        SST-2/QNLI/RTE/WNLI/MNLI: accuracy; CoLA: mcc (+ accuracy); MRPC/QQP: accuracy and f1;
        STS-B: pearson and spearman. All in [−1, 1] or [0, 1], not percentages.
    """
    if spec.is_regression:
        from scipy.stats import pearsonr, spearmanr

        scores = predictions.reshape(-1).astype(np.float64)
        gold = labels.astype(np.float64)
        if np.std(scores) == 0:  # a constant prediction has no correlation; report 0, not NaN
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(scores, gold)[0]), "spearman": float(spearmanr(scores, gold)[0])}
    pred = predictions.argmax(-1)
    out = {"accuracy": float((pred == labels).mean())}
    if spec.metric == "mcc":
        from sklearn.metrics import matthews_corrcoef

        out["mcc"] = float(matthews_corrcoef(labels, pred))
    if spec.metric == "f1":
        from sklearn.metrics import f1_score

        out["f1"] = float(f1_score(labels, pred))
    return out
