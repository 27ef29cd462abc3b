"""Running a model over encoded rows: predictions in length order and GLUE dev metrics, used by the workers'
evaluations and by the commands (`skd evaluate`, `skd export`'s check, `skd compare`) on the driver.
"""

from __future__ import annotations

from typing import Callable
import numpy as np
import torch
from orchestrator.common.task import Encoded, TaskSpec
from orchestrator.common.metrics import glue_metrics


def evaluate(model, data: Encoded, spec: TaskSpec, pad_id: int, batch_size: int) -> dict[str, float]:
    """The task's GLUE metrics of `model` on an encoded split (in-process, eval mode, no grad).

    Returns:
        {metric name: value}, e.g. {"accuracy": 0.81} (SST-2), {"pearson": .., "spearmanr": ..} (STS-B).
    """
    return glue_metrics(spec, predict(model, data, pad_id, batch_size), data.labels)


def predict(model, data: Encoded, pad_id: int, batch_size: int) -> np.ndarray:
    """`model`'s outputs on every row of an encoded split, in row order: [N, C] float32 logits (C = 1 for
    regression). Eval mode, no grad; batches of similar length (less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def forward(b: dict) -> np.ndarray:
        return model(input_ids=torch.as_tensor(b["input_ids"], device=device),
                     attention_mask=torch.as_tensor(b["attention_mask"], device=device)).logits.float().cpu().numpy()

    with torch.inference_mode():
        preds = in_length_order(data, pad_id, batch_size, forward)
    model.train(was_training)
    return preds


def in_length_order(data: Encoded, pad_id: int, batch_size: int,
                    forward: Callable[[dict], np.ndarray]) -> np.ndarray:
    """`forward`'s [B, C] outputs on every row of an encoded split, in row order: [N, C] float32. Rows are
    batched in order of length (batches pad little; metrics do not depend on order); `forward` gets each
    `Encoded.batch` dict (PyTorch here, ONNX Runtime in `orchestrator.commands.export.ort_predict`)."""
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")
    outs = [forward(data.batch(order[i: i + batch_size], pad_id)) for i in range(0, len(order), batch_size)]
    preds = np.empty((len(order), outs[0].shape[-1]), dtype=np.float32)
    preds[order] = np.concatenate(outs)
    return preds
